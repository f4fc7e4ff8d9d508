"""The daemon's side of remote requests: the RequestServer.

Requests arrive as :mod:`corral._wire` describes them: one entry per request on the
manager's request stream, read by the daemons' consumer group, so exactly one daemon
takes it however many run; each daemon keeps itself in the manager's alive set, and
heartbeats and reads go manager by manager on a cluster. The reply goes where the
envelope's reply topic says, correlated by the request id: pushed to the request's own
reply list (which its caller waits on), or published on the caller's channel; in the
same round trip the entry is acknowledged and deleted. The reply to the only request in
flight is sent from the thread that produced it; under load the replier thread sends
the replies queued meanwhile together, and a read takes up to ``batch`` requests.

Handoff without loss or double execution:

- **Deadlines travel with the request**, inside its signed envelope (``d``). A
  request is never started after its deadline (checked when its handler is about to
  run, not only when it is read); it is dropped unanswered, its caller having given
  up. With signing keys, a request must also be signed for its stream, and one without
  a deadline must have a timestamp within the replay window. A deadline (unix ms) further
  ahead than a client can ask for (:data:`~corral.messages.base.MAX_TIMEOUT`, plus a
  minute of clock skew), or negative, is refused with ``InvalidMessage`` (path ``d``).
- **A dead daemon is noticed within ``heartbeat_ttl``** (2 s by default): every live
  daemon claims, at each heartbeat, the requests left pending by daemons missing from
  the alive set. A live daemon's requests are never claimed, however long they take.
- **At most once.** Right before the handler of a request that is not idempotent
  runs, the daemon records in Redis that it started it (``SET NX`` on
  ``<ns>:{req:m}:ran:<request id>``; one pipeline for the requests a handler takes
  together with ``take_queued``, which all start then); with the reply it records that it finished,
  and the reply itself. A daemon that takes over such a request answers from that
  record when it finished, and refuses it with ``ManagerUnavailable`` (details
  ``outcome = "unknown"``) when it had started: it may have been applied, so it is
  not applied again. Idempotent requests (reads, ``@message(idempotent=True)``) are
  simply run again. The same record answers a request id sent twice: from the record
  once it finished, with ``Conflict`` (details ``duplicate``) while it runs. With
  signing keys every request gets a run record, so that a replayed one never runs
  again: an idempotent request's keeps no reply, and its duplicate is refused with
  ``Conflict`` (details ``duplicate``) once it finished.
- **Drain.** :meth:`RequestServer.drain` stops reading (other daemons take new
  requests), finishes what it took, replies, and hands its singletons over.
- **Singletons.** A manager placed ``singleton`` runs on the one daemon holding its
  lease (``<ns>:{req:m}:lease``, renewed every quarter of ``lease_ttl``); only that
  daemon reads its requests, which wait in the stream meanwhile. A holder that cannot
  renew for half the TTL stops the manager before anyone else may take the lease.

::

    server = RequestServer(system, "redis://127.0.0.1:6379/0", codec=codec)
    server.start()      # serves every manager of ``system`` (and the supervisor's health)
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, cast

import redis

from corral._backoff import Backoff
from corral._junk import REJECTED, junk_kind
from corral._redis import (
    REDIS_ERRORS,
    KeptConnections,
    connect,
    describe,
    execute_then_publish,
    node_of,
    time_ms,
    topology,
)
from corral._runtime import CallbackFuture
from corral._wire import (
    GROUP,
    REPLY_LIST,
    REPLY_LIST_TTL_MS,
    alive_key,
    lease_key,
    record_key,
    reply_list_key,
    stream_key,
)
from corral.errors import Conflict, CorralError, InvalidMessage, ManagerUnavailable
from corral.messages.base import MAX_TIMEOUT, ErrorReply, Message, Reply, validate
from corral.messages.codec import Codec, Envelope
from corral.metrics import REQUEST_SECONDS
from corral.system import System

__all__ = ["RequestServer"]

log = logging.getLogger(__name__)

CLOCK_SKEW = 60.0
"""Seconds a client's clock may run ahead of a daemon's, for the deadline check."""

HEARTBEAT_SCRIPT = """
local now = redis.call('TIME')
local expires = now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], expires, ARGV[1])
return expires
"""
"""KEYS: one alive set. ARGV: daemon id, TTL (ms). Uses Redis time, so clocks may differ."""


RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
"""KEYS: a lease. ARGV: holder, TTL (ms). 1 = renewed, 0 = not held by ARGV[1]."""

RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
"""KEYS: a lease. ARGV: holder. Deletes the lease only if ARGV[1] holds it."""

STARTED = b"S"
FINISHED = b"F"
"""The first byte of a run record: started by the daemon named after it, or finished
with the encoded reply after it."""

_RECONNECT = Backoff(initial=0.1, cap=5.0)
"""Between two attempts to reach Redis again after it went away."""

RECORD_MARGIN_MS = 60_000
"""How long a run record outlives its request's deadline."""

UNDATED_RECORD_MS = 3_600_000
"""How long the run record of a request without a deadline is kept."""


@dataclass(eq=False, slots=True)
class _Entry:
    """One request entry taken from a stream, on its way to an answer."""

    stream: str
    entry_id: bytes
    manager: str
    envelope: Envelope | None = None
    deadline_ms: int = 0
    record: str = ""
    """Its run record's key, for a request that is not idempotent."""
    started: bool = False
    """This daemon recorded that it started it: its finish is recorded too."""
    taken_at: float = 0.0
    """When it was read off its stream (``time.perf_counter()``), for its latency."""


@dataclass(eq=False, slots=True)
class _Outcome:
    """What to do with a taken entry: reply (unless None), record, acknowledge."""

    entry: _Entry
    reply: Message | None = None
    recorded: bytes | None = None
    """The encoded reply found in the run record: sent as is."""


class RequestServer:
    """Serves remote requests for every manager of a System (run by the daemon)."""

    def __init__(
        self,
        system: System,
        url: str,
        *,
        codec: Codec,
        namespace: str = "corral",
        heartbeat_interval: float = 0.5,
        heartbeat_ttl: float = 2.0,
        claim_idle: float = 1.0,
        lease_ttl: float = 3.0,
        block: float = 0.5,
        batch: int = 64,
        daemon_id: str = "",
    ) -> None:
        self.system = system
        self.codec = codec
        # Requests are deduplicated by their run records: the guard checks timestamps only.
        self._window = codec.replay_guard(remember=False)
        self.namespace = namespace
        self.daemon_id = daemon_id or uuid.uuid4().hex[:12]
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_ttl_ms = int(heartbeat_ttl * 1000)
        self.claim_idle_ms = int(claim_idle * 1000)
        self.lease_ttl_ms = int(lease_ttl * 1000)
        self.block_ms = int(block * 1000)
        self.batch = batch
        self.managers = [*system.supervisor.names, "supervisor"]
        self.streams = {stream_key(namespace, m): m for m in self.managers}
        self.singletons = [
            spec.name for spec in system.supervisor.specs if spec.placement == "singleton"
        ]
        self.held: set[str] = set()
        """The singletons whose lease this daemon holds (it runs them and reads their requests)."""
        self._renewed_at: dict[str, float] = {}
        self._socket_timeout = block + 5
        self._redis = connect(url, setting="remote url", socket_timeout=self._socket_timeout)
        self._kept = KeptConnections()
        # One command may only touch one cluster slot: a reader per manager there.
        if topology(self._redis) == "cluster":
            self._read_groups = [[stream] for stream in self.streams]
        else:
            self._read_groups = [list(self.streams)]
        self._heartbeat = self._redis.register_script(HEARTBEAT_SCRIPT)
        self._renew = self._redis.register_script(RENEW_SCRIPT)
        self._release = self._redis.register_script(RELEASE_SCRIPT)
        self._outcomes: queue.Queue[_Outcome | None] = queue.Queue()
        # For what must wait (a full mailbox, a restart, the supervisor's health), so that
        # the reader never does.
        self._blocking = ThreadPoolExecutor(8, thread_name_prefix="corral-remote-wait")
        self._reading = threading.Event()
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._idle = threading.Condition()
        self._sending = threading.Lock()
        """Held while replies are sent: by the replier, or by a manager's thread replying
        to a lone request (see ``_send_alone``)."""
        self._in_flight = 0
        self._admitting = True
        self.draining = False
        self.connected = False
        self.counts = {
            "served": 0, "expired": 0, "rejected": 0, "claimed": 0, "dropped": 0, "errors": 0,
            "unknown_outcome": 0, "answered_from_record": 0, "quarantined": 0,
            "admitted_together": 0,
        }  # fmt: skip

    @property
    def in_flight(self) -> int:
        """Requests taken and not yet answered."""
        return self._in_flight

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Announce this daemon (when Redis answers) and start serving in the background."""
        try:
            self._ensure_groups()
            self._announce()
            self.connected = True
            log.info(
                "daemon %s serves remote requests for %s", self.daemon_id, ", ".join(self.managers)
            )
        except REDIS_ERRORS as exc:
            log.warning("remote requests: Redis unavailable at start (%s); retrying", exc)
        self._reading.set()
        loops: list[tuple[str, Callable[[], None]]] = [
            ("replier", self._reply_loop),
            ("heartbeat", self._heartbeat_loop),
        ]
        if self.singletons:
            loops.append(("leases", self._lease_loop))
        for index, streams in enumerate(self._read_groups):
            loops.append((f"reader-{index}", functools.partial(self._read_loop, streams)))
        for name, target in loops:
            thread = threading.Thread(target=target, name=f"corral-remote-{name}", daemon=True)
            thread.start()
            self._threads[name] = thread

    def drain(self, timeout: float) -> int:
        """Stop taking requests, finish those taken, hand the singletons over, and leave.

        Other daemons take new requests from the moment this is called. Returns how
        many requests were still running after ``timeout`` seconds; those are left to
        the other daemons (one that had started is refused there, not run twice).
        """
        if self.draining:
            return self._in_flight
        self.draining = True
        self._reading.clear()
        for name, thread in self._threads.items():
            if name.startswith("reader"):
                thread.join(self.block_ms / 1000 + 5)
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight and (remaining := deadline - time.monotonic()) > 0:
                self._idle.wait(remaining)
            left = self._in_flight
            self._admitting = False
        if left:
            log.warning(
                "drain: %d requests still running after %gs; other daemons take them",
                left,
                timeout,
            )
        self._stop.set()
        for name in ("heartbeat", "leases"):
            loop = self._threads.get(name)
            if loop is not None:
                loop.join(self.heartbeat_interval + 5)
        for name in sorted(self.held):
            self._hand_over(name, "this daemon is stopping")
        self._leave()
        return left

    def stop(self) -> None:
        """Drain at once if not drained, send the replies left, close the connection."""
        self.drain(0)
        self._outcomes.put(None)  # the replier sends what is left, then ends
        replier = self._threads.get("replier")
        if replier is not None:
            replier.join(5)
        self._blocking.shutdown(wait=False)
        self._kept.close()
        self._redis.close()

    def _leave(self) -> None:
        try:
            pipe = self._redis.pipeline(transaction=False)
            for manager in self.managers:
                pipe.zrem(alive_key(self.namespace, manager), self.daemon_id)
            pipe.execute()
        except REDIS_ERRORS:
            pass  # the heartbeat expires by itself

    # -- presence and claims --------------------------------------------------------------

    def _announce(self) -> None:
        for manager in self.managers:
            self._heartbeat(
                keys=[alive_key(self.namespace, manager)],
                args=[self.daemon_id, self.heartbeat_ttl_ms],
            )

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                self._announce()
                if not self.draining:
                    self._claim_abandoned()
            except REDIS_ERRORS as exc:
                log.debug("heartbeat failed: %s", exc)

    def _claim_abandoned(self) -> None:
        """Take over the requests held by daemons that are no longer alive.

        A request a live daemon is still handling is never claimed, however long
        it takes: claiming it would run it twice.
        """
        now_ms = time_ms(self._redis.time())
        for stream, manager in self.streams.items():
            if not self._serves(manager):
                continue
            try:
                pending = cast(
                    list[dict[str, Any]],
                    self._redis.xpending_range(
                        stream, GROUP, "-", "+", self.batch, idle=self.claim_idle_ms
                    ),
                )
            except redis.ResponseError:
                continue  # no group yet: the reader creates it
            if not pending:
                continue
            alive = set(
                self._redis.zrangebyscore(alive_key(self.namespace, manager), now_ms, "+inf")
            )
            orphans: list[Any] = [p["message_id"] for p in pending if p["consumer"] not in alive]
            if not orphans:
                continue
            # The minimum idle time makes the claim exclusive: a second claimer finds the
            # entries freshly claimed and gets nothing.
            claimed = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                self._redis.xclaim(stream, GROUP, self.daemon_id, self.claim_idle_ms, orphans),
            )
            for entry_id, fields in claimed:
                if fields:
                    self.counts["claimed"] += 1
                    log.warning("claimed request %s on %s from a dead daemon", entry_id, stream)
                    self._handle(stream, entry_id, fields)

    def _ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                self._redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # -- singletons -----------------------------------------------------------------------

    def _serves(self, manager: str) -> bool:
        return manager not in self.singletons or manager in self.held

    def _lease_loop(self) -> None:
        tick = min(0.25, self.lease_ttl_ms / 4000)
        while not self._stop.wait(tick):
            for name in self.singletons:
                try:
                    self._keep_lease(name)
                except REDIS_ERRORS as exc:
                    renewed_at = self._renewed_at.get(name)
                    late = renewed_at is not None and (
                        time.monotonic() - renewed_at > self.lease_ttl_ms / 2000
                    )
                    if name in self.held and late:
                        self._hand_over(name, f"its lease could not be renewed: {describe(exc)}")

    def _keep_lease(self, name: str) -> None:
        key = lease_key(self.namespace, name)
        asked_at = time.monotonic()
        if name in self.held:
            if self._renew(keys=[key], args=[self.daemon_id, self.lease_ttl_ms]):
                self._renewed_at[name] = asked_at
            else:
                self._hand_over(name, "another daemon holds its lease")
        elif not self.draining and self._redis.set(
            key, self.daemon_id, nx=True, px=self.lease_ttl_ms
        ):
            self._renewed_at[name] = asked_at
            self.held.add(name)
            log.info("daemon %s holds the lease of singleton %s", self.daemon_id, name)
            self.system.supervisor.activate(name)

    def _hand_over(self, name: str, reason: str) -> None:
        """Stop a singleton this daemon ran, then give its lease up."""
        self.held.discard(name)
        self.system.supervisor.deactivate(name, reason)
        with suppress(*REDIS_ERRORS):  # else it expires by itself
            self._release(keys=[lease_key(self.namespace, name)], args=[self.daemon_id])
        self._renewed_at.pop(name, None)

    # -- taking requests ------------------------------------------------------------------

    def _read_loop(self, streams: list[str]) -> None:
        failures = 0
        while self._reading.is_set():
            serving = [stream for stream in streams if self._serves(self.streams[stream])]
            if not serving:
                self._stop.wait(self.block_ms / 1000)
                continue
            try:
                if not self.connected:
                    self._ensure_groups()
                    self.connected = True
                    failures = 0
                    log.info("daemon %s reconnected to Redis", self.daemon_id)
                batches = self._read(serving)
            except REDIS_ERRORS as exc:
                if self.connected:
                    log.warning("remote requests: Redis unavailable (%s); reconnecting", exc)
                self.connected = False  # a NOGROUP after a Redis restart lands here too
                failures += 1
                self._stop.wait(_RECONNECT.delay(failures))
                continue
            for stream, entries in batches:
                for entry_id, fields in entries:
                    self._handle(stream.decode(), entry_id, fields)

    def _read(self, streams: list[str]) -> list[tuple[bytes, list[Any]]]:
        """New entries of ``streams`` (one cluster slot), waiting up to ``block``: a raw
        ``XREADGROUP`` on a kept connection; on an error answer (a moved slot, a group
        Redis lost) again through redis-py, which follows the slot or raises."""
        command = ("XREADGROUP", "GROUP", GROUP, self.daemon_id, "COUNT", self.batch,
                   "BLOCK", self.block_ms, "STREAMS", *streams, *[">"] * len(streams))  # fmt: skip
        node = node_of(self._redis, streams[0])
        answer = self._kept.call(node, [command], self._socket_timeout)[0]
        if isinstance(answer, redis.ResponseError):
            answer = self._redis.xreadgroup(
                GROUP, self.daemon_id, dict.fromkeys(streams, ">"), count=self.batch,
                block=self.block_ms,
            )  # fmt: skip
            return cast(list[tuple[bytes, list[Any]]], answer or [])
        return [
            (stream, [(entry_id, _fields(flat)) for entry_id, flat in entries])
            for stream, entries in cast(list[tuple[bytes, list[Any]]], answer or [])
        ]

    def _handle(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Take one request entry. Never raises: a bad entry is acknowledged and counted."""
        entry = _Entry(stream, entry_id, self.streams.get(stream, ""), taken_at=time.perf_counter())
        with self._idle:
            self._in_flight += 1
        try:
            self._take(entry, fields)
        except Exception as exc:
            self.counts["rejected"] += 1
            REJECTED.reject("remote", "untakeable", f"{entry_id!r} on {stream}: {exc!r:.200}", log)
            self._finish(_Outcome(entry))

    def _take(self, entry: _Entry, fields: dict[bytes, bytes]) -> None:
        try:
            envelope = self.codec.decode(
                fields.get(b"m", b""), channel=entry.stream, guard=self._window
            )
        except InvalidMessage as exc:
            self.counts["rejected"] += 1
            REJECTED.reject("remote", junk_kind(exc), f"on {entry.stream}: {exc}", log)
            reply_to = getattr(exc, "reply_to", None)
            if isinstance(exc, InvalidMessage) and reply_to is not None:
                # Its envelope is sound: tell the caller what is wrong with the message.
                refusal = ErrorReply.of(exc)
                entry.envelope = Envelope(refusal, exc.request_id, reply_to=reply_to)  # type: ignore[attr-defined]
                self._finish(_Outcome(entry, refusal))
                return
            self._finish(_Outcome(entry))
            return
        entry.envelope = envelope
        deadline = envelope.deadline
        now = time.time()
        if not 0 <= deadline <= (now + MAX_TIMEOUT + CLOCK_SKEW) * 1000:
            self.counts["rejected"] += 1
            REJECTED.reject(
                "remote", "bad_deadline", f"on {entry.stream}: {str(deadline)[:40]}", log
            )
            if envelope.reply_to is None:
                self._finish(_Outcome(entry))
                return
            problem = InvalidMessage(
                f"the deadline must be 0 (none) or a unix time in ms at most "
                f"{MAX_TIMEOUT} s ahead, got {str(deadline)[:40]}",
                path="d",
            )
            self._answer(entry, None, problem)
            return
        entry.deadline_ms = deadline
        if self._expired(entry, now):
            return
        message = envelope.message
        if message.internal:
            self.counts["rejected"] += 1
            REJECTED.reject("remote", "internal_message", message.type_name, log)
            self._answer(
                entry,
                None,
                InvalidMessage(
                    f"{message.type_name} is internal: corral sends it to itself, never a client",
                    path="t",
                ),
            )
            return
        poison = self.system.supervisor.quarantined(message)
        if poison is not None:
            self.counts["quarantined"] += 1
            self._answer(
                entry,
                None,
                InvalidMessage(
                    f"this {message.type_name} crashed manager {entry.manager!r} before: "
                    "refused without running it (see corral dead-letters)",
                    details={"fingerprint": poison},
                ),
            )
            return
        if not message.idempotent or self.codec.signing:
            entry.record = record_key(self.namespace, entry.manager, envelope.id)
        remaining = min(MAX_TIMEOUT, max(0.001, deadline / 1000 - now)) if deadline else None
        if message.route() == "supervisor":
            self._blocking.submit(self._ask_blocking, entry, message, remaining)
            return
        callback = CallbackFuture(
            functools.partial(self._answer, entry, handled=True),
            admit=functools.partial(self._admit, entry),
            admit_together=self._admit_together,
            request=entry,
            sender=f"{envelope.reply_to or 'a tell'} through daemon {self.daemon_id}",
            correlation=envelope.id.hex(),
        )
        if self.system.try_dispatch(message, callback):
            return
        # A full mailbox or a manager restarting: wait for it off the reader thread.
        self._blocking.submit(self._dispatch_blocking, entry, message, callback, remaining)

    def _expired(self, entry: _Entry, now: float) -> bool:
        """Past its deadline: acknowledged unanswered, as its caller has given up."""
        if entry.deadline_ms and now * 1000 > entry.deadline_ms:
            self.counts["expired"] += 1
            self._finish(_Outcome(entry))
            return True
        return False

    def _admit(self, entry: _Entry) -> bool:
        """Asked on the manager's thread right before the handler runs; see the module doc."""
        if not self._may_start(entry):
            return False
        if not entry.record:
            return True
        try:
            previous: bytes | None = self._redis.set(  # type: ignore[assignment]
                entry.record,
                STARTED + self.daemon_id.encode(),
                nx=True,
                px=self._record_ttl_ms(entry),
                get=True,
            )
        except REDIS_ERRORS as exc:
            self._not_recorded(entry, exc)
            return False
        return self._admit_recorded(entry, previous)

    def _admit_together(self, futures: list[CallbackFuture]) -> list[bool]:
        """``_admit`` for the requests a handler takes together (``take_queued``): they all
        start now, so their starts are recorded in one round trip."""
        entries = [cast(_Entry, future.request) for future in futures]
        may_start = [self._may_start(entry) for entry in entries]
        recording = [e for e, ok in zip(entries, may_start, strict=True) if ok and e.record]
        if not recording:
            return may_start
        pipe = self._redis.pipeline(transaction=False)
        for entry in recording:
            started = STARTED + self.daemon_id.encode()
            pipe.set(entry.record, started, nx=True, px=self._record_ttl_ms(entry), get=True)
        try:
            found = dict(zip(map(id, recording), pipe.execute(), strict=True))
        except REDIS_ERRORS as exc:
            for entry in recording:
                self._not_recorded(entry, exc)
            return [ok and not e.record for e, ok in zip(entries, may_start, strict=True)]
        self.counts["admitted_together"] += len(recording)
        return [
            ok and (not e.record or self._admit_recorded(e, found[id(e)]))
            for e, ok in zip(entries, may_start, strict=True)
        ]

    def _may_start(self, entry: _Entry) -> bool:
        """Neither drained (left pending for another daemon) nor past its deadline."""
        return self._admitting and not self._expired(entry, time.time())

    def _not_recorded(self, entry: _Entry, exc: Exception) -> None:
        self._answer(
            entry,
            None,
            ManagerUnavailable(
                f"not started: its start could not be recorded ({describe(exc)})",
                {"manager": entry.manager},
            ),
        )

    def _admit_recorded(self, entry: _Entry, previous: bytes | None) -> bool:
        """Whether a request whose start this daemon tried to record runs: the record
        was not there (None), or says it may run again."""
        if previous is None:
            entry.started = True
            return True
        idempotent = entry.envelope is not None and entry.envelope.message.idempotent
        if previous.startswith(FINISHED):
            if idempotent:  # its record keeps no reply: a replay, or a resubmission
                self._refuse_duplicate(entry, "was answered already")
                return False
            self.counts["answered_from_record"] += 1
            self._finish(_Outcome(entry, recorded=previous[1:]))
            return False
        starter = previous[1:].decode(errors="replace")
        if self._is_alive(starter, entry.manager):
            # The same request id again while its first run goes on: a resubmission,
            # or a replay. Its first run answers.
            self._refuse_duplicate(entry, "is already running; it is answered once")
            return False
        if idempotent:  # its daemon stopped while running it: run again, as ever
            with suppress(*REDIS_ERRORS):  # else the record expires by itself
                self._redis.set(
                    entry.record, STARTED + self.daemon_id.encode(), px=self._record_ttl_ms(entry)
                )
            entry.started = True
            return True
        self.counts["unknown_outcome"] += 1
        log.warning(
            "request %s on %s was started by daemon %s, which stopped before answering; "
            "not running it again",
            entry.entry_id,
            entry.stream,
            starter,
            extra=_context(entry),
        )
        self._answer(
            entry,
            None,
            ManagerUnavailable(
                "the daemon that started this request stopped before answering: it may "
                "have been applied, so it is not run again",
                {"manager": entry.manager, "outcome": "unknown"},
            ),
        )
        return False

    def _refuse_duplicate(self, entry: _Entry, why: str) -> None:
        self._answer(
            entry,
            None,
            Conflict(
                f"a request with this id {why}",
                {"manager": entry.manager, "duplicate": True},
            ),
        )

    def _is_alive(self, daemon_id: str, manager: str) -> bool:
        """Whether a daemon's heartbeat is current (on Redis time); True if Redis fails."""
        if daemon_id == self.daemon_id:
            return True
        try:
            now_ms = time_ms(self._redis.time())
            expires = self._redis.zscore(alive_key(self.namespace, manager), daemon_id)
        except REDIS_ERRORS:
            return True
        return expires is not None and expires >= now_ms

    def _record_ttl_ms(self, entry: _Entry) -> int:
        if not entry.deadline_ms:
            return UNDATED_RECORD_MS
        return max(0, entry.deadline_ms - int(time.time() * 1000)) + RECORD_MARGIN_MS

    def _dispatch_blocking(
        self, entry: _Entry, message: Message, callback: CallbackFuture, timeout: float | None
    ) -> None:
        try:
            self.system.dispatch(message, callback, timeout=timeout)
        except CorralError as exc:
            self._answer(entry, None, exc)

    def _ask_blocking(self, entry: _Entry, message: Any, timeout: float | None) -> None:
        try:
            self._answer(entry, self.system.ask(message, timeout=timeout), None)
        except CorralError as exc:
            self._answer(entry, None, exc)

    def _answer(
        self, entry: _Entry, value: Any, error: BaseException | None, *, handled: bool = False
    ) -> None:
        """The reply to a taken request (or the end of a tell): hand it to the replier, or
        send it from here when ``handled`` (this is its manager's thread) and answered.
        A crash's error goes by the replier, as it always did: meanwhile the supervisor
        quarantines the request (see :mod:`corral.supervisor`), which the same request
        sent again at once then finds."""
        envelope = entry.envelope
        assert envelope is not None
        if envelope.reply_to is not None:
            outcome = _Outcome(entry, _as_reply(value, error, envelope))
        else:
            if error is not None:
                self.counts["dropped"] += 1
                REJECTED.reject(
                    "remote", "dropped_tell", f"{envelope.message.type_name}: {error}", log
                )
            outcome = _Outcome(entry)
        if handled and error is None and self._send_alone(outcome):
            return
        self._finish(outcome)

    def _send_alone(self, outcome: _Outcome) -> bool:
        """Send the outcome of the only request in flight from the thread that has it,
        sparing a hand-off to the replier, when the replier is idle; False if not sent.
        Under load, outcomes go to the replier, which sends them in batches."""
        if self._in_flight != 1 or not self._outcomes.empty():
            return False
        if not self._sending.acquire(blocking=False):
            return False
        try:
            sent = self._send_replies([outcome], attempts=1)
        finally:
            self._sending.release()
        if sent:
            self._settled(1)
        return sent

    def _finish(self, outcome: _Outcome) -> None:
        self._outcomes.put(outcome)

    def _settled(self, count: int) -> None:
        with self._idle:
            self._in_flight -= count
            self._idle.notify_all()

    # -- replying -------------------------------------------------------------------------

    def _reply_address(self, entry: _Entry) -> tuple[str, bool] | None:
        """Where the reply to ``entry`` goes: its reply list's key (True) or its caller's
        channel (False); None for a tell. See :mod:`corral._wire`."""
        envelope = entry.envelope
        if envelope is None or envelope.reply_to is None:
            return None
        if envelope.reply_to.startswith(REPLY_LIST):
            return reply_list_key(self.namespace, entry.manager, envelope.id), True
        return f"{self.namespace}:{envelope.reply_to}", False

    def _encode_reply(self, reply: Message, envelope: Envelope, address: str) -> bytes:
        try:
            validate(reply)  # the caller's decoder would drop a reply out of bounds
            return self.codec.encode(reply, correlation=envelope.id, channel=address)
        except InvalidMessage as exc:  # too big, or a manager's reply with bad fields
            log.error("reply to %s not encodable: %s", envelope.message.type_name, exc)
            return self.codec.encode(_unencodable(exc), correlation=envelope.id, channel=address)

    def _reply_loop(self) -> None:
        while True:
            first = self._outcomes.get()
            if first is None:
                return
            items = [first]
            while len(items) < self.batch:
                try:
                    item = self._outcomes.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._outcomes.put(None)
                    break
                items.append(item)
            try:
                with self._sending:
                    if not self._send_replies(items):
                        self.counts["errors"] += 1
            finally:
                self._settled(len(items))

    def _send_replies(self, outcomes: Iterable[_Outcome], *, attempts: int = 3) -> bool:
        """Send ``outcomes``' replies, records and acknowledgements in one round trip;
        False if all ``attempts`` failed."""
        outcomes = list(outcomes)
        pushes: list[tuple[str, bytes]] = []
        publishes: list[tuple[str, bytes]] = []
        records: list[tuple[str, bytes, int]] = []
        taken: dict[str, list[bytes]] = {}
        for outcome in outcomes:
            entry, envelope = outcome.entry, outcome.entry.envelope
            taken.setdefault(entry.stream, []).append(entry.entry_id)
            address = self._reply_address(entry)
            data = outcome.recorded
            if data is None and outcome.reply is not None and address is not None:
                assert envelope is not None
                data = self._encode_reply(outcome.reply, envelope, address[0])
            if data is not None and address is not None:
                (pushes if address[1] else publishes).append((address[0], data))
                self.counts["served"] += 1
            if entry.started:
                kept = b"" if envelope is None or envelope.message.idempotent else data or b""
                records.append((entry.record, FINISHED + kept, self._record_ttl_ms(entry)))
        if not publishes and len(taken) == 1 and self._send_raw(records, taken, pushes):
            self._observe_latency(outcomes)
            return True
        for attempt in range(attempts):
            # A pipeline is emptied by execute(), failed or not: each attempt fills its own.
            pipe = self._redis.pipeline(transaction=False)
            for key, value, ttl_ms in records:  # before the acknowledgement: see the module doc
                pipe.set(key, value, px=max(ttl_ms, 1))
            for stream, entry_ids in taken.items():
                pipe.xack(stream, GROUP, *entry_ids)
                pipe.xdel(stream, *entry_ids)
            for key, data in pushes:
                pipe.lpush(key, data)
                pipe.pexpire(key, REPLY_LIST_TTL_MS)
            try:
                execute_then_publish(self._redis, pipe, publishes)
            except REDIS_ERRORS as exc:
                log.warning("could not send replies (attempt %d): %s", attempt + 1, exc)
                if attempt + 1 < attempts:
                    time.sleep(0.2 * (attempt + 1))
                continue
            self._observe_latency(outcomes)
            return True
        return False

    def _send_raw(
        self,
        records: list[tuple[str, bytes, int]],
        taken: dict[str, list[bytes]],
        pushes: list[tuple[str, bytes]],
    ) -> bool:
        """What ``_send_replies`` sends for one stream and reply lists only, all in the
        stream's slot: as raw commands on a kept connection, sparing redis-py's pipeline
        and pool their cost. False when it failed (a moved slot, Redis gone): the caller
        sends it all again its usual way."""
        ((stream, entry_ids),) = taken.items()
        commands: list[tuple[Any, ...]] = [
            ("SET", key, value, "PX", max(ttl_ms, 1)) for key, value, ttl_ms in records
        ]
        commands += [("XACK", stream, GROUP, *entry_ids), ("XDEL", stream, *entry_ids)]
        for key, data in pushes:
            commands += [("LPUSH", key, data), ("PEXPIRE", key, REPLY_LIST_TTL_MS)]
        try:
            answers = self._kept.call(node_of(self._redis, stream), commands, self._socket_timeout)
        except REDIS_ERRORS:
            return False
        return not isinstance(answers[-1], redis.ResponseError)

    def _observe_latency(self, outcomes: list[_Outcome]) -> None:
        """Count each answered request's time here in its manager's request histogram."""
        now = time.perf_counter()
        metrics = self.system.supervisor.metrics()
        for outcome in outcomes:
            entry, envelope = outcome.entry, outcome.entry.envelope
            kept = metrics.get(entry.manager)
            if kept is None or envelope is None or envelope.message.kind != "request":
                continue  # the supervisor's health, or a refused entry
            kept.observe(REQUEST_SECONDS, now - entry.taken_at, envelope.message.type_name)


def _fields(flat: list[bytes] | None) -> dict[bytes, bytes]:
    """A stream entry's fields from a raw answer's ``[name, value, ...]`` (None: deleted)."""
    return dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}


def _context(entry: _Entry) -> dict[str, str]:
    """The log context of a request: its manager, message type and id."""
    context = {"manager": entry.manager}
    if entry.envelope is not None:
        context["message_type"] = entry.envelope.message.type_name
        context["correlation_id"] = entry.envelope.id.hex()
    return context


def _unencodable(exc: InvalidMessage) -> ErrorReply:
    return ErrorReply.of(ManagerUnavailable(f"the reply could not be sent: {exc}"))


def _as_reply(value: Any, error: BaseException | None, envelope: Envelope) -> Message:
    if error is None and isinstance(value, Reply):
        return value
    if isinstance(error, CorralError):
        return ErrorReply.of(error)
    return ErrorReply.of(
        ManagerUnavailable(
            f"{envelope.message.type_name} failed: {error or 'no reply'}",
            {"manager": envelope.message.route() or ""},
        )
    )
