"""A thread-safe map of at most `limit` entries, the oldest dropped first: what a process remembers of objects
that never change once made (a snapshot's size), so that it asks once instead of on every use."""

from __future__ import annotations

import threading
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedMap(Generic[K, V]):
    def __init__(self, limit: int = 4096):
        self._limit = limit
        self._items: dict[K, V] = {}
        self._lock = threading.Lock()

    def remember(self, key: K, value: V) -> None:
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = value
            while len(self._items) > self._limit:
                self._items.pop(next(iter(self._items)))

    def get(self, key: K) -> V | None:
        with self._lock:
            return self._items.get(key)

    def forget(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)
