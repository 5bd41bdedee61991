"""How dspark compiles a forward (``engine.compile``): one place, used by the engine and every drafter."""

from __future__ import annotations

from typing import Callable

import torch

#: graphs per compiled function before dynamo falls back to eager (its default is 8)
RECOMPILE_LIMIT = 128


def compile_forward(fn: Callable, device) -> Callable:
    """``torch.compile`` ``fn`` with static shapes (one graph per shape; rounds read whole caches).

    On CPU, inductor's C++ wrapper calls the generated kernels from C++ rather than from Python:
    on small models, whose steps are dominated by per-kernel overhead, plain decoding of the
    embedded target ran 8–13% faster with it on this project's 2-core CPU (batch 8 / batch 1), and
    the DSpark drafter's left-to-right head (many small kernels) gained most. The first call of
    each shape compiles longer (seconds more). Other devices keep inductor's defaults.

    A speculative engine meets one shape per batch size and verify width (a scheduler or a drafter
    that stops early verifies 1..γ+1 tokens), more than dynamo's default of 8 graphs per function,
    after which it would silently run the function eagerly: the limit is raised to
    :data:`RECOMPILE_LIMIT` (process-wide, never lowered).
    """
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    options = {"cpp_wrapper": True} if torch.device(device).type == "cpu" else None
    return torch.compile(fn, dynamic=False, options=options)
