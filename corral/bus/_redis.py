"""The Redis bus: topics as Redis pub/sub channels, shared by every process of a namespace."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
import uuid
from typing import Any

import redis
from redis.client import PubSub

from corral._backoff import Backoff
from corral._junk import REJECTED, junk_kind
from corral._redis import REDIS_ERRORS, connect, redact, subscriber
from corral.bus._bus import Bus
from corral.bus._glob import check_topic, is_pattern
from corral.bus._subscription import DEFAULT_CALLBACK_THREADS, Delivery, Subscription
from corral.errors import BackendUnavailable, InvalidMessage
from corral.messages.base import Message
from corral.messages.codec import Codec

__all__ = ["RedisBus"]

logger = logging.getLogger("corral.bus")

_CONNECT_TIMEOUT = 2.0
_SOCKET_TIMEOUT = 5.0

_Subs = tuple[Subscription, ...]


class RedisBus(Bus):
    """A bus over Redis pub/sub, shared by every process that uses the same namespace.

    Messages travel as :class:`~corral.messages.codec.Codec` envelopes, signed for their
    channel and verified when the codec has keys, and then also refused when replayed
    (a timestamp outside the codec's replay window, or an id this bus took within it);
    what fails to decode or verify is counted as ``rejected`` and dropped. One reader
    thread drains the pub/sub connection into the subscriptions' queues. When the
    connection is lost (or answers no health check for ``2 * health_check_interval``
    seconds) the reader reconnects with jittered exponential backoff, resubscribes
    everything and counts a reconnect; ``healthy`` is False meanwhile. Messages
    published during the outage are lost.

    ``subscribe`` returns once Redis has confirmed the subscription; while Redis is
    unreachable it returns at once, and the subscription starts with the connection.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "corral",
        codec: Codec | None = None,
        queue_size: int = 10_000,
        reconnect_initial: float = 0.1,
        reconnect_max: float = 5.0,
        health_check_interval: float = 5.0,
        own_topic: str | None = None,
        callback_threads: int = DEFAULT_CALLBACK_THREADS,
    ) -> None:
        if not namespace or is_pattern(namespace):
            raise ValueError(f"namespace must be non-empty and free of * ? [, got {namespace!r}")
        if not 0 < reconnect_initial <= reconnect_max:
            raise ValueError("need 0 < reconnect_initial <= reconnect_max")
        if health_check_interval <= 0:
            raise ValueError("health_check_interval must be positive")
        super().__init__(queue_size=queue_size, callback_threads=callback_threads)
        self.namespace = namespace
        self.codec = codec or Codec()
        self._replays = self.codec.replay_guard()
        self.where = redact(url)
        self._backoff = Backoff(reconnect_initial, reconnect_max)
        self._health_check_interval = health_check_interval
        self._prefix = f"{namespace}:".encode()
        # The reader's own channel, outside the namespace: it keeps the pub/sub
        # connection subscribed (and so watched) when nobody else is, its
        # confirmation proves a new connection works, and close() wakes the reader on it.
        self._control = f"__corral_bus__:{uuid.uuid4().hex}".encode()
        # RESP2: a dedicated pub/sub connection needs nothing from RESP3, and RESP2
        # spares a HELLO (and, on Redis < 7.4, a failing CLIENT MAINT_NOTIFICATIONS)
        # round trip on every reconnect. One retry lets publish() replace a pooled
        # connection that the server closed meanwhile.
        self._client = connect(
            url,
            setting="bus url",
            retries=1,
            connect_timeout=_CONNECT_TIMEOUT,
            socket_timeout=_SOCKET_TIMEOUT,
        )
        # redis-py's PubSub reconnects and resubscribes by itself from its retry
        # failure callback, silently and with its own channel list. Retrying on no
        # error at all turns that off: errors reach the reader, which owns reconnection
        # and builds a new subscriber client each time (on a cluster, the node it
        # listened to may be the one that died).
        self._url = url
        self._sub_client: redis.Redis | None = None
        # ``own_topic``: an exact topic only corral publishes on (a client's replies),
        # by sharded pub/sub: no pattern subscriber sees it, and on a cluster it stays on
        # one shard, so the reader listens on that topic's shard, where SSUBSCRIBE works.
        self._own_channel = self._prefix + own_topic.encode() if own_topic else None
        self._table_lock = threading.Lock()
        self._channels: dict[bytes, _Subs] = {}
        self._patterns: dict[bytes, _Subs] = {}
        self._pending: dict[tuple[bool, bytes], collections.deque[threading.Event]] = {}
        self._pubsub: PubSub | None = None
        self._healthy = False
        self._closing = threading.Event()
        self._first_attempt = threading.Event()
        self._outage_logged = False
        self._reader = threading.Thread(
            target=self._run, name=f"corral-bus-reader:{namespace}", daemon=True
        )
        self._reader.start()
        self._first_attempt.wait(_CONNECT_TIMEOUT + _SOCKET_TIMEOUT)

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else "closed" if self._closed else "disconnected"
        return f"<RedisBus {self.where} namespace={self.namespace!r} {state}>"

    @property
    def healthy(self) -> bool:
        return self._healthy and not self._closed

    def publish(self, topic: str, message: Message, *, correlation: bytes | None = None) -> None:
        """Encode and PUBLISH; raises BackendUnavailable when Redis cannot be reached."""
        check_topic(topic)
        self._check_open()
        channel = self._prefix + topic.encode()
        data = self.codec.encode(message, correlation=correlation, channel=channel)
        try:
            self._client.publish(channel, data)
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(
                f"cannot publish {topic!r}: Redis at {self.where} is unavailable ({exc})",
                {"topic": topic},
            ) from exc
        self._count("published")
        if self._publish_listeners:
            self._published(topic, message)

    # -- subscriptions: the tables, and the Redis subscriptions they are mirrored in -----

    def _table(self, sub: Subscription) -> tuple[bool, bytes, dict[bytes, _Subs]]:
        pattern = is_pattern(sub.pattern)
        table = self._patterns if pattern else self._channels
        return pattern, self._prefix + sub.pattern.encode(), table

    def _attach(self, sub: Subscription) -> None:
        pattern, name, table = self._table(sub)
        waiter: threading.Event | None = None
        with self._table_lock:
            others = table.get(name, ())
            table[name] = (*others, sub)
            pubsub = self._pubsub
            if pubsub is not None:
                pending = self._pending.setdefault((pattern, name), collections.deque())
                if others:
                    waiter = pending[-1] if pending else None
                else:
                    waiter = threading.Event()
                    pending.append(waiter)
                    try:
                        self._subscribe(pubsub, pattern, name)
                    except REDIS_ERRORS:
                        # The reader sees the broken connection and resubscribes all.
                        pending.pop()
                        waiter = None
                if not pending:
                    del self._pending[(pattern, name)]
        if waiter is not None:
            waiter.wait(_SOCKET_TIMEOUT)

    def _detach(self, sub: Subscription) -> None:
        pattern, name, table = self._table(sub)
        with self._table_lock:
            remaining = tuple(s for s in table.get(name, ()) if s is not sub)
            if remaining:
                table[name] = remaining
                return
            table.pop(name, None)
            pubsub = self._pubsub
            if pubsub is None or self._closing.is_set():
                return
            # On error the connection is broken, and the reader resubscribes without it.
            with contextlib.suppress(*REDIS_ERRORS):
                if pattern:
                    pubsub.punsubscribe(name)  # type: ignore[no-untyped-call]
                elif name == self._own_channel:
                    pubsub.sunsubscribe(name)  # type: ignore[no-untyped-call]
                else:
                    pubsub.unsubscribe(name)  # type: ignore[no-untyped-call]

    def _subscribe(self, pubsub: PubSub, pattern: bool, name: bytes) -> None:
        if pattern:
            pubsub.psubscribe(name)
        elif name == self._own_channel:
            pubsub.ssubscribe(name)
        else:
            pubsub.subscribe(name)

    def _shutdown(self) -> None:
        self._closing.set()
        if self._healthy:
            # Wakes the reader at once; failing that, it sees the flag within a poll.
            with contextlib.suppress(*REDIS_ERRORS):
                self._client.publish(self._control, b"")
        self._reader.join(_CONNECT_TIMEOUT + _SOCKET_TIMEOUT + 1.0)
        self._client.close()
        if self._sub_client is not None:
            self._sub_client.close()

    # -- the reader thread -------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        connections = 0
        poll = min(1.0, self._health_check_interval / 2)
        while not self._closing.is_set():
            pubsub: PubSub | None = None
            connected = False
            try:
                pubsub = self._new_pubsub()
                started = time.monotonic()
                self._subscribe_all(pubsub)
                while not self._closing.is_set():
                    msg = pubsub.get_message(timeout=poll)
                    if msg is None:
                        self._check_alive(pubsub, started)
                    elif not connected and msg["channel"] == self._control:
                        connected = True
                        connections += 1
                        failures = 0
                        self._connected(reconnect=connections > 1)
                    else:
                        self._handle(msg)
            except REDIS_ERRORS as exc:
                self._disconnected(pubsub, exc, was_connected=connected)
            except Exception as exc:
                logger.exception("bus reader: unexpected error; reconnecting to %s", self.where)
                self._disconnected(pubsub, exc, was_connected=connected)
            else:
                self._disconnected(pubsub, None, was_connected=connected)
            failures += 1
            if self._closing.wait(self._backoff.delay(failures)):
                break

    def _new_pubsub(self) -> PubSub:
        if self._sub_client is not None:
            self._sub_client.close()
            self._sub_client = None
        self._sub_client = subscriber(
            self._url,
            setting="bus url",
            retry_on_no_error=True,
            connect_timeout=_CONNECT_TIMEOUT,
            socket_timeout=_SOCKET_TIMEOUT,
            health_check_interval=self._health_check_interval,
            shard_channel=self._own_channel.decode() if self._own_channel else None,
        )
        pubsub: PubSub = self._sub_client.pubsub()  # type: ignore[no-untyped-call]
        return pubsub

    def _subscribe_all(self, pubsub: PubSub) -> None:
        pubsub.subscribe(self._control)  # connects, with a PING round trip
        with self._table_lock:
            channels = [name for name in self._channels if name != self._own_channel]
            if channels:
                pubsub.subscribe(*channels)
            if self._own_channel in self._channels:
                pubsub.ssubscribe(self._own_channel)
            if self._patterns:
                pubsub.psubscribe(*self._patterns)
            self._pubsub = pubsub

    def _check_alive(self, pubsub: PubSub, started: float) -> None:
        # PubSub sends a PING once health_check_interval has passed without a read,
        # and every read pushes connection.next_health_check forward: silence for
        # two intervals means the PING went unanswered and the connection is dead.
        conn = pubsub.connection
        interval = self._health_check_interval
        if conn is None:
            raise redis.ConnectionError("the pub/sub connection is gone")
        last_read = max(started, conn.next_health_check - interval)
        if time.monotonic() - last_read > 2 * interval:
            raise redis.ConnectionError(f"no answer to a health check in {interval:g}s")

    def _connected(self, *, reconnect: bool) -> None:
        self._healthy = True
        self._first_attempt.set()
        if reconnect:
            self._count("reconnects")
            logger.info(
                "bus reconnected to Redis at %s: %d channels and %d patterns resubscribed",
                self.where,
                len(self._channels),
                len(self._patterns),
            )
        self._outage_logged = False

    def _disconnected(
        self, pubsub: PubSub | None, exc: Exception | None, *, was_connected: bool
    ) -> None:
        with self._table_lock:
            self._pubsub = None
            self._healthy = False
            pending, self._pending = self._pending, {}
        for waiters in pending.values():
            for waiter in waiters:
                waiter.set()
        if pubsub is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                pubsub.close()
        self._first_attempt.set()
        if exc is None or self._closing.is_set():
            return
        if was_connected:
            logger.warning(
                "bus lost its Redis connection to %s (%s); reconnecting", self.where, exc
            )
            self._outage_logged = True
        elif not self._outage_logged:
            logger.warning("bus cannot reach Redis at %s (%s); retrying", self.where, exc)
            self._outage_logged = True
        else:
            logger.debug("bus still cannot reach Redis at %s (%s)", self.where, exc)

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind in ("message", "smessage"):
            subs = self._channels.get(msg["channel"])
            if subs:
                self._dispatch(subs, msg["channel"], msg["data"])
        elif kind == "pmessage":
            subs = self._patterns.get(msg["pattern"])
            if subs:
                self._dispatch(subs, msg["channel"], msg["data"])
        elif kind in ("subscribe", "psubscribe", "ssubscribe"):
            key = (kind == "psubscribe", msg["channel"])
            with self._table_lock:
                waiters = self._pending.get(key)
                if waiters:
                    waiters.popleft().set()
                    if not waiters:
                        del self._pending[key]

    def _dispatch(self, subs: _Subs, channel: bytes, data: bytes) -> None:
        try:
            envelope = self.codec.decode(data, channel=channel, guard=self._replays)
        except InvalidMessage as exc:
            self._reject(channel, exc)
            return
        topic = channel[len(self._prefix) :].decode("utf-8", "replace")
        self._fan_out(subs, Delivery(topic, envelope.message, envelope.correlation))

    def _reject(self, channel: bytes, exc: InvalidMessage) -> None:
        self._count("rejected")
        REJECTED.reject(
            "bus", junk_kind(exc), f"on {channel.decode('utf-8', 'replace')}: {exc}", logger
        )
