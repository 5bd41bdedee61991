"""The projection every native model and drafter layer uses: ``F.linear``, through oneDNN on AMD CPUs.

On a CPU, ``F.linear`` in float32 runs on torch's BLAS (MKL in the official wheels). oneDNN's
inner product — the library torch already ships for its CPU convolutions — computes the same
product. Which is faster depends on the processor, so the default (``auto``) chooses by vendor:

* on this project's AMD EPYC machine oneDNN ran the embedded target's 25 projections 1.4× (one
  token) to 2.3× (a prefill chunk) faster than MKL, which is known to take slow paths on AMD
  processors, and decoding 1.1–1.7× faster with every drafter;
* on its Intel Xeon (AMX) machine MKL ran a decode step of the compiled target in 1.35–1.5 ms against
  oneDNN's 2.9–3.2 ms: each oneDNN call there cost ~20 µs more than the product itself (a 256 × 256
  product of one row: 7 µs on MKL, 28–31 µs on oneDNN, one thread or two), and plain decoding ran
  at 0.54× MKL's tokens/s.

So ``auto`` takes oneDNN where ``/proc/cpuinfo`` names an AMD processor and ``F.linear`` everywhere
else (``python benchmarks/cpu_linear.py`` measures all three variants on a machine; docs/benchmarks.md).

From a plain ``[out, in]`` weight oneDNN itself takes a slow path for 2 to ~64 rows — a verify
forward, a block drafter's block: a 4096 × 256 product of 2 rows cost twice one row's. It
multiplies instead by its own blocked copy of each weight (:func:`packed_weight`), made on first
use and kept beside the weight (the projections' memory twice over): the same at one row, and
8 rows of the embedded target's forward 1.15–1.2× faster.

The oneDNN path is taken only where it computes what ``F.linear`` computes, up to float32
rounding: a CPU tensor, float32 input and weight, a 2-D contiguous weight, an input of at least
2 dimensions, and no autograd (training a drafter's own layers takes ``F.linear``, as does every
other device and dtype — float64 tests compare against exact references). The environment
(read at import) chooses: ``DSPARK_CPU_LINEAR=auto`` (the default: ``onednn`` on AMD processors,
``blas`` elsewhere), ``onednn`` (oneDNN, packed weights), ``onednn-unpacked`` (oneDNN, no copies)
or ``blas`` (``F.linear`` everywhere). :data:`ONEDNN` and :data:`PACK_WEIGHTS` are the same
switches in code; a compiled function keeps the :data:`ONEDNN` it was traced with (dynamo guards
on it) and reads :data:`PACK_WEIGHTS` at each call.

Inside ``torch.compile`` the product is the opaque op ``dspark::onednn_linear``: inductor lowers
oneDNN's op itself only for frozen (constant) weights, which would copy every weight into every
compiled graph.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

CPU_LINEAR_CHOICES = ("auto", "onednn", "onednn-unpacked", "blas")


def cpu_vendor() -> str | None:
    """The CPU's vendor id as ``/proc/cpuinfo`` names it (``AuthenticAMD``, ``GenuineIntel``, …), or
    None where there is no such file (macOS, Windows) or it names none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip() or None
    except OSError:
        return None
    return None


def _setting_from_environment() -> tuple[bool, bool]:
    """(:data:`ONEDNN`, :data:`PACK_WEIGHTS`) from ``DSPARK_CPU_LINEAR``."""
    choice = os.environ.get("DSPARK_CPU_LINEAR", "auto")
    if choice not in CPU_LINEAR_CHOICES:
        raise ValueError(f"DSPARK_CPU_LINEAR={choice!r} is not a choice: {', '.join(CPU_LINEAR_CHOICES)}")
    if choice == "auto":
        choice = "onednn" if cpu_vendor() == "AuthenticAMD" else "blas"
    onednn = choice != "blas" and torch.backends.mkldnn.is_available()
    return onednn, onednn and choice == "onednn"


#: whether CPU float32 inference projections run on oneDNN (see the module docstring)
#: and whether oneDNN multiplies by its packed copies of the weights (:func:`packed_weight`)
ONEDNN, PACK_WEIGHTS = _setting_from_environment()

#: the batch size oneDNN is told to expect when it packs a weight: any hint above one gave the same
#: fast layout for 1 to 150 rows here; a hint of one gives the plain layout's slow path
PACK_HINT = 64

# (data_ptr, shape, strides) of a weight → (its storage, weakly; its version when packed; the copy)
_packed: dict[tuple, tuple[StorageWeakRef, int, torch.Tensor]] = {}


def pack(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of ``weight`` ``[out, in]`` (an opaque ``torch._mkldnn`` tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_HINT)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The packed copy of ``weight`` ``[out, in]`` to multiply by: made by :func:`pack` on first
    use, remade once the weight has changed in place (its version counter moved) or its storage
    was freed (a new tensor at the same address); ``weight`` itself when :data:`PACK_WEIGHTS` is
    off or the weight is an inference tensor (it has no version counter to watch).

    A change that bypasses the version counter — writing through ``weight.data`` — is not seen:
    call :func:`forget_packed_weights` after one."""
    if not PACK_WEIGHTS or weight.is_inference():
        return weight
    key = (weight.data_ptr(), weight.shape, weight.stride())
    entry = _packed.get(key)
    if entry is not None and not entry[0].expired() and entry[1] == weight._version:
        return entry[2]
    for stale in [k for k, (storage, _, _) in list(_packed.items()) if storage.expired()]:
        _packed.pop(stale, None)
    packed = pack(weight)
    _packed[key] = (StorageWeakRef(weight.untyped_storage()), weight._version, packed)
    return packed


def forget_packed_weights() -> None:
    """Drop every packed copy (each is made again on its weight's next use)."""
    _packed.clear()


def _onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The one call to oneDNN, eager or inside :func:`onednn_linear`: by the packed copy of ``weight``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), bias, "none", [], "")


@torch.library.custom_op("dspark::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN's inner product: x ``[..., in]``, weight ``[out, in]`` → ``[..., out]``."""
    return _onednn_product(x, weight, bias)


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not (ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32):
        return False
    if x.dim() < 2 or weight.dim() != 2 or not weight.is_contiguous():
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.dim() != 1):
        return False
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    return not (needs_grad and torch.is_grad_enabled())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x ``[..., in]``, weight ``[out, in]``, bias ``[out]`` → ``[..., out]``,
    on oneDNN where that is faster and equal up to rounding (module docstring)."""
    if not _takes_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return onednn_linear(x, weight, bias)
    return _onednn_product(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (same parameters, same state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
