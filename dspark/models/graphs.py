"""CUDA-graph replay of a model's round forward over a static KV cache.

A decoding round of a small batch is dominated by kernel-launch overhead on a GPU. Capturing the
target's verification forward once per shape and replaying it removes that overhead. Shapes are
bucketed: the batch is fixed by the cache, the number of new tokens per request is padded up to
one of a few widths (padding tokens are written past each request's length and never committed,
as in any ragged forward). The forward reads the whole cache (``kv_len = cache.max_len``), so
one graph serves every round of a ``generate`` call.

Graphs read and write fixed memory: the inputs are copied into static buffers before each replay
and the outputs are the same tensors every time, overwritten by the next replay — consume them
before calling again (the engine's round does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dspark.records import ModelOutput

#: ``capture(fn) -> (replay, output)``: run ``fn`` under capture, return a replay callable and the
#: output tensors that every replay overwrites
Capture = Callable[[Callable[[], ModelOutput]], tuple[Callable[[], None], ModelOutput]]


def cuda_graph_capture(fn: Callable[[], ModelOutput], pool=None) -> tuple[Callable[[], None], ModelOutput]:
    """Warm ``fn`` up on a side stream (allocator, cuBLAS workspaces), then capture it in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn()
    return graph.replay, output


def graph_widths(max_width: int) -> tuple[int, ...]:
    """Bucket widths for forwards of up to ``max_width`` new tokens: powers of two below it, and it.

    The largest bucket is ``max_width`` itself, so padding never writes past what the engine
    reserves in the cache (one round of lookahead, γ + 1)."""
    if max_width < 1:
        raise ValueError(f"graph bucket width must be >= 1, got {max_width}")
    return tuple(sorted({1 << i for i in range(max_width.bit_length()) if 1 << i < max_width} | {max_width}))


@dataclass
class _Graph:
    input_ids: torch.Tensor  # [B, width] static input
    num_new: torch.Tensor  # [B] static input
    replay: Callable[[], None]
    output: ModelOutput  # static output


class GraphedForward:
    """Drop-in for a dspark model's ``forward(input_ids, cache, num_new, *, hidden_layers, kv_len)``
    during rounds: replays a captured graph per (batch, width bucket, hidden layers).

    Args:
        model: a dspark model (or its compiled forward) with the native forward signature.
        max_width: the widest forward a round makes (γ + 1); buckets are :func:`graph_widths`.
        capture: how to capture (default :func:`cuda_graph_capture`; tests on CPU pass an eager
            stand-in with the same static-buffer semantics).
    """

    def __init__(self, model, max_width: int, *, capture: Capture | None = None):
        self.model = model
        self.widths = graph_widths(max_width)
        self._capture = capture or self._cuda_capture
        self._pool = None
        self._cache = None
        self._graphs: dict[tuple, _Graph] = {}

    def _cuda_capture(self, fn):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every bucket
        return cuda_graph_capture(fn, self._pool)

    @property
    def num_graphs(self) -> int:
        """Graphs captured for the current cache."""
        return len(self._graphs)

    def __call__(self, input_ids: torch.Tensor, cache, num_new: torch.Tensor, *, hidden_layers: tuple[int, ...] = (),
                 kv_len: int | None = None) -> ModelOutput:
        batch, width = input_ids.shape
        if kv_len is not None and kv_len != cache.max_len:
            raise ValueError(f"graphed forwards read the whole cache: kv_len must be cache.max_len ({cache.max_len}), "
                             f"got {kv_len}")
        if width > self.widths[-1]:
            raise ValueError(f"a forward of {width} new tokens is wider than the widest graph ({self.widths[-1]})")
        if cache is not self._cache:  # a new cache (new batch size or length): old graphs point at old buffers
            self._cache, self._graphs = cache, {}
        bucket = next(w for w in self.widths if w >= width)
        key = (batch, bucket, tuple(hidden_layers))
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture_graph(cache, batch, bucket, tuple(hidden_layers),
                                                            input_ids.device)
        graph.input_ids[:, :width].copy_(input_ids)
        graph.input_ids[:, width:].zero_()
        graph.num_new.copy_(num_new)
        graph.replay()
        out = graph.output
        return ModelOutput(logits=out.logits[:, :width], hidden_states=[h[:, :width] for h in out.hidden_states])

    def _capture_graph(self, cache, batch: int, width: int, hidden_layers: tuple[int, ...], device) -> _Graph:
        input_ids = torch.zeros(batch, width, dtype=torch.long, device=device)
        num_new = torch.zeros(batch, dtype=torch.long, device=device)  # 0: capture commits nothing
        lengths = cache.lengths.clone()

        def forward() -> ModelOutput:
            return self.model(input_ids, cache, num_new, hidden_layers=hidden_layers, kv_len=cache.max_len)

        replay, output = self._capture(forward)
        cache.set_lengths(lengths)  # warm-up and capture wrote only past the lengths
        return _Graph(input_ids, num_new, replay, output)


class GraphedFunction:
    """Replays a captured graph of ``fn(*args)`` per distinct (tensor shapes, other arguments).

    Tensor arguments (and lists or tuples of tensors) are copied into the graph's static inputs
    before each replay; every other argument is part of the key (it must be hashable). The result
    — a tensor, ``None``, or a tuple of them — is the graph's static output, overwritten by the
    next replay. Drafters use it for their own forwards (``engine.cuda_graphs``).

    Capturing runs ``fn`` more than once (warm-up, then capture; the CPU stand-in runs it at
    capture and replays it). A function that updates state in place — a cache's lengths — names
    those tensors in ``preserve``: they are restored after the capture, so the first call, like
    every later one, updates them once.

    The sampling settings are part of a drafter's key, so calls with many different settings
    would capture without end: at most ``max_graphs`` are kept, the least recently used dropped
    (its memory goes back to the pool) and captured again if it comes back.

    Args:
        fn: the function to capture (it may read and write other fixed buffers, e.g. a cache).
        capture: as for :class:`GraphedForward`.
        preserve: returns the tensors ``fn`` updates in place (read at each capture).
        max_graphs: graphs kept at most.
    """

    def __init__(self, fn: Callable, *, capture: Capture | None = None,
                 preserve: Callable[[], list[torch.Tensor]] | None = None, max_graphs: int = 32):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.fn = fn
        self._capture = capture
        self._preserve = preserve
        self.max_graphs = max_graphs
        self._pool = None
        self._graphs: dict[tuple, tuple[list, Callable[[], None], object]] = {}  # least recently used first

    @property
    def num_graphs(self) -> int:
        """Graphs captured so far."""
        return len(self._graphs)

    def clear(self) -> None:
        """Forget every graph (call when the buffers the function reads are reallocated)."""
        self._graphs = {}

    def __call__(self, *args):
        key = _key(args)
        entry = self._graphs.pop(key, None)  # re-inserted below: the dict's order is the recency
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                del self._graphs[next(iter(self._graphs))]
            static = _clone(args)
            if self._capture is None and self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            capture = self._capture or (lambda fn: cuda_graph_capture(fn, self._pool))
            preserved = self._preserve() if self._preserve else []
            saved = [t.clone() for t in preserved]
            replay, output = capture(lambda: self.fn(*static))
            for tensor, value in zip(preserved, saved):
                tensor.copy_(value)
            entry = (static, replay, output)
        self._graphs[key] = entry
        static, replay, output = entry
        _copy_into(static, args)
        replay()
        return output


def _key(value):
    """A graph's key part: shapes, dtypes and devices of tensors (in lists and tuples too), else the value."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype, value.device
    if isinstance(value, (list, tuple)):
        return tuple(_key(v) for v in value)
    return value


def _clone(value):
    """Static inputs: a clone of each tensor (in lists and tuples too); other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _copy_into(static, value) -> None:
    """Copy ``value``'s tensors into the static inputs ``static`` (the same structure)."""
    if isinstance(static, torch.Tensor):
        static.copy_(value)
    elif isinstance(static, (list, tuple)):
        for s, v in zip(static, value):
            _copy_into(s, v)


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a forward's output (a ModelOutput, a tensor, or a tuple / list with ``None``s)."""
    if isinstance(output, ModelOutput):
        return [output.logits, *output.hidden_states]
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def eager_capture(fn: Callable[[], object]) -> tuple[Callable[[], None], object]:
    """A CPU stand-in for :func:`cuda_graph_capture` with the same contract: replays rerun ``fn`` and
    overwrite the first call's output tensors in place (what a graph's static outputs do)."""
    output = fn()

    def replay() -> None:
        for static, new in zip(_tensors(output), _tensors(fn())):
            static.copy_(new)

    return replay, output
