"""The one place that chooses between a Triton kernel and its plain-torch twin.

Every op in :mod:`dspark.kernels` exists twice with the same signature: in
:mod:`dspark.kernels.reference` (torch, runs anywhere) and in the ``triton_*`` modules (Triton,
CUDA, or the CPU under ``TRITON_INTERPRET=1``). Call sites import the op from
:mod:`dspark.kernels` and never branch on Triton themselves; this module picks, per call, from
the device of the op's first tensor and the backend setting:

* ``auto`` (default) — Triton on CUDA tensors when Triton is installed, the twin elsewhere;
* ``torch`` — always the twin;
* ``triton`` — always the kernel (on CPU tensors this needs ``TRITON_INTERPRET=1`` set before the
  first kernel module is imported; the tests do this).

Set it with the environment variable ``DSPARK_KERNELS`` or, in code, :func:`use_backend`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

BACKENDS = ("auto", "torch", "triton")

# op name → module (under dspark.kernels) holding its Triton implementation
TRITON_MODULES = {
    "verify_chain": "triton_verify",
    "verify_greedy": "triton_verify",
    "commit_tokens": "triton_commit",
    "gather_accepted_kv": "triton_commit",
}


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}; got {name!r} "
                         "(from DSPARK_KERNELS or use_backend)")
    return name


_backend = _checked(os.environ.get("DSPARK_KERNELS", "auto"))


def get_backend() -> str:
    """The current setting: ``auto``, ``torch`` or ``triton``."""
    return _backend


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, every op uses backend ``name`` (``auto``, ``torch`` or ``triton``)."""
    global _backend
    previous, _backend = _backend, _checked(name)
    try:
        yield
    finally:
        _backend = previous


def triton_available() -> bool:
    """Triton is importable (it is a dependency on Linux x86-64; elsewhere it may be missing)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton kernels run in the interpreter (on CPU tensors) rather than compiled for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_for(device: torch.device | str) -> str:
    """Which implementation an op on ``device`` runs now: ``torch`` or ``triton``."""
    device = torch.device(device)
    if _backend == "torch":
        return "torch"
    if _backend == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend 'triton' was requested but Triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(f"kernel backend 'triton' on a {device.type} tensor needs TRITON_INTERPRET=1 "
                               "(set before the first kernel is imported) or a CUDA device")
        return "triton"
    return "triton" if device.type == "cuda" and triton_available() else "torch"


def implementation(op: str, device: torch.device | str) -> Callable:
    """The function implementing ``op`` for tensors on ``device`` under the current backend."""
    if op not in TRITON_MODULES:
        raise KeyError(f"unknown kernel op {op!r}; ops are {', '.join(sorted(TRITON_MODULES))}")
    if backend_for(device) == "triton":
        module = importlib.import_module(f"dspark.kernels.{TRITON_MODULES[op]}")
    else:
        module = importlib.import_module("dspark.kernels.reference")
    return getattr(module, op)
