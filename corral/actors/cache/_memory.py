"""The memory backend, and the store under it: a cachetools cache of encoded entries, with
tags and per-entry TTL; also the interface every backend offers the manager (:class:`Backend`).

Owned by one actor, so it takes no lock (cachetools is not thread-safe)::

    store = MemoryStore("lru", max_size=2, default_ttl=None)
    store.set("a", b"\\x01", ttl=None, tags=("t",))
    store.get("a").data        # b"\\x01"
    store.invalidate_tags(["t"])
    backend = MemoryBackend("local", store)
    backend.set_many({"k": b"\\xa1v"}, ttl=None, tags=())
    backend.get("k")           # b"\\xa1v"

Strategies, i.e. what a full store evicts first:

- ``lru``: the least recently used entry (``cachetools.LRUCache``);
- ``lfu``: the least frequently used entry (``cachetools.LFUCache``);
- ``ttl``: expired entries, then the least recently used (``cachetools.TLRUCache``,
  which also drops each entry eagerly at its own expiry).

Under ``lru`` and ``lfu`` an expired entry is dropped when it is next read.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal, Protocol

from cachetools import Cache, LFUCache, LRUCache, TLRUCache

from corral.actors.cache._metrics import (
    BACKEND_ERRORS,
    DELETES,
    ENTRIES,
    EVICTIONS,
    EXPIRATIONS,
    FALLBACKS,
    HITS,
    MISSES,
    SETS,
    Counters,
)
from corral.bus import compile_glob
from corral.metrics import ManagerMetrics

__all__ = [
    "Backend",
    "Entry",
    "LocalLocks",
    "MemoryBackend",
    "MemoryStore",
    "Status",
    "backend_stats",
    "count_drops",
]

Status = Literal["healthy", "degraded", "unhealthy"]


class Entry:
    """An encoded value, when it expires (monotonic seconds; inf: never), and its tags."""

    __slots__ = ("data", "expires_at", "tags")

    def __init__(self, data: bytes, expires_at: float, tags: tuple[str, ...]) -> None:
        self.data = data
        self.expires_at = expires_at
        self.tags = tags


class MemoryStore:
    """Entries by key in a cachetools cache of ``strategy``; see the module docstring.

    ``max_ttl`` caps every entry's lifetime (an L1 in front of Redis uses it).
    """

    def __init__(
        self,
        strategy: str,
        max_size: int,
        default_ttl: float | None,
        *,
        max_ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.strategy = strategy
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.clock = clock
        self.tags: dict[str, set[str]] = {}
        self.on_dropped: Callable[[bool], None] = lambda evicted: None
        """Called for every entry the store drops by itself: ``True`` when evicted to make
        room, ``False`` when expired."""
        self.entries: Cache[str, Entry] = _make_cache(strategy, max_size, self)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> Entry | None:
        entry = self.entries.get(key)
        if entry is not None and entry.expires_at <= self.clock():
            del self.entries[key]
            self.dropped(key, entry, evicted=False)
            return None
        return entry

    def set(self, key: str, data: bytes, ttl: float | None, tags: Iterable[str] = ()) -> None:
        """Store ``data`` for ``ttl`` seconds (None: the default TTL, if any)."""
        lifetime = self.default_ttl if ttl is None else ttl
        if self.max_ttl is not None:
            lifetime = self.max_ttl if lifetime is None else min(lifetime, self.max_ttl)
        expires_at = math.inf if lifetime is None else self.clock() + lifetime
        self.delete(key)  # its old tags go with it
        entry = Entry(data, expires_at, tuple(tags))
        self.entries[key] = entry
        for tag in entry.tags:
            self.tags.setdefault(tag, set()).add(key)

    def delete(self, key: str) -> bool:
        entry = self.entries.pop(key, None)
        if entry is None:
            return False
        self._untag(key, entry)
        return True

    def invalidate(self, pattern: str) -> int:
        """Drop the keys matching a Redis glob ``pattern``; return how many."""
        return self._delete_all(_matching(pattern, list(self.entries.keys())))

    def invalidate_tags(self, tags: Iterable[str]) -> int:
        keys: set[str] = set()
        for tag in tags:
            keys.update(self.tags.pop(tag, ()))
        return self._delete_all(keys)

    def clear(self) -> int:
        count = len(self.entries)
        self.entries.clear()
        self.tags.clear()
        return count

    def dropped(self, key: str, entry: Entry, *, evicted: bool) -> None:
        """Called for every entry the cache itself dropped: evicted, or expired."""
        self.on_dropped(evicted)
        self._untag(key, entry)

    def _delete_all(self, keys: Iterable[str]) -> int:
        return sum(self.delete(key) for key in keys)

    def _untag(self, key: str, entry: Entry) -> None:
        for tag in entry.tags:
            members = self.tags.get(tag)
            if members is not None:
                members.discard(key)
                if not members:
                    del self.tags[tag]


def _matching(pattern: str, keys: list[str]) -> list[str]:
    regex: re.Pattern[str] = compile_glob(pattern)
    return [k for k in keys if regex.match(k if k.isascii() else k.encode().decode("latin-1"))]


class _ReportsEvictions(Cache[str, Entry]):
    """Tells its store about every entry the cache's policy evicts."""

    def __init__(self, *args: Any, owner: MemoryStore, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = owner

    def popitem(self) -> tuple[str, Entry]:
        key, entry = super().popitem()
        self.owner.dropped(key, entry, evicted=True)
        return key, entry


class _LRU(_ReportsEvictions, LRUCache[str, Entry]):
    pass


class _LFU(_ReportsEvictions, LFUCache[str, Entry]):
    pass


class _TLRU(_ReportsEvictions, TLRUCache[str, Entry]):
    def expire(self, time: Any = None) -> list[tuple[str, Entry]]:
        expired: list[tuple[str, Entry]] = list(super().expire(time))
        for key, entry in expired:
            self.owner.dropped(key, entry, evicted=False)
        return expired


def _expiry(_key: str, entry: Entry, _now: float) -> float:
    return entry.expires_at


def _make_cache(strategy: str, max_size: int, owner: MemoryStore) -> Cache[str, Entry]:
    if strategy == "lfu":
        return _LFU(max_size, owner=owner)
    if strategy == "ttl":
        return _TLRU(max_size, ttu=_expiry, timer=owner.clock, owner=owner)
    return _LRU(max_size, owner=owner)


class LocalLocks:
    """Named locks of one process, with a fencing counter per name that only grows::

    locks = LocalLocks()
    locks.lock("report", 30.0)         # (1, 0.0): taken, token 1
    locks.lock("report", 30.0)         # (0, 30.0): held for 30 s more
    locks.unlock("report", 1)          # True
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.held: dict[str, tuple[int, float]] = {}
        """The holder's token and when its lock expires, by name."""
        self.fences: dict[str, int] = {}

    def lock(self, name: str, ttl: float) -> tuple[int, float]:
        now = self.clock()
        holder = self.held.get(name)
        if holder is not None and holder[1] > now:
            return 0, holder[1] - now
        token = self.fences[name] = self.fences.get(name, 0) + 1
        self.held[name] = (token, now + ttl)
        return token, 0.0

    def unlock(self, name: str, token: int) -> bool:
        if not self._holds(name, token):
            return False
        del self.held[name]
        return True

    def extend(self, name: str, token: int, ttl: float) -> bool:
        if not self._holds(name, token):
            return False
        self.held[name] = (token, self.clock() + ttl)
        return True

    def _holds(self, name: str, token: int) -> bool:
        holder = self.held.get(name)
        return holder is not None and holder[0] == token and holder[1] > self.clock()


class Backend(Protocol):
    """What the manager asks of a backend; every method may raise BackendUnavailable."""

    name: str
    kind: str

    def get(self, key: str) -> bytes | None: ...
    def get_many(self, keys: list[str]) -> dict[str, bytes]: ...
    def set_many(self, items: dict[str, bytes], ttl: float | None, tags: Iterable[str]) -> None: ...
    def delete(self, key: str) -> bool: ...
    def exists(self, key: str) -> bool: ...
    def clear(self) -> int: ...
    def invalidate(self, pattern: str) -> int: ...
    def invalidate_tags(self, tags: list[str]) -> int: ...
    def lock(self, name: str, ttl: float) -> tuple[int, float]: ...
    def unlock(self, name: str, token: int) -> bool: ...
    def extend_lock(self, name: str, token: int, ttl: float) -> bool: ...
    def status(self) -> tuple[Status, dict[str, Any]]: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def backend_stats(kind: str, counters: Counters, store: MemoryStore | None) -> dict[str, Any]:
    """The figures every backend reports in ``CacheStats`` (``store``: its local one)."""
    hits, misses = counters.value(HITS), counters.value(MISSES)
    size = len(store) if store is not None else 0
    counters.metrics.set(ENTRIES, size, counters.backend)
    return {
        "type": kind,
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "sets": counters.value(SETS),
        "deletes": counters.value(DELETES),
        "evictions": counters.value(EVICTIONS),
        "expirations": counters.value(EXPIRATIONS),
        "errors": counters.value(BACKEND_ERRORS),
        "fallbacks": counters.value(FALLBACKS),
        "size": size,
    }


def count_drops(store: MemoryStore, counters: Counters) -> None:
    """Count what ``store`` drops by itself (evictions, expirations) in ``counters``."""
    store.on_dropped = lambda evicted: counters.add(EVICTIONS if evicted else EXPIRATIONS)


class MemoryBackend:
    """A :class:`MemoryStore` behind the backend interface."""

    kind = "memory"

    def __init__(self, name: str, store: MemoryStore, counters: Counters | None = None) -> None:
        self.name = name
        self.store = store
        self.counters = counters or Counters(ManagerMetrics(), name)
        self.locks = LocalLocks(store.clock)
        count_drops(store, self.counters)

    def get(self, key: str) -> bytes | None:
        entry = self.store.get(key)
        if entry is None:
            self.counters.add(MISSES)
            return None
        self.counters.add(HITS)
        return entry.data

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        found = {}
        for key in keys:
            data = self.get(key)
            if data is not None:
                found[key] = data
        return found

    def set_many(self, items: dict[str, bytes], ttl: float | None, tags: Iterable[str]) -> None:
        tags = tuple(tags)
        for key, data in items.items():
            self.store.set(key, data, ttl, tags)
        self.counters.add(SETS, len(items))

    def delete(self, key: str) -> bool:
        deleted = self.store.delete(key)
        self.counters.add(DELETES, deleted)
        return deleted

    def exists(self, key: str) -> bool:
        return self.store.get(key) is not None

    def clear(self) -> int:
        count = self.store.clear()
        self.counters.add(DELETES, count)
        return count

    def invalidate(self, pattern: str) -> int:
        count = self.store.invalidate(pattern)
        self.counters.add(DELETES, count)
        return count

    def invalidate_tags(self, tags: list[str]) -> int:
        count = self.store.invalidate_tags(tags)
        self.counters.add(DELETES, count)
        return count

    def lock(self, name: str, ttl: float) -> tuple[int, float]:
        return self.locks.lock(name, ttl)

    def unlock(self, name: str, token: int) -> bool:
        return self.locks.unlock(name, token)

    def extend_lock(self, name: str, token: int, ttl: float) -> bool:
        return self.locks.extend(name, token, ttl)

    def status(self) -> tuple[Status, dict[str, Any]]:
        return "healthy", {"type": self.kind, "strategy": self.store.strategy}

    def stats(self) -> dict[str, Any]:
        return backend_stats(self.kind, self.counters, self.store)

    def close(self) -> None:
        self.store.clear()
