"""A preallocated KV cache in the gpt-fast style: no allocation per step, rollback by lengths."""

from __future__ import annotations

import torch

from dspark.cache.base import KVCache, register_cache


@register_cache("static")
class StaticKVCache(KVCache):
    """Keys and values preallocated as one buffer ``[layers, B, 2, H_kv, max_len, D]``.

    ``keys`` and ``values`` are its views ``[layers, B, H_kv, max_len, D]``; one indexed write per
    layer stores both.

    Args:
        num_layers, batch_size, num_kv_heads, max_len, head_dim: the buffer shape.
        dtype, device: of the buffers.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if min(num_layers, batch_size, num_kv_heads, max_len, head_dim) < 1:
            raise ValueError(
                f"StaticKVCache dimensions must be >= 1, got layers={num_layers} batch={batch_size} "
                f"kv_heads={num_kv_heads} max_len={max_len} head_dim={head_dim}"
            )
        # normal tensors whichever mode makes the cache: a compiled forward guards on its inputs'
        # dispatch keys, and the target's and the draft model's caches (one forward's code) are made
        # in and out of inference mode — each graph would otherwise be compiled twice
        with torch.inference_mode(False):
            # zeros, not empty: masked-out garbage must still be finite so softmax never sees NaN * 0
            self.buffer = torch.zeros(num_layers, batch_size, 2, num_kv_heads, max_len, head_dim, dtype=dtype,
                                      device=device)
            self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
            self._rows = torch.arange(batch_size, device=device)
            self._layer_ids = torch.arange(num_layers, device=device)
        self._heads: dict[int, StaticKVCache] = {}

    @property
    def keys(self) -> torch.Tensor:
        """``[layers, B, H_kv, max_len, D]`` view of the buffer."""
        return self.buffer[:, :, 0]

    @property
    def values(self) -> torch.Tensor:
        """``[layers, B, H_kv, max_len, D]`` view of the buffer."""
        return self.buffer[:, :, 1]

    @property
    def batch_size(self) -> int:
        return self.buffer.shape[1]

    @property
    def max_len(self) -> int:
        return self.buffer.shape[4]

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> "StaticKVCache":
        """Needs a native model (one exposing ``cache_shape()``: layers, kv heads, head dim)."""
        if not hasattr(model, "cache_shape"):
            raise TypeError(f"the static KV cache needs a native dspark model; {type(model).__name__} "
                            "uses cache.name=hf_dynamic")
        num_layers, num_kv_heads, head_dim = model.cache_shape()
        return cls(num_layers, batch_size, num_kv_heads, max_len, head_dim, dtype=model.dtype, device=model.device)

    def set_lengths(self, lengths: torch.Tensor) -> None:
        self.lengths.copy_(lengths)

    def advance(self, num_new: torch.Tensor) -> None:
        """``lengths += num_new`` (``[B]`` int64): commit the tokens just written."""
        self.lengths += num_new

    def write(self, layer: int, keys_values: torch.Tensor, positions: torch.Tensor,
              kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values ``[B, T, 2, H_kv, D]`` of ``layer`` at ``positions`` ``[B, T]``
        (always ``lengths[:, None] + arange(T)``, computed once per forward by the model).

        Returns the keys and values of positions ``[0, kv_len)``, each ``[B, H_kv, kv_len, D]``; the
        caller masks what a request has not written. Padding tokens are written past the length too
        (the caller guarantees ``max(lengths) + T ≤ kv_len ≤ max_len``) and are never committed.
        """
        # Indexing dims 0, 1 and 4 of [L, B, 2, H, S, D] puts the indexed dims first: [B, T, 2, H, D].
        # The write goes to the whole buffer, and the returned views are taken from it alone: under
        # torch.compile, a write into a view of the buffer (or a read through a second tensor aliasing
        # it) made inductor copy the layer's whole cache twice per forward — at batch 32 on the CPU
        # that was two thirds of a decoding step.
        self.buffer[self._layer_ids[layer:layer + 1], self._rows.unsqueeze(1), :, :, positions] = keys_values
        return self.buffer[layer, :, 0, :, :kv_len], self.buffer[layer, :, 1, :, :kv_len]

    def copy_rows(self, source: torch.Tensor, target: torch.Tensor, positions: int) -> None:
        """Rows ``target`` ``[k]`` become copies of rows ``source`` ``[k]`` over their first
        ``positions`` positions, lengths included."""
        self.buffer[:, target, :, :, :positions] = self.buffer[:, source, :, :, :positions]
        self.lengths[target] = self.lengths[source]

    def head(self, rows: int) -> "StaticKVCache":
        """The first ``rows`` rows as a :class:`StaticKVCache` whose buffer and lengths are views of
        this one's (writes, advances and rollbacks land here; no copy). One object per size, made
        once: compiled forwards see the same cache object for a size every round."""
        if not 1 <= rows <= self.batch_size:
            raise ValueError(f"a head of {rows} rows of a cache of {self.batch_size} rows (1..{self.batch_size})")
        if rows == self.batch_size:
            return self
        view = self._heads.get(rows)
        if view is None:
            view = self._heads[rows] = object.__new__(StaticKVCache)
            view.buffer, view.lengths = self.buffer[:, :rows], self.lengths[:rows]
            view._rows, view._layer_ids, view._heads = self._rows[:rows], self._layer_ids, {}
        return view

    def rows(self, index: torch.Tensor) -> "StaticCacheRows":
        """A cache over the requests ``index`` ``[k]`` (int64, distinct) alone, written through into
        this one: a forward over new requests' prompts fills their rows while the other requests'
        rows stay as they are (continuous batching admits requests this way)."""
        return StaticCacheRows(self, index)


class StaticCacheRows(KVCache):
    """Rows ``index`` of a :class:`StaticKVCache` as a cache of their own (:meth:`StaticKVCache.rows`).

    Writes and lengths go straight to the parent's buffer and lengths; what :meth:`write` returns
    is a copy of those rows' keys and values (gathered: fine for a prefill, not meant for the
    rounds' forwards, which run over the whole cache)."""

    def __init__(self, parent: StaticKVCache, index: torch.Tensor):
        self.parent, self.index = parent, index
        self.lengths = parent.lengths[index]

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int):
        raise TypeError("a StaticCacheRows is made by StaticKVCache.rows(index), not for a model")

    @property
    def batch_size(self) -> int:
        return self.index.shape[0]

    @property
    def max_len(self) -> int:
        return self.parent.max_len

    def set_lengths(self, lengths: torch.Tensor) -> None:
        self.lengths = lengths.clone()
        self.parent.lengths[self.index] = lengths

    def advance(self, num_new: torch.Tensor) -> None:
        """``lengths += num_new`` (``[k]`` int64), here and in the parent's rows."""
        self.set_lengths(self.lengths + num_new)

    def write(self, layer: int, keys_values: torch.Tensor, positions: torch.Tensor,
              kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`StaticKVCache.write`, for these rows: ``keys_values`` ``[k, T, 2, H_kv, D]``."""
        buffer = self.parent.buffer
        buffer[layer, self.index.unsqueeze(1), :, :, positions] = keys_values
        rows = buffer[layer, self.index, :, :, :kv_len]  # [k, 2, H_kv, kv_len, D]
        return rows[:, 0], rows[:, 1]
