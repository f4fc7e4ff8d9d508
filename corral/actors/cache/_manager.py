"""The cache manager: named backends, statistics, invalidation and single-flight leases.

::

    config = Config().replace(managers={"cache": ManagerSection(options={
        "backends": {"main": {"type": "tiered", "url": "redis://127.0.0.1:6379/0"}},
    })})
    with System(config, managers=[CacheManager]) as system:
        system.ask(CacheSet(key="k", value=[1, 2], ttl=30))
        system.ask(CacheGet(key="k")).value      # [1, 2]

Single-flight: ``CacheGetOrLease`` for a key that another caller is computing is
not answered at once; the actor keeps the caller's reply future and answers it
when the value is set, when the lease passes to it (the holder released it or
never came back), or with ``Timeout`` after the caller's ``wait``. The mailbox
keeps flowing meanwhile: waiting costs a list entry, not a thread.

On a Redis or tiered backend the lease is a Redis key, so one caller computes
however many daemons serve: a set or a release on any node is published, and the
nodes with waiters look again (a timer at the lease's expiry stands in for a lost
message). A memory backend (or a Redis backend on its fallback) keeps leases here.

Refresh: a value due for its refresh (past its ``early_ttl`` mark, or stale) is served
to every caller of ``CacheGetOrLease``, and the refresh lease, the same lease a miss
takes, goes with it to one of them. Locks wait like leases: a ``CacheLock`` with a
``wait`` is answered when the lock is released (here, or on another node: the event
on the backend's channel) or expires, or with ``acquired=False`` once ``wait`` is over.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pykka

from corral._redis import master_urls, redact
from corral.actors.cache._memory import Backend, MemoryBackend, MemoryStore
from corral.actors.cache._metrics import (
    BATCHED_GETS,
    BATCHED_SETS,
    FAMILIES,
    LEASE_WAITERS,
    LEASES,
    Counters,
)
from corral.actors.cache._options import BackendOptions, CacheOptions
from corral.actors.cache._redis import (
    InvalidationListener,
    LeaseState,
    RedisBackend,
    Resync,
    TrackingListener,
)
from corral.actors.cache._values import ValueCodec
from corral.errors import (
    ConfigError,
    CorralError,
    InvalidMessage,
    ManagerUnavailable,
    Timeout,
)
from corral.manager import DeferredReply, Manager, Schedule, handles
from corral.messages.base import MAX_TIMEOUT, MAX_TTL, Reply
from corral.messages.cache import (
    CacheClear,
    CacheDelete,
    CacheDeleted,
    CacheExists,
    CacheExtend,
    CacheExtended,
    CacheGet,
    CacheGetMany,
    CacheGetOrLease,
    CacheInvalidate,
    CacheInvalidated,
    CacheInvalidateTags,
    CacheLease,
    CacheLeaseEnded,
    CacheLock,
    CacheLocked,
    CacheLockReleased,
    CachePresence,
    CacheRelease,
    CacheReleased,
    CacheSet,
    CacheSetMany,
    CacheStatistics,
    CacheStats,
    CacheStored,
    CacheUnlock,
    CacheUnlocked,
    CacheValue,
    CacheValues,
)
from corral.messages.codec import Codec
from corral.messages.system import Health

__all__ = ["CacheManager"]

log = logging.getLogger(__name__)

_SUMMED = ("hits", "misses", "sets", "deletes", "evictions", "expirations", "errors", "fallbacks")
_SEVERITY = {"healthy": 0, "degraded": 1, "unhealthy": 2}
_GET_BATCH = 256
"""At most this many waiting gets are answered with one round trip per backend."""
_SET_BATCH = 256
"""At most this many waiting sets are stored together (see ``CacheManager.set``)."""
_LISTENER_READY_TIMEOUT = 1.0


@dataclass
class _Waiter:
    """A deferred caller; ``lease_ttl``: how long the lease (or lock) it gets lasts."""

    reply: DeferredReply
    deadline: float
    lease_ttl: float


@dataclass
class _LockWait:
    """Callers here waiting for a lock, and when to try it again (its expiry)."""

    retry_at: float
    waiters: list[_Waiter] = field(default_factory=list)


@dataclass
class _Flight:
    """A key being computed, and the callers here waiting for its value.

    ``token`` is the lease holder's when this manager keeps the lease (a memory
    backend, or Redis out of reach), and it ends at ``expires_at``. "" when the lease
    is in Redis, held by a caller of any node: ``expires_at`` is then when to look at
    Redis again.
    """

    token: str
    expires_at: float
    lease_ttl: float
    waiters: list[_Waiter] = field(default_factory=list)


class CacheManager(Manager[CacheOptions]):
    """The ``cache`` manager; see the module docstring and docs/cache.md."""

    name = "cache"
    metric_families = FAMILIES

    # -- lifecycle ------------------------------------------------------------------------

    def on_start(self) -> None:
        settings = self.options
        self.origin = uuid.uuid4().hex
        self.codec = Codec(keys=self.corral_context.signing_keys)
        self.max_key_length = settings.max_key_length
        self.max_value_size = settings.max_value_size
        self.flights: dict[tuple[str, str], _Flight] = {}
        self.lock_waits: dict[tuple[str, str], _LockWait] = {}
        self.timer: Schedule | None = None
        self.timer_due = math.inf
        self.backends: dict[str, Backend] = {}
        self.backend_settings = settings.backend_options(self.corral_context.redis_url)
        self.values = {
            name: ValueCodec(
                options.serializer,
                backend=name,
                keys=tuple(k.encode() for k in options.signing_keys),
                encryption_keys=tuple(options.encryption_keys),
            )
            for name, options in self.backend_settings.items()
        }
        try:
            for name, options in self.backend_settings.items():
                self.backends[name] = self._build(name, options)
        except BaseException:
            self._close_backends()
            raise
        self.default_backend = settings.default_backend or next(iter(self.backends))
        if self.default_backend not in self.backends:
            self._close_backends()
            raise ConfigError(
                f"managers.{self.corral_context.name}.default_backend: no backend named "
                f"{self.default_backend!r} (backends: {', '.join(self.backends)})"
            )
        for backend in self.backends.values():
            if isinstance(backend, RedisBackend):
                for listener in [backend.listener, *backend.trackers]:
                    if listener is not None:
                        listener.connected.wait(_LISTENER_READY_TIMEOUT)
        self._warn_of_per_process_backends()

    def _warn_of_per_process_backends(self) -> None:
        """One warning when the bus is on Redis (several daemons may serve) and a backend
        keeps its values in this process."""
        local = [name for name, b in self.backends.items() if isinstance(b, MemoryBackend)]
        if self.corral_context.redis_url and local:
            log.warning(
                "cache backend%s %s: memory, in this process, although the bus is on Redis: "
                "with several daemons each daemon has its own values, and invalidations and "
                'single-flight leases are per daemon (type = "redis" or "tiered" shares them)',
                "s" if len(local) > 1 else "",
                ", ".join(local),
            )

    def on_stop(self) -> None:
        gone = ManagerUnavailable(
            "the cache manager stopped", {"manager": self.corral_context.name}
        )
        for flight in self.flights.values():
            for waiter in flight.waiters:
                waiter.reply.fail(gone)
        for wait in self.lock_waits.values():
            for waiter in wait.waiters:
                waiter.reply.fail(gone)
        self.flights.clear()
        self.lock_waits.clear()
        self._close_backends()

    def _build(self, name: str, options: BackendOptions) -> Backend:
        if options.type == "memory":
            store = MemoryStore(
                options.strategy,
                options.max_size,
                options.default_ttl,
                clock=self.corral_context.clock.monotonic,
            )
            return MemoryBackend(name, store, Counters(self.corral_metrics, name))
        context = self.corral_context
        url = options.url or context.redis_url
        if not url:
            raise ConfigError(
                f"managers.{context.name}.backends.{name}.url: a {options.type} backend "
                "needs a Redis url (or the system's bus on Redis)"
            )
        backend = RedisBackend(
            name,
            options,
            url=url,
            namespace=options.namespace or context.namespace,
            origin=self.origin,
            codec=self.codec,
            counters=Counters(self.corral_metrics, name),
        )
        backend.listener = InvalidationListener(backend, self._deliver)
        backend.listener.start()
        if backend.tiered and options.track_external_writes:
            self._track(backend, url)
        return backend

    def _track(self, backend: RedisBackend, url: str) -> None:
        """Follow writes made outside corral to the keys of ``backend``'s L1: one tracking
        connection per Redis node (BCAST tracking is per node)."""
        nodes = master_urls(url, setting=f"managers.{self.corral_context.name}.url")
        for node in nodes:
            tracker = TrackingListener(backend, self._deliver, url=node)
            backend.trackers.append(tracker)
            tracker.start()
        if len(nodes) > 1:
            log.info(
                "cache backend %s: L1 follows writes made outside corral through CLIENT "
                "TRACKING on the %d masters of the cluster now (%s); tracking is per node: "
                "after a failover or a resharding, keys on a master not listed are followed "
                "only through corral's own invalidations until the manager restarts",
                backend.name,
                len(nodes),
                ", ".join(redact(n) for n in nodes),
            )

    def _close_backends(self) -> None:
        for backend in self.backends.values():
            try:
                backend.close()
            except Exception:  # closing must not hide why we stop
                log.debug("closing cache backend %s failed", backend.name, exc_info=True)

    def _deliver(self, item: object) -> bool:
        """Hand something from another thread to the actor; False once the actor is gone."""
        try:
            self.actor_ref.tell(item)
        except pykka.ActorDeadError:
            return False
        except Exception:  # a full mailbox: the actor is alive, this item is dropped
            log.warning("cache manager: dropped %r (mailbox full)", item)
        return True

    # -- requests -------------------------------------------------------------------------

    @handles(CacheGet)
    def get(self, msg: CacheGet) -> CacheValue | None:
        """One get, or, when more wait behind it, all of them in one round trip per backend."""
        queued = self.take_queued(CacheGet, _GET_BATCH)
        if queued:
            self.corral_metrics.add(BATCHED_GETS, by=len(queued) + 1)
            self._get_together([(msg, self.defer_reply()), *queued])
            return None  # answered through its reply with the others
        backend = self._backend(msg.backend)
        data = backend.get(self._key(msg.key))
        if data is None:
            return CacheValue(key=msg.key, found=False)
        return self._value(backend.name, msg.key, data)

    def _value(self, backend: str, key: str, data: bytes) -> CacheValue:
        stored = self.values[backend].decode(key, data)
        stale = self.corral_context.clock.time() >= stored.stale_at
        return CacheValue(key=key, found=True, value=stored.value, stale=stale)

    def _get_together(self, queued: list[tuple[CacheGet, DeferredReply]]) -> None:
        """Answer every get of the batch, each with its value or its own error."""
        try:
            self._answer_gets(queued)
        except BaseException as exc:
            gone = ManagerUnavailable(f"cache manager failed during a batched get: {exc!r}")
            for _, reply in queued:
                reply.fail(gone)  # those answered already keep their answer
            raise

    def _answer_gets(self, queued: list[tuple[CacheGet, DeferredReply]]) -> None:
        by_backend: dict[str, list[tuple[str, CacheGet, DeferredReply]]] = {}
        for msg, reply in queued:
            try:
                backend = self._backend(msg.backend)
                by_backend.setdefault(backend.name, []).append((self._key(msg.key), msg, reply))
            except CorralError as exc:
                _answer(reply, exc)
        for name, gets in by_backend.items():
            try:
                found = self.backends[name].get_many(list(dict.fromkeys(k for k, _, _ in gets)))
            except CorralError as exc:
                for _, _, reply in gets:
                    _answer(reply, exc)
                continue
            for key, msg, reply in gets:
                data = found.get(key)
                try:
                    value = (
                        CacheValue(key=msg.key, found=False)
                        if data is None
                        else self._value(name, msg.key, data)
                    )
                except CorralError as exc:  # a stored value that does not decode
                    _answer(reply, exc)
                    continue
                _answer(reply, value)

    @handles(CacheGetMany)
    def get_many(self, msg: CacheGetMany) -> CacheValues:
        backend = self._backend(msg.backend)
        keys = [self._key(k, f"keys[{i}]") for i, k in enumerate(msg.keys)]
        found = backend.get_many(keys)
        decode = self.values[backend.name].decode
        return CacheValues(values={k: decode(k, d).value for k, d in found.items()})

    @handles(CacheSet)
    def set(self, msg: CacheSet) -> CacheStored | None:
        """One set, or, when more wait behind it, all of them: each run of sets to one
        backend with one TTL and tags stored in one round trip, the runs in order."""
        queued = self.take_queued(CacheSet, _SET_BATCH)
        if queued:
            self.corral_metrics.add(BATCHED_SETS, by=len(queued) + 1)
            self._set_together([(msg, self.defer_reply()), *queued])
            return None  # answered through its reply with the others
        backend, key, data, ttl = self._checked_set(msg)
        backend.set_many({key: data}, ttl, msg.tags)
        self._settle(backend.name, key, msg.value)
        return CacheStored(count=1)

    def _checked_set(self, msg: CacheSet) -> tuple[Backend, str, bytes, float | None]:
        """The backend, key, encoded value and TTL in the backend of a set, or the
        InvalidMessage that refuses it."""
        backend = self._backend(msg.backend)
        key = self._key(msg.key)
        lifetime = _Lifetime.of(
            self.backend_settings[backend.name], msg, self.corral_context.clock.time()
        )
        data = self._encode(backend.name, key, msg.value, lifetime, "value")
        return backend, key, data, lifetime.stored_ttl

    def _set_together(self, queued: list[tuple[CacheSet, DeferredReply]]) -> None:
        """Store every set of the batch, answering each with CacheStored or its own error."""
        try:
            runs: list[tuple[tuple[Any, ...], list[tuple[CacheSet, str, bytes, Any]]]] = []
            for msg, reply in queued:
                try:
                    backend, key, data, ttl = self._checked_set(msg)
                except CorralError as exc:
                    _answer(reply, exc)
                    continue
                same = (backend.name, ttl, tuple(msg.tags))
                if not runs or runs[-1][0] != same:
                    runs.append((same, []))
                runs[-1][1].append((msg, key, data, reply))
            for (name, ttl, tags), sets in runs:
                try:
                    # One dict: of two sets of a key in a run, the later one is stored.
                    self.backends[name].set_many({key: data for _, key, data, _ in sets}, ttl, tags)
                except CorralError as exc:
                    for *_, reply in sets:
                        _answer(reply, exc)
                    continue
                for msg, key, _, reply in sets:
                    self._settle(name, key, msg.value)
                    _answer(reply, CacheStored(count=1))
        except BaseException as exc:
            gone = ManagerUnavailable(f"cache manager failed during a batched set: {exc!r}")
            for _, reply in queued:
                reply.fail(gone)  # those answered already keep their answer
            raise

    @handles(CacheSetMany)
    def set_many(self, msg: CacheSetMany) -> CacheStored:
        backend = self._backend(msg.backend)
        lifetime = _Lifetime.of(
            self.backend_settings[backend.name], msg, self.corral_context.clock.time()
        )
        items = {
            self._key(k, f"values.{k}"): self._encode(backend.name, k, v, lifetime, f"values.{k}")
            for k, v in msg.values.items()
        }
        backend.set_many(items, lifetime.stored_ttl, msg.tags)
        for key, value in msg.values.items():
            self._settle(backend.name, key, value)
        return CacheStored(count=len(items))

    @handles(CacheDelete)
    def delete(self, msg: CacheDelete) -> CacheDeleted:
        return CacheDeleted(count=int(self._backend(msg.backend).delete(self._key(msg.key))))

    @handles(CacheExists)
    def exists(self, msg: CacheExists) -> CachePresence:
        exists = self._backend(msg.backend).exists(self._key(msg.key))
        return CachePresence(key=msg.key, exists=exists)

    @handles(CacheClear)
    def clear(self, msg: CacheClear) -> CacheDeleted:
        return CacheDeleted(count=self._backend(msg.backend).clear())

    @handles(CacheInvalidate)
    def invalidate(self, msg: CacheInvalidate) -> CacheDeleted:
        if not msg.pattern:
            raise InvalidMessage("must not be empty", path="pattern")
        self._key(msg.pattern, "pattern")  # a pattern is no longer than a key may be
        return CacheDeleted(count=self._backend(msg.backend).invalidate(msg.pattern))

    @handles(CacheInvalidateTags)
    def invalidate_tags(self, msg: CacheInvalidateTags) -> CacheDeleted:
        return CacheDeleted(count=self._backend(msg.backend).invalidate_tags(msg.tags))

    @handles(CacheStats)
    def statistics(self, msg: CacheStats) -> CacheStatistics:
        names = [self._backend(msg.backend).name] if msg.backend else list(self.backends)
        per_backend = {name: self.backends[name].stats() for name in names}
        return CacheStatistics(backends=per_backend, total=_total(per_backend.values()))

    # -- single-flight --------------------------------------------------------------------

    @handles(CacheGetOrLease)
    def get_or_lease(self, msg: CacheGetOrLease) -> CacheLease | None:
        backend = self._backend(msg.backend)
        key = self._key(msg.key)
        _check_ttl(msg.lease_ttl, "lease_ttl", MAX_TIMEOUT)
        _check_ttl(msg.wait, "wait", MAX_TIMEOUT)
        data = backend.get(key)
        if data is not None:
            return self._found(backend, msg, data)
        token = uuid.uuid4().hex
        if isinstance(backend, RedisBackend):
            shared = backend.take_lease(key, token, msg.lease_ttl)
            if shared is not None:  # None: Redis is out of reach, the lease is kept here
                return self._shared_lease(backend, msg, token, shared)
        if self._lease_here(backend.name, key, token, msg.lease_ttl):
            return CacheLease(key=msg.key, found=False, lease=token)
        self._wait(backend.name, msg)
        return None  # answered later, by _settle, _hand_over, _look_again or _sweep

    def _lease_here(self, backend: str, key: str, token: str, lease_ttl: float) -> bool:
        """Whether ``token`` takes the lease on ``key`` kept by this manager (nobody
        holds it, or its holder's time ran out)."""
        now = time.monotonic()
        flight = self.flights.get((backend, key))
        if flight is not None and flight.expires_at > now:
            return False
        waiters = flight.waiters if flight is not None else []
        self.flights[backend, key] = _Flight(token, now + lease_ttl, lease_ttl, waiters)
        self._wake_at(now + lease_ttl)
        return True

    def _found(self, backend: Backend, msg: CacheGetOrLease, data: bytes) -> CacheLease:
        """The value, and the lease to refresh it when it is due and nobody has it."""
        stored = self.values[backend.name].decode(msg.key, data)
        now = self.corral_context.clock.time()
        lease = ""
        if now >= stored.refresh_at:
            lease = self._refresh_lease(backend, msg.key, msg.lease_ttl)
        return CacheLease(
            key=msg.key, found=True, value=stored.value, lease=lease, stale=now >= stored.stale_at
        )

    def _refresh_lease(self, backend: Backend, key: str, lease_ttl: float) -> str:
        """A new lease on ``key``, whose value is there; "" while another caller has one."""
        token = uuid.uuid4().hex
        if isinstance(backend, RedisBackend):
            granted = backend.take_refresh_lease(key, token, lease_ttl)
            if granted is not None:
                return token if granted else ""
        return token if self._lease_here(backend.name, key, token, lease_ttl) else ""

    def _shared_lease(
        self, backend: Backend, msg: CacheGetOrLease, token: str, shared: LeaseState
    ) -> CacheLease | None:
        """The answer to ``msg`` from what Redis holds: the value, the lease, or a wait."""
        if shared.data is not None:
            return self._found(backend, msg, shared.data)
        if shared.granted:
            return CacheLease(key=msg.key, found=False, lease=token)
        self._wait(backend.name, msg, shared.held_for)
        return None

    def _wait(self, backend: str, msg: CacheGetOrLease, held_for: float | None = None) -> None:
        """Keep the caller's reply until the value is set, the lease passes to it, or its
        ``wait`` is over. ``held_for``: how long the lease in Redis lasts (None: the lease
        is kept here)."""
        reply = self.defer_reply()
        if not reply.pending:  # a tell: nobody waits for the answer
            return
        now = time.monotonic()
        flight = self.flights.get((backend, msg.key))
        if flight is None:
            flight = self.flights[backend, msg.key] = _Flight("", now, msg.lease_ttl)
        if held_for is not None and not flight.token:
            flight.expires_at = now + held_for
        flight.waiters.append(_Waiter(reply, now + msg.wait, msg.lease_ttl))
        self._wake_at(min(flight.expires_at, now + msg.wait))

    @handles(CacheRelease)
    def release(self, msg: CacheRelease) -> CacheReleased:
        backend = self._backend(msg.backend)
        key = self._key(msg.key)
        released = False
        if isinstance(backend, RedisBackend):
            released = bool(backend.release_lease(key, msg.lease))
        flight = self.flights.get((backend.name, key))
        if flight is not None and flight.token and flight.token == msg.lease:
            self._hand_over(backend.name, key, flight, time.monotonic())
            released = True
        elif released and flight is not None and not flight.token:
            self._look_again(backend.name, key, flight)
        return CacheReleased(released=released)

    def _settle(self, backend: str, key: str, value: Any) -> None:
        """The key was set: answer everyone waiting for it; its lease ends."""
        flight = self.flights.pop((backend, key), None)
        if flight is not None:
            reply = CacheLease(key=key, found=True, value=value)
            for waiter in flight.waiters:
                waiter.reply.resolve(reply)

    def _hand_over(self, backend: str, key: str, flight: _Flight, now: float) -> None:
        """The holder of a lease kept here let go: the first waiter still waiting gets a
        new lease."""
        while flight.waiters:
            waiter = flight.waiters.pop(0)
            if waiter.deadline > now:
                flight.token = uuid.uuid4().hex
                flight.expires_at = now + flight.lease_ttl
                waiter.reply.resolve(CacheLease(key=key, found=False, lease=flight.token))
                self._wake_at(flight.expires_at)
                return
            waiter.reply.fail(_timed_out(key))
        del self.flights[backend, key]

    def _look_again(self, backend_name: str, key: str, flight: _Flight) -> None:
        """The lease in Redis on ``key`` may have ended: answer the waiters here with the
        value, or give the first of them the next lease, or wait for its new holder."""
        now = time.monotonic()
        _time_out_waiters(key, flight, now)
        if not flight.waiters:
            del self.flights[backend_name, key]
            return
        backend = self.backends[backend_name]
        first = flight.waiters[0]
        token = uuid.uuid4().hex
        try:
            assert isinstance(backend, RedisBackend)
            shared = backend.take_lease(key, token, first.lease_ttl)
            value = (
                self.values[backend_name].decode(key, shared.data).value
                if shared is not None and shared.data is not None
                else None
            )
        except CorralError as exc:
            del self.flights[backend_name, key]
            for waiter in flight.waiters:
                waiter.reply.fail(exc)
            return
        if shared is None:  # Redis is out of reach: the lease is kept here from now on
            flight.lease_ttl = first.lease_ttl
            self._hand_over(backend_name, key, flight, now)
        elif shared.data is not None:
            self._settle(backend_name, key, value)
        elif shared.granted:
            flight.waiters.pop(0)
            first.reply.resolve(CacheLease(key=key, found=False, lease=token))
            flight.expires_at = now + first.lease_ttl
            if flight.waiters:
                self._wake_at(flight.expires_at)
            else:
                del self.flights[backend_name, key]
        else:
            flight.expires_at = now + shared.held_for
            self._wake_at(flight.expires_at)

    def _lease_news(self, backend: str, keys: Iterable[str]) -> None:
        """Another node set, deleted or released ``keys``: their waiters here look again."""
        for key in keys:
            flight = self.flights.get((backend, key))
            if flight is not None and not flight.token:
                self._look_again(backend, key, flight)

    def _sweep(self) -> None:
        now = time.monotonic()
        self.timer, self.timer_due = None, math.inf
        for (backend, key), flight in list(self.flights.items()):
            _time_out_waiters(key, flight, now)
            if not flight.token and not flight.waiters:
                del self.flights[backend, key]  # nobody here waits for the lease in Redis
            elif flight.expires_at <= now and flight.token:
                self._hand_over(backend, key, flight, now)
            elif flight.expires_at <= now:
                self._look_again(backend, key, flight)
        for (backend, name), wait in list(self.lock_waits.items()):
            if wait.retry_at <= now or any(w.deadline <= now for w in wait.waiters):
                self._retry_lock(backend, name)
        wakes = [f.expires_at for f in self.flights.values()]
        wakes += [w.deadline for f in self.flights.values() for w in f.waiters]
        wakes += [w.retry_at for w in self.lock_waits.values()]
        wakes += [x.deadline for w in self.lock_waits.values() for x in w.waiters]
        if wakes:
            self._wake_at(min(wakes))

    def _wake_at(self, due: float) -> None:
        """Have the actor sweep at ``due`` (monotonic), unless it already will by then."""
        if time.monotonic() < self.timer_due <= due:
            return  # a sweep is due no later (a past due means that sweep was lost)
        if self.timer is not None:
            self.timer.cancel()
        self.timer_due = due
        self.timer = self.after(max(0.0, due - time.monotonic()), self._sweep)

    # -- locks ----------------------------------------------------------------------------

    @handles(CacheLock)
    def lock(self, msg: CacheLock) -> CacheLocked | None:
        backend = self._backend(msg.backend)
        name = self._key(msg.name, "name")
        _check_ttl(msg.ttl, "ttl", MAX_TIMEOUT)
        if not 0 <= msg.wait <= MAX_TIMEOUT:
            raise InvalidMessage(f"must be >= 0 and <= {MAX_TIMEOUT} seconds", path="wait")
        now = time.monotonic()
        wait = self.lock_waits.get((backend.name, name))
        if wait is None:  # else those waiting here come first
            token, held_for = backend.lock(name, msg.ttl)
            if token:
                return CacheLocked(name=name, acquired=True, token=token)
            wait = _LockWait(now + held_for)
        if not msg.wait:
            return CacheLocked(name=name, acquired=False)
        reply = self.defer_reply()
        if not reply.pending:
            return None
        self.lock_waits[backend.name, name] = wait
        wait.waiters.append(_Waiter(reply, now + msg.wait, msg.ttl))
        self._wake_at(min(wait.retry_at, now + msg.wait))
        return None  # answered by _retry_lock

    @handles(CacheUnlock)
    def unlock(self, msg: CacheUnlock) -> CacheUnlocked:
        backend = self._backend(msg.backend)
        released = backend.unlock(self._key(msg.name, "name"), msg.token)
        if released and (backend.name, msg.name) in self.lock_waits:
            self._retry_lock(backend.name, msg.name)
        return CacheUnlocked(released=released)

    @handles(CacheExtend)
    def extend(self, msg: CacheExtend) -> CacheExtended:
        backend = self._backend(msg.backend)
        _check_ttl(msg.ttl, "ttl", MAX_TIMEOUT)
        return CacheExtended(
            extended=backend.extend_lock(self._key(msg.name, "name"), msg.token, msg.ttl)
        )

    def _retry_lock(self, backend_name: str, name: str) -> None:
        """The lock may be free: the first caller waiting here for it tries to take it;
        those whose ``wait`` is over are told they did not get it."""
        wait = self.lock_waits[backend_name, name]
        now = time.monotonic()
        waiting = []
        for waiter in wait.waiters:
            if waiter.deadline <= now:
                waiter.reply.resolve(CacheLocked(name=name, acquired=False))
            else:
                waiting.append(waiter)
        wait.waiters = waiting
        if waiting:
            try:
                token, held_for = self.backends[backend_name].lock(name, waiting[0].lease_ttl)
            except CorralError as exc:
                for waiter in waiting:
                    waiter.reply.fail(exc)
                waiting.clear()
            else:
                if token:
                    first = waiting.pop(0)
                    first.reply.resolve(CacheLocked(name=name, acquired=True, token=token))
                    held_for = first.lease_ttl
                wait.retry_at = now + held_for
        if not waiting:
            del self.lock_waits[backend_name, name]
            return
        self._wake_at(min(wait.retry_at, *(w.deadline for w in waiting)))

    # -- other threads' news, on the actor thread -----------------------------------------

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Resync):
            backend = self.backends.get(message.backend)
            if isinstance(backend, RedisBackend):
                backend.resync()  # messages may have been lost: every waiter looks again
                self._lease_news(backend.name, [k for b, k in self.flights if b == backend.name])
        elif isinstance(message, tuple):
            name, event = message
            backend = self.backends.get(name)
            if not isinstance(backend, RedisBackend):
                return None
            if isinstance(event, CacheInvalidated):
                backend.invalidated(event)
                if event.origin != self.origin:
                    self._lease_news(name, event.keys)
            elif isinstance(event, CacheLeaseEnded) and event.origin != self.origin:
                self._lease_news(name, [event.key])
            elif (
                isinstance(event, CacheLockReleased)
                and event.origin != self.origin
                and (name, event.name) in self.lock_waits
            ):
                self._retry_lock(name, event.name)
        else:
            return super().on_receive(message)
        return None

    # -- health ---------------------------------------------------------------------------

    def health(self) -> Health:
        status = "healthy"
        details: dict[str, Any] = {"default_backend": self.default_backend, "backends": {}}
        metrics: dict[str, Any] = {}
        per_backend = {}
        for name, backend in self.backends.items():
            backend_status, backend_details = backend.status()
            details["backends"][name] = {"status": backend_status, **backend_details}
            if _SEVERITY[backend_status] > _SEVERITY[status]:
                status = backend_status
            stats = per_backend[name] = backend.stats()
            for counter, value in stats.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    metrics[f"backends.{name}.{counter}"] = value
        total = _total(per_backend.values())
        metrics.update({f"cache_{k}": v for k, v in total.items()})
        counted = self.corral_metrics
        metrics["leases"] = len(self.flights)
        metrics["batched_gets"] = int(counted.value(BATCHED_GETS))
        metrics["batched_sets"] = int(counted.value(BATCHED_SETS))
        metrics["lease_waiters"] = sum(len(f.waiters) for f in self.flights.values())
        metrics["lock_waiters"] = sum(len(w.waiters) for w in self.lock_waits.values())
        counted.set(LEASES, metrics["leases"])
        counted.set(LEASE_WAITERS, metrics["lease_waiters"])
        return Health(status=status, details=details, metrics=metrics)  # type: ignore[arg-type]

    # -- input ----------------------------------------------------------------------------

    def _backend(self, name: str) -> Backend:
        backend = self.backends.get(name or self.default_backend)
        if backend is None:
            raise InvalidMessage(
                f"no cache backend named {name!r} (backends: {', '.join(self.backends)})",
                path="backend",
            )
        return backend

    def _key(self, key: str, path: str = "key") -> str:
        if not key:
            raise InvalidMessage("a cache key must not be empty", path=path)
        if len(key) * 4 > self.max_key_length and len(key.encode()) > self.max_key_length:
            raise InvalidMessage(
                f"a cache key must be at most {self.max_key_length} bytes, got {len(key.encode())}",
                path=path,
            )
        return key

    def _encode(self, backend: str, key: str, value: Any, lifetime: _Lifetime, path: str) -> bytes:
        try:
            data = self.values[backend].encode(
                key, value, refresh_at=lifetime.refresh_at, stale_at=lifetime.stale_at
            )
        except InvalidMessage as exc:
            raise InvalidMessage(exc.message, path=path) from None
        if len(data) > self.max_value_size:
            raise InvalidMessage(
                f"the value is {len(data)} bytes encoded, over the "
                f"{self.max_value_size}-byte limit (max_value_size)",
                path=path,
            )
        return data


@dataclass(frozen=True)
class _Lifetime:
    """When a value set now wants refreshing and goes stale (unix seconds; None: never),
    and its TTL in the backend (its ``ttl`` plus its ``stale_ttl``)."""

    stored_ttl: float | None
    refresh_at: float | None = None
    stale_at: float | None = None

    @classmethod
    def of(cls, options: BackendOptions, msg: CacheSet | CacheSetMany, now: float) -> _Lifetime:
        """Checked: InvalidMessage for refresh times the value's TTL cannot have. ``now``:
        unix seconds."""
        _check_ttl(msg.ttl, "ttl")
        _check_ttl(msg.stale_ttl, "stale_ttl")
        _check_ttl(msg.early_ttl, "early_ttl")
        ttl = options.default_ttl if msg.ttl is None else msg.ttl
        if ttl is None:
            for path in ("stale_ttl", "early_ttl"):
                if getattr(msg, path) is not None:
                    raise InvalidMessage(
                        "a value without a ttl (and a backend without a default_ttl) "
                        "never expires, so it has nothing to refresh",
                        path=path,
                    )
            return cls(msg.ttl)
        stale = options.stale_ttl if msg.stale_ttl is None else msg.stale_ttl
        early = options.early_ttl if msg.early_ttl is None else msg.early_ttl
        if early is not None and early >= ttl:
            if msg.early_ttl is None:  # the backend's default: not for values this short
                early = None
            else:
                raise InvalidMessage(f"must be less than the ttl ({ttl} s)", path="early_ttl")
        if stale is None and early is None:
            return cls(msg.ttl)
        return cls(
            stored_ttl=ttl + (stale or 0.0),
            refresh_at=now + ttl - (early or 0.0),
            stale_at=None if stale is None else now + ttl,
        )


def _check_ttl(value: float | None, path: str, limit: float = MAX_TTL) -> None:
    """The codec checks these bounds already; this keeps them with ``validate = false``."""
    if value is not None and not 0 < value <= limit:
        raise InvalidMessage(f"must be > 0 and <= {limit} seconds, got {value}", path=path)


def _time_out_waiters(key: str, flight: _Flight, now: float) -> None:
    """Answer the waiters whose ``wait`` is over with Timeout; keep the others."""
    waiting = []
    for waiter in flight.waiters:
        if waiter.deadline <= now:
            waiter.reply.fail(_timed_out(key))
        else:
            waiting.append(waiter)
    flight.waiters = waiting


def _timed_out(key: str) -> Timeout:
    return Timeout(f"no value for {key!r} was set while waiting", {"key": key})


def _total(stats: Any) -> dict[str, Any]:
    total: dict[str, Any] = dict.fromkeys(_SUMMED, 0)
    total["size"] = 0
    for backend in stats:
        for name in (*_SUMMED, "size"):
            total[name] += backend[name]
    lookups = total["hits"] + total["misses"]
    total["hit_rate"] = total["hits"] / lookups if lookups else 0.0
    return total


def _answer(reply: DeferredReply, outcome: Reply | CorralError) -> None:
    """Answer a request of a batch with its reply or its own error."""
    if isinstance(outcome, CorralError):
        reply.fail(outcome)
    else:
        reply.resolve(outcome)
