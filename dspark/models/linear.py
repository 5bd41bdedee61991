"""The projection every native model and drafter layer uses: ``F.linear``, through oneDNN on a CPU.

On a CPU, ``F.linear`` in float32 runs on torch's BLAS (MKL in the official wheels). oneDNN's
inner product — the library torch already ships for its CPU convolutions — computes the same
product from the same ``[out, in]`` weight, without copying or repacking it, and on this
project's AMD EPYC machine ran the embedded target's 25 projections 1.4× (one token) to 2.3× (a
prefill chunk) faster than MKL: a decode step of the compiled target fell from ~2.0 to ~1.4 ms
and a verify forward of 8 tokens from ~2.7 to ~2.0 ms (medians, each library in its own process),
and decoding ran 1.35–1.41× faster with every drafter (``python benchmarks/cpu_linear.py``;
docs/benchmarks.md). MKL is known to take slow paths on AMD processors.

The oneDNN path is taken only where it computes what ``F.linear`` computes, up to float32
rounding: a CPU tensor, float32 input and weight, a 2-D contiguous weight, an input of at least
2 dimensions, and no autograd (training a drafter's own layers takes ``F.linear``, as does every
other device and dtype — float64 tests compare against exact references). ``DSPARK_CPU_LINEAR=blas``
in the environment (read at import), or :data:`ONEDNN` set to ``False``, keeps ``F.linear``
everywhere; a compiled function keeps the choice it was traced with (dynamo guards on it).

Inside ``torch.compile`` the product is the opaque op ``dspark::onednn_linear``: inductor lowers
oneDNN's op itself only for frozen (constant) weights, which would copy every weight into every
compiled graph.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

CPU_LINEAR_CHOICES = ("onednn", "blas")


def _setting_from_environment() -> bool:
    choice = os.environ.get("DSPARK_CPU_LINEAR", "onednn")
    if choice not in CPU_LINEAR_CHOICES:
        raise ValueError(f"DSPARK_CPU_LINEAR={choice!r} is not a choice: {' or '.join(CPU_LINEAR_CHOICES)}")
    return choice == "onednn" and torch.backends.mkldnn.is_available()


#: whether CPU float32 inference projections run on oneDNN (see the module docstring)
ONEDNN = _setting_from_environment()


@torch.library.custom_op("dspark::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN's inner product: x ``[..., in]``, weight ``[out, in]`` → ``[..., out]``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


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
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (same parameters, same state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
