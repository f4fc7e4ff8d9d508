"""The Redis and tiered (L1 memory in front of L2 Redis) cache backends.

Every backend stores encoded values (msgpack bytes) and counts what it does. Only
the owning actor calls them, except :class:`InvalidationListener`, a thread that
forwards other nodes' invalidations to the actor through ``deliver``::

    backend = RedisBackend("main", options, url=url, namespace="corral", origin=origin,
                           codec=Codec())
    backend.set_many({"k": b"\\xa1v"}, ttl=None, tags=())
    backend.get("k")           # b"\\xa1v"

Redis names start with the backend's prefix ``P``, ``<namespace>:cache:<backend name>``,
so that two backends never share a key: ``P:{<key>}`` for values, ``P:lease:{<key>}``
for a single-flight lease (its token, with the lease's expiry; the hash tag keeps it in
its value's slot), ``P:lock:{<name>}`` for a lock (its fencing token) with
``P:fence:{<name>}``, the last token given for that name, and ``P:tag:{<tag>}`` for
the keys stored with a tag: a sorted set scored with each key's expiry (unix ms;
``inf`` for none), which drops the keys past it on every write and expires with its
longest-lived key. Changes are published on
``P:invalidated`` as a :class:`CacheInvalidated` envelope, and a lease given back
without a value as a :class:`CacheLeaseEnded` one, a released lock as a
:class:`CacheLockReleased` one; with signing keys, signed for that
channel, and refused by the listeners when forged or replayed.

While Redis is out of reach (the breaker is open), reads and sets may use the local
fallback store, but a delete, an invalidation or a clear is refused with
BackendUnavailable: acknowledged, it would be undone when Redis comes back with the
old values.
"""

from __future__ import annotations

import logging
import math
import threading
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from corral._backoff import Backoff
from corral._breaker import BreakerState, CircuitBreaker
from corral._junk import REJECTED, junk_kind
from corral._redis import (
    REDIS_ERRORS,
    connect,
    disconnect,
    execute_then_publish,
    glob_escape,
    masters,
    publish_own,
    subscriber,
    topology,
)
from corral.actors.cache._memory import MemoryStore, Status, backend_stats, count_drops
from corral.actors.cache._metrics import (
    BACKEND_ERRORS,
    BREAKER_OPENS,
    BREAKER_STATE,
    BREAKER_STATES,
    DELETES,
    FALLBACKS,
    HITS,
    INVALIDATIONS_REJECTED,
    L1_HITS,
    MISSES,
    SETS,
    Counters,
)
from corral.actors.cache._options import BackendOptions
from corral.errors import BackendUnavailable, ConfigError, InvalidMessage
from corral.messages.cache import CacheInvalidated, CacheLeaseEnded, CacheLockReleased
from corral.messages.codec import Codec
from corral.metrics import ManagerMetrics

__all__ = [
    "TRACKING_ORIGIN",
    "InvalidationListener",
    "LeaseState",
    "RedisBackend",
    "Resync",
    "TrackingListener",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)

_TAKE_LEASE = """
local value = redis.call('GET', KEYS[1])
if value then return {1, value} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, 0} end
return {3, redis.call('PTTL', KEYS[2])}
"""
"""KEYS: the value, its lease (one slot); ARGV: the token, the lease's milliseconds.
{1, value}: the value is there; {2, 0}: the lease is the caller's; {3, ms}: another
caller holds the lease for ``ms`` more milliseconds."""

_TAG_KEYS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[1])
local expiry = '+inf'
if ttl > 0 then expiry = string.format('%.0f', now + ttl) end
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], expiry, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', now))
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2]
if last == 'inf' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', tonumber(last)))
end
"""
"""KEYS: a tag's sorted set; ARGV: the keys' TTL in ms (0: none), then the keys. Run
after the keys are set: scores each key with its expiry (by the clock of the tag's
node, read after the key's node set it, so never before the key's own expiry), drops
the keys past theirs, and gives the set the expiry of its longest-lived key (none if
one has none)."""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
"""KEYS: a lease or a lock; ARGV: the token. 1 when that token held it and it is gone now."""

_LOCK = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, redis.call('PTTL', KEYS[1])} end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return {token, 0}
"""
"""KEYS: the lock, its fencing counter (one slot); ARGV: the lock's milliseconds.
{token, 0}: the lock is the caller's, with the next fencing token; {0, ms}: another
holder has it for ``ms`` more milliseconds."""

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
"""KEYS: the lock; ARGV: the token, the new milliseconds. 1 when that token holds it."""


@dataclass(frozen=True)
class LeaseState:
    """What :meth:`RedisBackend.take_lease` found: the value, the lease, or how long the
    lease of another caller lasts::

        LeaseState(data=None, granted=False, held_for=12.5)   # wait for that holder
    """

    data: bytes | None = None
    granted: bool = False
    held_for: float = 0.0


class RedisBackend:
    """Redis behind a circuit breaker, with an optional local store.

    ``tiered``: the local store is an L1 read before Redis and written through,
    kept coherent by invalidation events. Otherwise the local store (when
    ``fallback`` is on) is used only while the breaker is open. Either way it is
    emptied when Redis comes back, since it may have missed invalidations.
    """

    def __init__(
        self,
        name: str,
        options: BackendOptions,
        *,
        url: str,
        namespace: str,
        origin: str,
        codec: Codec,
        counters: Counters | None = None,
    ) -> None:
        self.name = name
        self.kind: str = options.type
        self.options = options
        self.url = url
        self.namespace = namespace
        self.origin = origin
        self.codec = codec
        self.tiered = options.type == "tiered"
        self.local: MemoryStore | None = None
        if self.tiered or options.fallback:
            self.local = MemoryStore(
                options.strategy,
                options.l1_max_size,
                options.default_ttl,
                max_ttl=options.l1_ttl if self.tiered else None,
            )
        self.counters = counters or Counters(ManagerMetrics(), name)
        if self.local is not None:
            count_drops(self.local, self.counters)
        self.breaker = CircuitBreaker(
            options.breaker_threshold,
            options.breaker_reset_timeout,
            on_transition=self._count_opening,
        )
        self.last_error = ""
        self.listener: InvalidationListener | None = None
        self.trackers: list[TrackingListener] = []
        prefix = f"{namespace}:cache:{name}"
        if "{" in prefix or "}" in prefix:
            raise ConfigError(
                f"managers.cache.backends.{name}: the Redis prefix {prefix!r} has a brace, "
                "which would put every key of the backend in one hash slot"
            )
        # Not a BlockingConnectionPool: its queue costs ~30 us per command, and only
        # the actor's thread uses this pool. No hidden retries: the breaker decides.
        self.client = connect(
            url,
            setting="managers.cache.redis_url",
            max_connections=options.max_connections,
            socket_timeout=options.socket_timeout,
            connect_timeout=options.socket_timeout,
            retries=0,
        )
        self.key_prefix = f"{prefix}:{{"
        self.tag_prefix = f"{prefix}:tag:{{"
        self.lease_prefix = f"{prefix}:lease:{{"
        self.channel = f"{prefix}:invalidated"
        self.lock_prefix = f"{prefix}:lock:{{"
        self.fence_prefix = f"{prefix}:fence:{{"
        self.take_lease_script = self.client.register_script(_TAKE_LEASE)
        self.release_script = self.client.register_script(_RELEASE)
        self.lock_script = self.client.register_script(_LOCK)
        self.extend_script = self.client.register_script(_EXTEND)

    # -- keys -----------------------------------------------------------------------------

    def redis_key(self, key: str) -> str:
        return f"{self.key_prefix}{key}}}"

    def tag_key(self, tag: str) -> str:
        return f"{self.tag_prefix}{tag}}}"

    def lease_key(self, key: str) -> str:
        return f"{self.lease_prefix}{key}}}"

    # -- operations -----------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        local = self.local
        if self.tiered and local is not None:
            entry = local.get(key)
            if entry is not None:
                self.counters.add(HITS)
                self.counters.add(L1_HITS)
                return entry.data
        data = self._run(lambda: self._fetch([key]).get(key), lambda: self._local_get(key))
        if data is None:
            self.counters.add(MISSES)
        else:
            self.counters.add(HITS)
        return data

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        wanted = keys
        local = self.local
        if self.tiered and local is not None:
            wanted = []
            for key in keys:
                entry = local.get(key)
                if entry is None:
                    wanted.append(key)
                else:
                    found[key] = entry.data
                    self.counters.add(L1_HITS)
        if wanted:
            found.update(
                self._run(
                    lambda: self._fetch(wanted),
                    lambda: {k: d for k in wanted if (d := self._local_get(k)) is not None},
                )
            )
        self.counters.add(HITS, len(found))
        self.counters.add(MISSES, len(keys) - len(found))
        return found

    def set_many(self, items: dict[str, bytes], ttl: float | None, tags: Iterable[str]) -> None:
        tags = tuple(tags)
        lifetime = self.options.default_ttl if ttl is None else ttl

        def remote() -> None:
            pipe = self.client.pipeline(transaction=False)
            px = None if lifetime is None else max(1, math.ceil(lifetime * 1000))
            for key, data in items.items():
                pipe.set(self.redis_key(key), data, px=px)
                pipe.unlink(self.lease_key(key))  # the value is there: its lease ends
            tagged: list[str | int] = [px or 0, *items]
            on_cluster = topology(self.client) == "cluster"
            if not on_cluster:
                for tag in tags:
                    pipe.eval(_TAG_KEYS, 1, self.tag_key(tag), *tagged)
            self._execute_then_publish(pipe, self._event(keys=list(items)))
            if on_cluster:  # a cluster pipeline runs no script: one call per tag, after it
                for tag in tags:
                    self.client.eval(_TAG_KEYS, 1, self.tag_key(tag), *tagged)
            if self.tiered:
                self._local_set(items, ttl, tags)

        self._run(remote, lambda: self._local_set(items, ttl, tags))
        self.counters.add(SETS, len(items))

    def delete(self, key: str) -> bool:
        def remote() -> bool:
            pipe = self.client.pipeline(transaction=False)
            pipe.unlink(self.redis_key(key))
            removed: int = self._execute_then_publish(pipe, self._event(keys=[key]))[0]
            return removed > 0

        if self.local is not None:
            self.local.delete(key)
        deleted = self._run(remote, None)
        self.counters.add(DELETES, deleted)
        return deleted

    def exists(self, key: str) -> bool:
        local = self.local
        if self.tiered and local is not None and local.get(key) is not None:
            return True
        return self._run(
            lambda: bool(self.client.exists(self.redis_key(key))),
            lambda: self._local_get(key) is not None,
        )

    def clear(self) -> int:
        if self.local is not None:
            self.local.clear()

        def remote() -> int:
            count = self._unlink_matching(f"{glob_escape(self.key_prefix)}*")
            self._unlink_matching(f"{glob_escape(self.tag_prefix)}*")
            publish_own(self.client, self.channel, self._event(patterns=["*"]))
            return count

        count = self._run(remote, None)
        self.counters.add(DELETES, count)
        return count

    def invalidate(self, pattern: str) -> int:
        if self.local is not None:
            self.local.invalidate(pattern)

        def remote() -> int:
            count = self._unlink_matching(f"{glob_escape(self.key_prefix)}{pattern}}}")
            publish_own(self.client, self.channel, self._event(patterns=[pattern]))
            return count

        count = self._run(remote, None)
        self.counters.add(DELETES, count)
        return count

    def invalidate_tags(self, tags: list[str]) -> int:
        if self.local is not None:
            self.local.invalidate_tags(tags)

        def remote() -> int:
            pipe = self.client.pipeline(transaction=False)
            for tag in tags:
                pipe.zrange(self.tag_key(tag), 0, -1)
            keys = sorted({member.decode() for members in pipe.execute() for member in members})
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.unlink(self.redis_key(key))
            for tag in tags:
                pipe.unlink(self.tag_key(tag))
            removed = self._execute_then_publish(pipe, self._event(keys=keys))
            return sum(removed[: len(keys)])

        count = self._run(remote, None)
        self.counters.add(DELETES, count)
        return count

    # -- single-flight leases -------------------------------------------------------------

    def take_lease(self, key: str, token: str, lease_ttl: float) -> LeaseState | None:
        """The value of ``key``, or the lease to compute it (as ``token``, for ``lease_ttl``
        seconds), or how long another caller's lease lasts: one atomic round trip. None
        while Redis is unavailable and the fallback serves: the caller leases in memory.
        """

        def remote() -> LeaseState | None:
            keys = [self.redis_key(key), self.lease_key(key)]
            outcome, detail = self.take_lease_script(keys=keys, args=[token, _ms(lease_ttl)])
            if outcome == 1:
                return LeaseState(data=detail)
            if outcome == 2:
                return LeaseState(granted=True)
            return LeaseState(held_for=max(detail, 1) / 1000)

        return self._run(remote, lambda: None)

    def release_lease(self, key: str, token: str) -> bool | None:
        """Give back the lease ``token`` holds on ``key`` and tell the other nodes; False
        when it is not held by that token (expired, or taken over). None while Redis is
        unavailable and the fallback serves."""

        def remote() -> bool | None:
            released = bool(self.release_script(keys=[self.lease_key(key)], args=[token]))
            if released:
                event = self._encode(CacheLeaseEnded(origin=self.origin, key=key))
                publish_own(self.client, self.channel, event)
            return released

        return self._run(remote, lambda: None)

    def take_refresh_lease(self, key: str, token: str, lease_ttl: float) -> bool | None:
        """The lease to refresh a value that is there, unless another caller has it. None
        while Redis is unavailable and the fallback serves: the caller leases in memory."""
        return self._run(
            lambda: bool(self.client.set(self.lease_key(key), token, nx=True, px=_ms(lease_ttl))),
            lambda: None,
        )

    # -- locks ----------------------------------------------------------------------------
    # Never on the fallback store: a lock taken there would not exclude other daemons.

    def lock(self, name: str, ttl: float) -> tuple[int, float]:
        """(the fencing token, 0) when the caller takes the lock; (0, seconds it is held
        for) when another holder has it."""

        def remote() -> tuple[int, float]:
            keys = [f"{self.lock_prefix}{name}}}", f"{self.fence_prefix}{name}}}"]
            token, held_ms = self.lock_script(keys=keys, args=[_ms(ttl)])
            return int(token), max(held_ms, 1) / 1000

        return self._run(remote, None)

    def unlock(self, name: str, token: int) -> bool:
        """Release the lock if ``token`` holds it, and tell the other nodes."""

        def remote() -> bool:
            lock = f"{self.lock_prefix}{name}}}"
            released = bool(self.release_script(keys=[lock], args=[token]))
            if released:
                event = self._encode(CacheLockReleased(origin=self.origin, name=name))
                publish_own(self.client, self.channel, event)
            return released

        return self._run(remote, None)

    def extend_lock(self, name: str, token: int, ttl: float) -> bool:
        lock = f"{self.lock_prefix}{name}}}"
        return self._run(
            lambda: bool(self.extend_script(keys=[lock], args=[token, _ms(ttl)])), None
        )

    def _execute_then_publish(self, pipe: Any, event: bytes) -> list[Any]:
        return execute_then_publish(self.client, pipe, [(self.channel, event)])

    # -- coherence ------------------------------------------------------------------------

    def invalidated(self, event: CacheInvalidated) -> None:
        """Another node changed keys (or anyone did, as Redis's tracking tells): drop them
        from the local store."""
        local = self.local
        if event.origin == self.origin or local is None:
            return
        for key in event.keys:
            local.delete(key)
        for pattern in event.patterns:
            local.invalidate(pattern)

    def resync(self) -> None:
        """Invalidations may have been missed (the listener was cut off): empty L1."""
        if self.local is not None:
            self.local.clear()

    # -- health ---------------------------------------------------------------------------

    def status(self) -> tuple[Status, dict[str, Any]]:
        breaker = self.breaker.state
        details: dict[str, Any] = {"type": self.kind, "breaker": breaker}
        if self.last_error:
            details["last_error"] = self.last_error
        if self.listener is not None:
            details["subscribed"] = self.listener.connected.is_set()
        if self.trackers:
            details["tracking"] = all(t.connected.is_set() for t in self.trackers)
        if breaker == "closed":
            return "healthy", details
        details["fallback"] = self.local is not None
        return ("degraded" if self.local is not None else "unhealthy"), details

    def stats(self) -> dict[str, Any]:
        stats = backend_stats(self.kind, self.counters, self.local)
        breaker = self.breaker.state
        for state in BREAKER_STATES:
            self.counters.metrics.set(BREAKER_STATE, float(state == breaker), self.name, state)
        stats.update(
            l1_hits=self.counters.value(L1_HITS),
            breaker=breaker,
            breaker_opens=self.counters.value(BREAKER_OPENS),
            invalidations_rejected=self.counters.value(INVALIDATIONS_REJECTED),
        )
        return stats

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for tracker in self.trackers:
            tracker.close()
        self.client.close()
        disconnect(self.client)

    # -- internals ------------------------------------------------------------------------

    def _count_opening(self, old: BreakerState, new: BreakerState) -> None:
        if old == "closed" and new == "open":
            self.counters.add(BREAKER_OPENS)

    def _recovered(self) -> bool:
        """Record a success; True when it closed an open or half-open breaker."""
        recovered = self.breaker.state != "closed"
        self.breaker.record(True)
        return recovered

    def _run(self, remote: Callable[[], T], fallback: Callable[[], T] | None) -> T:
        """``remote()`` through the breaker; ``fallback()`` while Redis is unavailable, if
        there is a local store. ``fallback`` None: a change that must reach Redis, refused
        with BackendUnavailable while it cannot."""
        if self.breaker.allow():
            try:
                result = remote()
            except _CONNECTION_ERRORS as exc:
                self.counters.add(BACKEND_ERRORS)
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.breaker.record(False)
            except REDIS_ERRORS as exc:
                self.counters.add(BACKEND_ERRORS)
                # Redis answered, with an error: it is reachable, so a half-open probe succeeded.
                if self._recovered():
                    self.last_error = ""
                    self.resync()
                raise BackendUnavailable(
                    f"cache backend {self.name!r}: {type(exc).__name__}: {exc}",
                    {"backend": self.name},
                ) from None
            else:
                if self._recovered():
                    log.info("cache backend %s: Redis is back, local entries dropped", self.name)
                    self.last_error = ""
                    self.resync()
                return result
        details = {"backend": self.name, "breaker": self.breaker.state}
        if self.local is None:
            raise BackendUnavailable(
                f"cache backend {self.name!r}: Redis is unavailable ({self.last_error})", details
            )
        if fallback is None:
            raise BackendUnavailable(
                f"cache backend {self.name!r}: Redis is unavailable ({self.last_error}): "
                "nothing was deleted there, so the old values would be back with it; "
                "try again once it is",
                details,
            )
        self.counters.add(FALLBACKS)
        return fallback()

    def _fetch(self, keys: list[str]) -> dict[str, bytes]:
        """Values of ``keys`` from Redis in one round trip (and their TTLs, for L1)."""
        if not self.tiered and len(keys) == 1:
            data = typing.cast(bytes | None, self.client.get(self.redis_key(keys[0])))
            return {} if data is None else {keys[0]: data}
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(self.redis_key(key))
            if self.tiered:
                pipe.pttl(self.redis_key(key))
        replies = pipe.execute()
        step = 2 if self.tiered else 1
        found: dict[str, bytes] = {}
        for index, key in enumerate(keys):
            data = replies[index * step]
            if data is None:
                continue
            found[key] = data
            if self.tiered and self.local is not None:
                pttl = replies[index * step + 1]
                self.local.set(key, data, pttl / 1000 if pttl > 0 else None)
        return found

    def _local_get(self, key: str) -> bytes | None:
        entry = self.local.get(key) if self.local is not None else None
        return None if entry is None else entry.data

    def _local_set(self, items: dict[str, bytes], ttl: float | None, tags: tuple[str, ...]) -> None:
        if self.local is not None:
            for key, data in items.items():
                self.local.set(key, data, ttl, tags)

    def _unlink_matching(self, match: str) -> int:
        """SCAN (never KEYS) in batches and UNLINK what matches; one key per command,
        so that no command spans hash slots."""
        count = 0
        for batch in self._scan(match):
            pipe = self.client.pipeline(transaction=False)
            for key in batch:
                pipe.unlink(key)
            removed: list[int] = pipe.execute()
            count += sum(removed)
        return count

    def _scan(self, match: str) -> Iterator[list[bytes]]:
        for client in masters(self.client):  # on a cluster, each master holds its share
            cursor = 0
            while True:
                cursor, keys = client.scan(cursor, match=match, count=self.options.scan_batch)
                if keys:
                    yield typing.cast(list[bytes], keys)
                if cursor == 0:
                    break

    def _event(self, *, keys: list[str] | None = None, patterns: list[str] | None = None) -> bytes:
        return self._encode(
            CacheInvalidated(origin=self.origin, keys=keys or [], patterns=patterns or [])
        )

    def _encode(self, event: CacheInvalidated | CacheLeaseEnded | CacheLockReleased) -> bytes:
        return self.codec.encode(event, channel=self.channel)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class Resync:
    """Told to the actor when the listener reconnected: invalidations may have been lost."""

    __slots__ = ("backend",)

    def __init__(self, backend: str) -> None:
        self.backend = backend


class _Listener:
    """A thread that follows one Redis connection for the actor: it hands what it reads to
    ``deliver`` (which tells the actor, so the L1 and the lease waiters are only touched
    on the actor's thread), reconnects with backoff, and after a reconnect delivers
    :class:`Resync`. ``deliver`` returning False stops it (the actor is gone)."""

    kind = ""

    def __init__(
        self,
        backend: RedisBackend,
        deliver: Callable[[object], bool],
        *,
        url: str = "",
        reconnect_max: float = 1.0,
    ) -> None:
        self.backend_name = backend.name
        self.counters = backend.counters
        self.url = url or backend.url
        self.timeout = backend.options.socket_timeout
        self.deliver = deliver
        self.backoff = Backoff(initial=0.05, cap=reconnect_max, jitter=0.0)
        self.connected = threading.Event()
        self.stopping = threading.Event()
        self.failures = 0
        self.reconnected = False
        self.thread = threading.Thread(
            target=self._run, name=f"cache-{self.kind}-{backend.name}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stopping.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=2.0)

    def _run(self) -> None:
        while not self.stopping.wait(self.backoff.delay(self.failures) if self.failures else 0):
            try:
                if not self._follow():
                    return
            except REDIS_ERRORS as exc:
                log.debug("cache %s of %s cut: %s", self.kind, self.backend_name, exc)
            finally:
                self.connected.clear()
            self.reconnected = True
            self.failures += 1

    def _ready(self) -> bool:
        """The connection follows what it should; False once the actor is gone."""
        self.connected.set()
        self.failures = 0
        return not self.reconnected or self.deliver(Resync(self.backend_name))

    def _follow(self) -> bool:
        """Follow one connection until it is cut (raises) or the listener stops (True);
        False once the actor is gone."""
        raise NotImplementedError


class InvalidationListener(_Listener):
    """A thread on one exact channel (SSUBSCRIBE, never a pattern) that hands each
    :class:`CacheInvalidated`, :class:`CacheLeaseEnded` and :class:`CacheLockReleased` to
    the actor. What fails to decode, verify or pass the replay guard is dropped and
    counted (``INVALIDATIONS_REJECTED``).
    """

    kind = "invalidations"

    def __init__(
        self,
        backend: RedisBackend,
        deliver: Callable[[object], bool],
        *,
        reconnect_max: float = 1.0,
    ) -> None:
        super().__init__(backend, deliver, reconnect_max=reconnect_max)
        self.channel = backend.channel
        self.codec = backend.codec
        self.replays = backend.codec.replay_guard()

    def _follow(self) -> bool:
        client = subscriber(
            self.url,
            setting="managers.cache.redis_url",
            connect_timeout=self.timeout,
            socket_timeout=None,
            retries=0,
            shard_channel=self.channel,
        )
        pubsub: redis.client.PubSub | None = None
        try:
            pubsub = client.pubsub()  # type: ignore[no-untyped-call]
            pubsub.ssubscribe(self.channel)  # invalidations go by SPUBLISH
            while not self.stopping.is_set():
                msg = pubsub.get_message(timeout=0.2)
                if msg is None:
                    continue
                if msg["type"] == "ssubscribe":
                    if not self._ready():
                        return False
                elif msg["type"] == "smessage" and not self._forward(msg["data"]):
                    return False
            return True
        finally:
            if pubsub is not None:
                pubsub.close()
            client.close()

    def _forward(self, data: bytes) -> bool:
        try:
            event = self.codec.decode(data, channel=self.channel, guard=self.replays).message
        except InvalidMessage as exc:
            self.counters.add(INVALIDATIONS_REJECTED)
            REJECTED.reject("cache", junk_kind(exc), f"invalidation on {self.channel}: {exc}", log)
            return True
        if not isinstance(event, CacheInvalidated | CacheLeaseEnded | CacheLockReleased):
            return True
        return self.deliver((self.backend_name, event))


TRACKING_ORIGIN = "redis-tracking"
"""The ``origin`` of the invalidations that Redis's client-side caching reports."""


class TrackingListener(_Listener):
    """A RESP3 connection to one Redis node with ``CLIENT TRACKING ON BCAST PREFIX
    <prefix>:{``: Redis pushes the keys of the backend that anyone changes on that node,
    corral or not (``SET`` by redis-cli, another application, an expiry), and the
    listener hands them to the actor as a :class:`CacheInvalidated` from
    :data:`TRACKING_ORIGIN`. Tracking is per node: on a cluster there is one listener
    per master.
    """

    kind = "tracking"

    def __init__(
        self,
        backend: RedisBackend,
        deliver: Callable[[object], bool],
        *,
        url: str,
        reconnect_max: float = 1.0,
    ) -> None:
        super().__init__(backend, deliver, url=url, reconnect_max=reconnect_max)
        self.prefix = backend.key_prefix
        self.pending: list[str] | None = []
        """Keys pushed since the last hand-over; None: everything (a FLUSHDB)."""

    def _follow(self) -> bool:
        client = typing.cast(
            redis.Redis,
            connect(
                self.url,
                setting="managers.cache.redis_url",
                connect_timeout=self.timeout,
                socket_timeout=None,
                retries=0,
                node=True,  # one node's connection, even on a cluster
                protocol=3,
            ),
        )
        connection = client.connection_pool.get_connection()
        try:
            # As redis-py's own client-side cache does: invalidations are RESP3 pushes.
            connection._parser.set_invalidation_push_handler(self._pushed)
            connection.send_command(  # type: ignore[no-untyped-call]
                "CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", self.prefix
            )
            connection.read_response()
            if not self._ready():
                return False
            while not self.stopping.is_set():
                if connection.can_read(timeout=0.2):
                    connection.read_response(push_request=True)
                    if not self._hand_over():
                        return False
            return True
        finally:
            connection.disconnect()  # type: ignore[no-untyped-call]
            client.close()

    def _pushed(self, push: list[Any]) -> None:
        keys = push[1]
        if keys is None or self.pending is None:
            self.pending = None
            return
        for key in keys:
            name = key.decode() if isinstance(key, bytes) else str(key)
            if name.startswith(self.prefix) and name.endswith("}"):
                self.pending.append(name[len(self.prefix) : -1])

    def _hand_over(self) -> bool:
        pending, self.pending = self.pending, []
        if pending is None:
            return self.deliver(Resync(self.backend_name))
        if not pending:
            return True
        return self.deliver(
            (self.backend_name, CacheInvalidated(origin=TRACKING_ORIGIN, keys=pending))
        )
