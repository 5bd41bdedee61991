"""The KV cache interface: per-request lengths, writes at per-request positions, O(1) rollback."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from dspark.registry import Registry


class CacheCapacityError(RuntimeError):
    """A forward would write past the cache's capacity."""


@dataclass
class CacheConfig:
    """Config section ``cache``.

    Attributes:
        name: registered cache class (``static``).
        _target_: dotted path of a user's :class:`KVCache` subclass (wins over ``name``).
        max_len: capacity in tokens per request; ``None`` sizes the cache for each ``generate`` call
            (longest prompt + ``max_new_tokens`` + one round of lookahead), capped by the target's
            ``max_position_embeddings``.
    """

    name: str = "static"
    _target_: str | None = None
    max_len: int | None = None


class KVCache(ABC):
    """Keys and values of every attention layer for a batch of requests, with per-request lengths.

    The cache holds ``lengths[b]`` valid positions for request ``b``. A model forward over new
    tokens appends them and advances the lengths; rejected tokens are dropped by :meth:`rollback`,
    which only moves lengths back (no copies): whatever lies past ``lengths[b]`` is garbage that
    later writes overwrite. How keys and values are stored is the subclass's business
    (:class:`~dspark.cache.StaticKVCache` for native models).
    """

    config_class = CacheConfig
    lengths: torch.Tensor  # [B] int64

    @classmethod
    @abstractmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> "KVCache":
        """An empty cache shaped for ``model`` (a dspark model), ``batch_size`` requests and ``max_len`` positions."""

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """B."""

    @property
    @abstractmethod
    def max_len(self) -> int:
        """Capacity in positions per request."""

    @abstractmethod
    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Set every request's length (``[B]`` int64, each ≤ its current length): a rollback."""

    def rollback(self, num_tokens: torch.Tensor) -> None:
        """Forget each request's last ``num_tokens[b]`` positions (``[B]`` int64)."""
        self.set_lengths(self.lengths - num_tokens)

    def reset(self) -> None:
        """Forget everything (lengths to zero)."""
        self.set_lengths(torch.zeros_like(self.lengths))

    def copy_rows(self, source: torch.Tensor, target: torch.Tensor, positions: int) -> None:
        """Make rows ``target`` ``[k]`` copies of rows ``source`` ``[k]``: their first ``positions``
        keys and values, and their lengths (requests of one prompt then share its prefill). A cache
        class without it prefills every request itself."""
        raise NotImplementedError(f"{type(self).__name__} cannot copy rows")

    def rows(self, index: torch.Tensor) -> "KVCache":
        """A cache over the requests ``index`` ``[k]`` alone whose writes land in this cache's rows
        (continuous batching prefills newly admitted requests through it). A cache class without
        row views decodes in static batches (:attr:`~dspark.engine.EngineConfig.batching`)."""
        raise NotImplementedError(f"{type(self).__name__} has no row views")

    def head(self, rows: int) -> "KVCache":
        """The first ``rows`` requests as a cache of their own, sharing this one's memory: what a
        forward writes and rolls back lands here. Rounds run over a batch's occupied slots alone
        through it (:attr:`~dspark.engine.EngineConfig.trim_idle_slots`); a cache class without it
        runs every round over all its rows."""
        raise NotImplementedError(f"{type(self).__name__} has no head views")

    def check_capacity(self, needed: int) -> None:
        """Raise :class:`CacheCapacityError` unless ``needed`` positions per request fit."""
        if needed > self.max_len:
            raise CacheCapacityError(
                f"KV cache overflow: this forward needs {needed} positions per request but the cache holds "
                f"{self.max_len}; raise cache.max_len or lower max_new_tokens / the prompt length"
            )


CACHES: Registry = Registry("cache", KVCache)
register_cache = CACHES.register
