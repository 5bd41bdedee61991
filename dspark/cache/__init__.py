"""KV caches: the :class:`KVCache` interface and the preallocated :class:`StaticKVCache`."""

from dspark.cache.base import CACHES, CacheCapacityError, CacheConfig, KVCache, register_cache
from dspark.cache.static import StaticCacheRows, StaticKVCache

__all__ = ["CACHES", "CacheCapacityError", "CacheConfig", "KVCache", "StaticCacheRows", "StaticKVCache", "register_cache"]
