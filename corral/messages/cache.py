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

Refresh: a value set with ``stale_ttl`` is served for that long after its ``ttl``,
marked ``stale``, and one with ``early_ttl`` wants refreshing from that long before
its ``ttl`` ends. Either way ``CacheGetOrLease`` answers ``found`` with the value,
and exactly one caller (across daemons) also gets a ``lease``: it computes the value
again and sets it with that lease, while the others keep being served::

    reply = system.ask(CacheGetOrLease(key="report"))
    if reply.lease:                       # a miss, or a value due for its refresh
        system.ask(CacheSet(key="report", value=build(), ttl=60, stale_ttl=30,
                            lease=reply.lease))

Locks: ``CacheLock`` takes a named lock for ``ttl`` seconds (waiting up to ``wait``
for it) and answers with a fencing ``token``, one more than the last token of that
name; ``CacheUnlock`` and ``CacheExtend`` act only for the holder of that token::

    held = system.ask(CacheLock(name="nightly-report", ttl=30, wait=5))
    if held.acquired:
        ...                               # write with held.token as the fence
        system.ask(CacheUnlock(name="nightly-report", token=held.token))
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from corral.messages.base import (
    MAX_OFFSET,
    MAX_TIMEOUT,
    Count,
    Event,
    Range,
    Reply,
    Request,
    TimeLimit,
    Ttl,
    message,
)

__all__ = [
    "CacheClear",
    "CacheDelete",
    "CacheDeleted",
    "CacheExists",
    "CacheExtend",
    "CacheExtended",
    "CacheGet",
    "CacheGetMany",
    "CacheGetOrLease",
    "CacheInvalidate",
    "CacheInvalidateTags",
    "CacheInvalidated",
    "CacheLease",
    "CacheLeaseEnded",
    "CacheLock",
    "CacheLockReleased",
    "CacheLocked",
    "CachePresence",
    "CacheRelease",
    "CacheReleased",
    "CacheSet",
    "CacheSetMany",
    "CacheStatistics",
    "CacheStats",
    "CacheStored",
    "CacheUnlock",
    "CacheUnlocked",
    "CacheValue",
    "CacheValues",
]


# -- replies ----------------------------------------------------------------------------


Wait = Annotated[float, Range(ge=0, le=MAX_TIMEOUT, unit="s")]
"""How long a request may wait for something; 0: not at all."""
FencingToken = Annotated[int, Range(ge=0, le=MAX_OFFSET)]


@message("cache.value")
class CacheValue(Reply):
    """A looked-up key: ``found`` tells a miss from a stored ``None``; ``stale``: the
    value's ``ttl`` is over, and it is served within its ``stale_ttl``."""

    key: str
    found: bool
    value: Any = None
    stale: bool = False


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
    """The value (``found``), or a lease to compute it (``lease`` is its token), or both:
    the value, due for its refresh, and the lease to refresh it. ``stale`` as in
    :class:`CacheValue`."""

    key: str
    found: bool
    value: Any = None
    lease: str = ""
    stale: bool = False


@message("cache.released")
class CacheReleased(Reply):
    released: bool


@message("cache.locked")
class CacheLocked(Reply):
    """``acquired``: the lock is the caller's until ``ttl`` runs out (or it unlocks), with
    ``token``, the lock's fencing token: greater than any earlier holder's. Not
    acquired: ``token`` is 0."""

    name: str
    acquired: bool
    token: FencingToken = 0


@message("cache.unlocked")
class CacheUnlocked(Reply):
    """``released``: the caller held the lock and let it go; False when it had expired
    or passed to another holder."""

    released: bool


@message("cache.extended")
class CacheExtended(Reply):
    """``extended``: the caller still held the lock, which now lasts the new ``ttl``."""

    extended: bool


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
    ``stale_ttl``: seconds the value is still served, stale, after ``ttl``, while one
    caller of ``CacheGetOrLease`` refreshes it. ``early_ttl``: seconds before ``ttl``
    ends from which one caller refreshes it (less than ``ttl``). None: the backend's
    default for either.
    """

    manager = "cache"
    key: str
    value: Any
    ttl: Ttl | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    backend: str = ""
    lease: str = ""
    stale_ttl: Ttl | None = None
    early_ttl: Ttl | None = None


@message("cache.set_many")
class CacheSetMany(Request[CacheStored]):
    """``ttl``, ``stale_ttl`` and ``early_ttl`` as in :class:`CacheSet`, for each value."""

    manager = "cache"
    values: dict[str, Any]
    ttl: Ttl | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    backend: str = ""
    stale_ttl: Ttl | None = None
    early_ttl: Ttl | None = None


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


@message("cache.lock")
class CacheLock(Request[CacheLocked]):
    """Take the lock ``name`` for ``ttl`` seconds: it is released then if its holder
    never unlocks it (say, it died). ``wait``: seconds to wait for a held lock (0: answer
    at once); the caller is answered when it is released or expires, not by polling.
    """

    manager = "cache"
    name: str
    ttl: TimeLimit
    wait: Wait = 0.0
    backend: str = ""


@message("cache.unlock")
class CacheUnlock(Request[CacheUnlocked]):
    """Release the lock ``name`` if ``token`` still holds it."""

    manager = "cache"
    name: str
    token: FencingToken
    backend: str = ""


@message("cache.extend")
class CacheExtend(Request[CacheExtended]):
    """Make the lock ``name`` last ``ttl`` seconds from now, if ``token`` still holds it."""

    manager = "cache"
    name: str
    token: FencingToken
    ttl: TimeLimit
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
    keys: list[str] = msgspec.field(default_factory=list)
    patterns: list[str] = msgspec.field(default_factory=list)


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


@message("cache.lock_released")
class CacheLockReleased(Event):
    """Published on ``<namespace>:cache:<backend>:invalidated`` when a lock held in Redis
    was released: managers on other nodes with callers waiting for it try again."""

    origin: str
    name: str
