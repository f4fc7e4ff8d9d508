"""Remote requests over Redis: the keys both sides use, and the daemon's RequestServer.

A request for manager ``m`` is one entry on the Redis Stream ``<ns>:{req:m}:stream``,
read by a consumer group of daemons, so exactly one daemon takes it however many
run. Each daemon keeps itself in the sorted set ``<ns>:{req:m}:alive`` (score = the
Redis time its heartbeat expires); a client adds a request only if some daemon is
alive there — one Lua call, so a request to no daemon fails at once instead of
waiting for a timeout. Both keys share a hash tag, so each command touches one cluster slot;
heartbeats and reads go manager by manager on a cluster.

The reply goes back on the caller's own channel (the envelope's reply topic),
correlated by the request id; then the entry is acknowledged and deleted. An
entry left pending by a daemon that died is claimed (XAUTOCLAIM) by another
after ``claim_idle`` seconds. Requests past their deadline are dropped unanswered:
their caller has given up already. A deadline (unix ms) further ahead than a
client can ask for (:data:`~corral.messages.base.MAX_TIMEOUT`, plus a minute of
clock skew), or negative, is refused with ``InvalidMessage`` (path ``d``).

::

    server = RequestServer(system, "redis://127.0.0.1:6379/0", codec=codec)
    server.start()      # serves every manager of ``system`` (and the supervisor's health)
"""

from __future__ import annotations

import functools
import logging
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import redis

from corral._redis import REDIS_ERRORS, connect, execute_then_publish, topology
from corral.actors.base import CallbackFuture
from corral.errors import CorralError, InvalidMessage, ManagerUnavailable
from corral.messages.base import MAX_TIMEOUT, ErrorReply, Message, Reply, validate
from corral.messages.codec import Codec, Envelope
from corral.system import System

__all__ = ["GROUP", "SUBMIT_SCRIPT", "RequestServer", "alive_key", "stream_key"]

log = logging.getLogger(__name__)

GROUP = "daemons"

CLOCK_SKEW = 60.0
"""Seconds a client's clock may run ahead of a daemon's, for the deadline check."""

SUBMIT_SCRIPT = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
if redis.call('ZCARD', KEYS[2]) == 0 then
  return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'm', ARGV[1], 'd', ARGV[2])
return 1
"""
"""KEYS: stream, alive set. ARGV: envelope, deadline (unix ms), stream cap. 1 = queued."""

HEARTBEAT_SCRIPT = """
local now = redis.call('TIME')
local expires = now[1] * 1000 + math.floor(now[2] / 1000) + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], expires, ARGV[1])
return expires
"""
"""KEYS: one alive set. ARGV: daemon id, TTL (ms). Uses Redis time, so clocks may differ."""


def stream_key(namespace: str, manager: str) -> str:
    return f"{namespace}:{{req:{manager}}}:stream"


def alive_key(namespace: str, manager: str) -> str:
    return f"{namespace}:{{req:{manager}}}:alive"


class RequestServer:
    """Serves remote requests for every manager of a System (run by the daemon)."""

    def __init__(
        self,
        system: System,
        url: str,
        *,
        codec: Codec,
        namespace: str = "corral",
        heartbeat_interval: float = 1.0,
        heartbeat_ttl: float = 3.0,
        claim_idle: float = 5.0,
        block: float = 0.5,
        batch: int = 64,
    ) -> None:
        self.system = system
        self.codec = codec
        self.namespace = namespace
        self.daemon_id = f"{uuid.uuid4().hex[:12]}"
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_ttl_ms = int(heartbeat_ttl * 1000)
        self.claim_idle_ms = int(claim_idle * 1000)
        self.block_ms = int(block * 1000)
        self.batch = batch
        self.managers = [*system.supervisor.names, "supervisor"]
        self.streams = {stream_key(namespace, m): m for m in self.managers}
        self._redis = connect(url, setting="remote url", socket_timeout=block + 5)
        # One command may only touch one cluster slot: a reader per manager there.
        if topology(self._redis) == "cluster":
            self._read_groups = [[stream] for stream in self.streams]
        else:
            self._read_groups = [list(self.streams)]
        self._heartbeat = self._redis.register_script(HEARTBEAT_SCRIPT)
        self._replies: queue.Queue[Any] = queue.Queue()
        # For what must wait (a full mailbox, a restart, the supervisor's health), so that
        # the reader never does.
        self._blocking = ThreadPoolExecutor(8, thread_name_prefix="corral-remote-wait")
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self.connected = False
        self.counts = {
            "served": 0, "expired": 0, "rejected": 0, "claimed": 0, "dropped": 0, "errors": 0,
        }  # fmt: skip

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
        loops: list[tuple[str, Callable[[], None]]] = [
            ("replier", self._reply_loop),
            ("heartbeat", self._heartbeat_loop),
        ]
        for index, streams in enumerate(self._read_groups):
            loops.append((f"reader-{index}", functools.partial(self._read_loop, streams)))
        for name, target in loops:
            thread = threading.Thread(target=target, name=f"corral-remote-{name}", daemon=True)
            thread.start()
            self._threads[name] = thread

    def stop(self) -> None:
        """Stop taking requests, finish replying, and leave the alive sets at once."""
        self._stop.set()
        for name, thread in self._threads.items():
            if name != "replier":
                thread.join(self.block_ms / 1000 + 5)
        self._replies.put(None)  # the replier sends what is left, then ends
        self._threads["replier"].join(5)
        self._blocking.shutdown(wait=False)
        try:
            pipe = self._redis.pipeline(transaction=False)
            for manager in self.managers:
                pipe.zrem(alive_key(self.namespace, manager), self.daemon_id)
            pipe.execute()
        except REDIS_ERRORS:
            pass  # the heartbeat expires by itself
        self._redis.close()

    # -- the loops ------------------------------------------------------------------------

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
                self._claim_abandoned()
            except REDIS_ERRORS as exc:
                log.debug("heartbeat failed: %s", exc)

    def _claim_abandoned(self) -> None:
        """Take over the requests held by daemons that are no longer alive.

        A request a live daemon is still handling is never claimed, however long
        it takes: claiming it would run it twice.
        """
        seconds, microseconds = self._redis.time()
        now_ms = seconds * 1000 + microseconds // 1000
        for stream, manager in self.streams.items():
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

    def _read_loop(self, streams: list[str]) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                if not self.connected:
                    self._ensure_groups()
                    self.connected = True
                    delay = 0.1
                    log.info("daemon %s reconnected to Redis", self.daemon_id)
                batches = self._redis.xreadgroup(
                    GROUP,
                    self.daemon_id,
                    dict.fromkeys(streams, ">"),
                    count=self.batch,
                    block=self.block_ms,
                )
            except REDIS_ERRORS as exc:
                if self.connected:
                    log.warning("remote requests: Redis unavailable (%s); reconnecting", exc)
                self.connected = False  # a NOGROUP after a Redis restart lands here too
                self._stop.wait(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 5.0)
                continue
            for stream, entries in cast(list[tuple[bytes, list[Any]]], batches or []):
                for entry_id, fields in entries:
                    self._handle(stream.decode(), entry_id, fields)

    def _handle(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Take one request entry. Never raises: a bad entry is acknowledged and counted."""
        try:
            self._take(stream, entry_id, fields)
        except Exception:
            self.counts["rejected"] += 1
            log.exception("could not take request %s on %s", entry_id, stream)
            self._replies.put((stream, entry_id, None, None, None))

    def _take(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            deadline = int(fields.get(b"d", b"0") or 0)
            envelope = self.codec.decode(fields.get(b"m", b""))
        except (ValueError, InvalidMessage) as exc:
            self.counts["rejected"] += 1
            log.warning("rejected a remote request on %s: %s", stream, exc)
            self._replies.put((stream, entry_id, None, None, None))
            return
        now = time.time()
        if not 0 <= deadline <= (now + MAX_TIMEOUT + CLOCK_SKEW) * 1000:
            self.counts["rejected"] += 1
            log.warning("rejected a remote request on %s: deadline %.40s", stream, deadline)
            problem = InvalidMessage(
                f"the deadline must be 0 (none) or a unix time in ms at most "
                f"{MAX_TIMEOUT} s ahead, got {str(deadline)[:40]}",
                path="d",
            )
            self._replies.put((stream, entry_id, envelope, None, problem))
            return
        if deadline and now * 1000 > deadline:
            self.counts["expired"] += 1
            self._replies.put((stream, entry_id, None, None, None))
            return
        message = envelope.message

        def answer(value: Any, error: BaseException | None) -> None:
            self._replies.put((stream, entry_id, envelope, value, error))

        remaining = min(MAX_TIMEOUT, max(0.001, deadline / 1000 - now)) if deadline else None
        if message.route() == "supervisor":
            self._blocking.submit(self._ask_blocking, message, remaining, answer)
            return
        callback = CallbackFuture(answer) if envelope.reply_to is not None else None
        if self.system.try_dispatch(message, callback):
            if callback is None:
                answer(None, None)  # a tell, now in the mailbox: acknowledge it
            return
        # A full mailbox or a manager restarting: wait for it off the reader thread.
        self._blocking.submit(self._dispatch_blocking, message, callback, remaining, answer)

    def _dispatch_blocking(
        self, message: Any, callback: CallbackFuture | None, timeout: float | None, answer: Any
    ) -> None:
        try:
            self.system.dispatch(message, callback, timeout=timeout)
        except CorralError as exc:
            if callback is not None:
                answer(None, exc)
                return
            self.counts["dropped"] += 1
            log.warning("dropped a remote tell of %s: %s", message.type_name, exc)
        if callback is None:
            answer(None, None)

    def _ask_blocking(self, message: Any, timeout: float | None, answer: Any) -> None:
        try:
            answer(self.system.ask(message, timeout=timeout), None)
        except CorralError as exc:
            answer(None, exc)

    def _encode_reply(self, reply: Message, envelope: Envelope) -> bytes:
        try:
            validate(reply)  # the caller's decoder would drop a reply out of bounds
            return self.codec.encode(reply, correlation=envelope.id)
        except InvalidMessage as exc:  # too big, or a manager's reply with bad fields
            log.error("reply to %s not encodable: %s", envelope.message.type_name, exc)
            return self.codec.encode(_unencodable(exc), correlation=envelope.id)

    def _reply_loop(self) -> None:
        while True:
            first = self._replies.get()
            if first is None:
                return
            items = [first]
            while len(items) < self.batch:
                try:
                    item = self._replies.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._replies.put(None)
                    break
                items.append(item)
            self._send_replies(items)

    def _send_replies(self, items: Iterable[tuple[Any, ...]]) -> None:
        items = list(items)
        replies: list[tuple[str, bytes]] = []
        for _, _, envelope, value, error in items:
            if envelope is not None and envelope.reply_to is not None:
                data = self._encode_reply(_as_reply(value, error, envelope), envelope)
                replies.append((f"{self.namespace}:{envelope.reply_to}", data))
                self.counts["served"] += 1
        for attempt in range(3):
            # A pipeline is emptied by execute(), failed or not: each attempt fills its own.
            pipe = self._redis.pipeline(transaction=False)
            for stream, entry_id, *_ in items:
                pipe.xack(stream, GROUP, entry_id)
                pipe.xdel(stream, entry_id)
            try:
                execute_then_publish(self._redis, pipe, replies)
                return
            except REDIS_ERRORS as exc:
                log.warning("could not send replies (attempt %d): %s", attempt + 1, exc)
                time.sleep(0.2 * (attempt + 1))
        self.counts["errors"] += 1


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
