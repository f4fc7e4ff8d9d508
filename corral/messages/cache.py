"""Messages of the ``cache`` manager: get/set/delete, invalidation, statistics, leases.

Keys are strings, values any msgpack value; ``backend`` names one of the
manager's configured backends ("" is the default one)::

    system.ask(CacheSet(key="user:42", value={"name": "Ada"}, ttl=60, tags=["users"]))
    reply = system.ask(CacheGet(key="user:42"))
    if reply.found:
        print(reply.value)
    system.ask(CacheInvalidate(pattern="user:*"))

Stampede protection: ``CacheGetOrLease`` answers with the value, or grants the
caller a lease to compute it (then ``CacheSet(..., lease=reply.lease)``), or,
while another caller holds the lease, answers only once that value is set (or
the lease passes to this caller when the holder never comes back, or it times
out with ``corral.errors.Timeout`` after ``wait`` seconds).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from corral.messages.base import Count, Event, Reply, Request, TimeLimit, Ttl, message

__all__ = [
    "CacheClear",
    "CacheDelete",
    "CacheDeleted",
    "CacheExists",
    "CacheGet",
    "CacheGetMany",
    "CacheGetOrLease",
    "CacheInvalidate",
    "CacheInvalidateTags",
    "CacheInvalidated",
    "CacheLease",
    "CacheLeaseEnded",
    "CachePresence",
    "CacheRelease",
    "CacheReleased",
    "CacheSet",
    "CacheSetMany",
    "CacheStatistics",
    "CacheStats",
    "CacheStored",
    "CacheValue",
    "CacheValues",
]


# -- replies ----------------------------------------------------------------------------


@message("cache.value")
class CacheValue(Reply):
    """A looked-up key: ``found`` tells a miss from a stored ``None``."""

    key: str
    found: bool
    value: Any = None


@message("cache.values")
class CacheValues(Reply):
    """The keys that were found, with their values (missing keys are absent)."""

    values: dict[str, Any]


@message("cache.stored")
class CacheStored(Reply):
    count: Count


@message("cache.deleted")
class CacheDeleted(Reply):
    """How many keys a delete, clear or invalidation removed (on the backend asked)."""

    count: Count


@message("cache.presence")
class CachePresence(Reply):
    key: str
    exists: bool


@message("cache.statistics")
class CacheStatistics(Reply):
    """Counters per backend and summed: hits, misses, hit_rate, sets, deletes, evictions, ..."""

    backends: dict[str, dict[str, Any]]
    total: dict[str, Any]


@message("cache.lease")
class CacheLease(Reply):
    """The value (``found``), or a lease to compute it (``lease`` is its token)."""

    key: str
    found: bool
    value: Any = None
    lease: str = ""


@message("cache.released")
class CacheReleased(Reply):
    released: bool


# -- requests ---------------------------------------------------------------------------


@message("cache.get", idempotent=True)
class CacheGet(Request[CacheValue]):
    manager = "cache"
    key: str
    backend: str = ""


@message("cache.get_many", idempotent=True)
class CacheGetMany(Request[CacheValues]):
    manager = "cache"
    keys: list[str]
    backend: str = ""


@message("cache.set")
class CacheSet(Request[CacheStored]):
    """Store ``value`` for ``ttl`` seconds (None: the backend's ``default_ttl``); a TTL is
    more than 0 and at most ten years.

    ``lease``: the token from ``CacheGetOrLease``; setting the key answers its waiters
    either way, and the lease ends.
    """

    manager = "cache"
    key: str
    value: Any
    ttl: Ttl | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    backend: str = ""
    lease: str = ""


@message("cache.set_many")
class CacheSetMany(Request[CacheStored]):
    manager = "cache"
    values: dict[str, Any]
    ttl: Ttl | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    backend: str = ""


@message("cache.delete")
class CacheDelete(Request[CacheDeleted]):
    manager = "cache"
    key: str
    backend: str = ""


@message("cache.exists", idempotent=True)
class CacheExists(Request[CachePresence]):
    manager = "cache"
    key: str
    backend: str = ""


@message("cache.clear")
class CacheClear(Request[CacheDeleted]):
    """Drop every key of the backend (on Redis: every key under its namespace)."""

    manager = "cache"
    backend: str = ""


@message("cache.invalidate")
class CacheInvalidate(Request[CacheDeleted]):
    """Drop the keys matching a glob ``pattern`` (Redis rules: ``*``, ``?``, ``[...]``)."""

    manager = "cache"
    pattern: str
    backend: str = ""


@message("cache.invalidate_tags")
class CacheInvalidateTags(Request[CacheDeleted]):
    """Drop every key stored with any of ``tags``."""

    manager = "cache"
    tags: list[str]
    backend: str = ""


@message("cache.stats", idempotent=True)
class CacheStats(Request[CacheStatistics]):
    """Statistics of one backend, or of all of them when ``backend`` is empty."""

    manager = "cache"
    backend: str = ""


@message("cache.get_or_lease")
class CacheGetOrLease(Request[CacheLease]):
    """Get ``key``, or the lease to compute it; see the module docstring.

    ``lease_ttl``: how long a granted lease lasts if its holder never sets the key.
    ``wait``: how long to wait for another holder's value before ``Timeout``.
    Both are seconds, more than 0 and at most a day.
    """

    manager = "cache"
    key: str
    backend: str = ""
    lease_ttl: TimeLimit = 30.0
    wait: TimeLimit = 10.0


@message("cache.release")
class CacheRelease(Request[CacheReleased]):
    """Give a lease back without setting the key (the compute failed): a waiter gets it."""

    manager = "cache"
    key: str
    lease: str
    backend: str = ""


# -- events -----------------------------------------------------------------------------


@message("cache.invalidated")
class CacheInvalidated(Event):
    """Published on ``<namespace>:cache:<backend>:invalidated`` by a Redis-backed cache
    backend that changed keys.

    Other nodes drop ``keys`` and the keys matching ``patterns`` from their L1 caches;
    ``origin`` names the publishing manager, which ignores its own events.
    """

    origin: str
    keys: list[str] = dataclasses.field(default_factory=list)
    patterns: list[str] = dataclasses.field(default_factory=list)


@message("cache.lease_ended")
class CacheLeaseEnded(Event):
    """Published on ``<namespace>:cache:<backend>:invalidated`` when a lease held in Redis
    was given back without a value (``CacheRelease``).

    Managers on other nodes with callers waiting for ``key`` look again: one of them
    takes the next lease. ``origin`` names the publishing manager, which ignores its
    own events::

        CacheLeaseEnded(origin="5f0c...", key="report:2024")
    """

    origin: str
    key: str
