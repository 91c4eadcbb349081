"""Point maps of recent uploads, so a second question on the same video skips decode and depth."""
from __future__ import annotations

import threading
from collections import OrderedDict
from model.geometry.types import PointMaps

CacheKey = tuple[str, tuple, str]  # (content hash, sampling tuple, backend name)


def cache_key(content_hash: str, sampling: tuple, backend: str) -> CacheKey:
    """`sampling` = everything that changes the frames: the pipeline passes (sampled frame indices, (W, H))."""
    return (content_hash, tuple(sampling), backend)


class PointMapCache:
    """Thread-safe LRU bounded by bytes (point maps are large: 32 x 448 x 448 x 3 floats ~ 77 MB)."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[CacheKey, PointMaps] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: CacheKey) -> PointMaps | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: CacheKey, value: PointMaps) -> None:
        size = value.nbytes
        if size > self.max_bytes:
            return  # would evict everything and still not fit
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._items
