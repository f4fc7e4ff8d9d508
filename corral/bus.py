"""The event bus: topics, glob subscriptions, and two implementations.

:class:`MemoryBus` is the embedded default and hands message objects over within
one process. :class:`RedisBus` carries them across processes over Redis pub/sub:
topic ``t`` is the channel ``<namespace>:t``, an exact topic is a SUBSCRIBE and
only a pattern (``*``, ``?``, ``[...]``) is a PSUBSCRIBE. Patterns follow Redis
glob rules in both buses::

    bus = MemoryBus()                      # or RedisBus("redis://localhost:6379/0")
    with bus.subscribe("supervisor.child.*") as sub:
        event = SupervisorChildChanged(child="cache", change="failed")
        bus.publish("supervisor.child.failed", event)
        delivery = sub.get(timeout=1.0)    # Delivery(topic, message), or None on timeout

    bus.subscribe("health.changed", callback=print)   # called on a thread of its own

    async for delivery in bus.subscribe("health.changed"):   # asyncio, without blocking the loop
        ...

Delivery is at most once. Every subscription has a bounded queue: when it is full
the delivery is dropped and counted (``Subscription.dropped``, ``Bus.stats()``).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import functools
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self

import redis
from redis.client import PubSub

from corral._backoff import Backoff
from corral._junk import REJECTED, junk_kind
from corral._redis import REDIS_ERRORS, connect, redact, subscriber
from corral.errors import BackendUnavailable, InvalidMessage
from corral.messages.base import Message
from corral.messages.codec import Codec

__all__ = [
    "Bus",
    "Delivery",
    "MemoryBus",
    "RedisBus",
    "Subscription",
    "compile_glob",
    "is_pattern",
]

logger = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")
_CONNECT_TIMEOUT = 2.0
_SOCKET_TIMEOUT = 5.0
_CALLBACK_JOIN_TIMEOUT = 5.0


def is_pattern(topic: str) -> bool:
    """True when ``topic`` holds a Redis glob character (``*``, ``?`` or ``[``)."""
    return not _GLOB_CHARS.isdisjoint(topic)


@functools.lru_cache(maxsize=1024)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile a Redis glob pattern to a regex, following Redis's ``stringmatchlen``.

    ``*`` any run, ``?`` one character, ``[abc]`` ``[^a]`` ``[a-z]`` (reversed ranges
    allowed, ``]`` right after ``[`` closes an empty set, an unclosed ``[`` runs to the
    end), and a backslash makes the next character literal, also inside brackets.

    Redis matches bytes, so the regex is written over the topic's UTF-8 bytes read
    as Latin-1: for an ASCII topic (every corral topic) that is the topic itself;
    otherwise match ``topic.encode().decode("latin-1")``, as :class:`MemoryBus` does.
    """
    p = pattern.encode().decode("latin-1")
    n = len(p)
    out: list[str] = []
    i = 0
    while i < n:
        c = p[i]
        if c == "*":
            while i + 1 < n and p[i + 1] == "*":
                i += 1
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            i, bracket = _compile_bracket(p, i + 1)
            out.append(bracket)
        else:
            if c == "\\" and i + 1 < n:
                i += 1
            out.append(re.escape(p[i]))
        i += 1
    return re.compile(r"\A(?:" + "".join(out) + r")\Z", re.DOTALL)


def _compile_bracket(p: str, i: int) -> tuple[int, str]:
    """Translate the set that starts at ``p[i]`` (just after ``[``); return its last index."""
    n = len(p)
    negate = i < n and p[i] == "^"
    if negate:
        i += 1
    ranges: list[tuple[str, str]] = []
    while True:
        if i + 1 < n and p[i] == "\\":
            i += 1
            ranges.append((p[i], p[i]))
        elif i < n and p[i] == "]":
            break
        elif i >= n:
            i = n - 1  # an unclosed set ends with the pattern, as in Redis
            break
        elif i + 2 < n and p[i + 1] == "-":
            low, high = sorted((p[i], p[i + 2]))
            ranges.append((low, high))
            i += 2
        else:
            ranges.append((p[i], p[i]))
        i += 1
    members = "".join(f"\\x{ord(lo):02x}-\\x{ord(hi):02x}" for lo, hi in ranges)
    if not members:
        return i, "." if negate else "(?!)"
    return i, f"[{'^' if negate else ''}{members}]"


def _byte_view(topic: str) -> str:
    return topic if topic.isascii() else topic.encode().decode("latin-1")


def _check_topic(topic: str) -> None:
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"a topic must be a non-empty string, got {topic!r}")
    if is_pattern(topic):
        raise ValueError(f"cannot publish to {topic!r}: topics must not contain * ? or [")


class Delivery(NamedTuple):
    """One message as a subscription receives it, with the topic it was published on.

    ``correlation`` is the id of the request a reply answers (remote requests), else None.
    """

    topic: str
    message: Message
    correlation: bytes | None = None


_Offer = Literal["delivered", "dropped", "closed"]
_Subs = tuple["Subscription", ...]


class Subscription:
    """Deliveries whose topic matches ``pattern``, in a bounded queue.

    Read them with :meth:`get`, by iterating (blocking), or with ``async for``;
    or pass ``callback`` to :meth:`Bus.subscribe` and they are handed to it on a
    thread of the subscription's own (then do not read them here as well).
    """

    def __init__(
        self,
        bus: Bus,
        pattern: str,
        *,
        queue_size: int,
        callback: Callable[[Delivery], None] | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.pattern = pattern
        self.dropped = 0
        self.callback_errors = 0
        self._bus = bus
        self._maxsize = queue_size
        self._items: collections.deque[Delivery] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._thread: threading.Thread | None = None
        if callback is not None:
            self._thread = threading.Thread(
                target=self._run_callback,
                args=(callback,),
                name=f"corral-bus-callback:{pattern}",
                daemon=True,
            )
            self._thread.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._items)} queued"
        return f"<Subscription {self.pattern!r} {state}, {self.dropped} dropped>"

    @property
    def closed(self) -> bool:
        return self._closed

    def get(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery; None on timeout or once the subscription is closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed, timeout)
            if self._closed or not self._items:
                return None
            return self._items.popleft()

    def __iter__(self) -> Iterator[Delivery]:
        while (delivery := self.get()) is not None:
            yield delivery

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Delivery]:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._closed:
                    return
                if self._items:
                    delivery: Delivery | None = self._items.popleft()
                else:
                    delivery = None
                    waiter: asyncio.Future[None] = loop.create_future()
                    self._async_waiters.append((loop, waiter))
            if delivery is not None:
                yield delivery
                continue
            try:
                await waiter
            finally:
                with self._cond:
                    if (loop, waiter) in self._async_waiters:
                        self._async_waiters.remove((loop, waiter))

    def close(self) -> None:
        """Stop receiving and unsubscribe; blocked readers get None. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._items.clear()
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        _wake(waiters)
        self._bus._unsubscribe(self)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_CALLBACK_JOIN_TIMEOUT)
            if thread.is_alive():
                logger.warning(
                    "subscription %r closed, but its callback is still running after %gs",
                    self.pattern,
                    _CALLBACK_JOIN_TIMEOUT,
                )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _offer(self, delivery: Delivery) -> _Offer:
        with self._cond:
            if self._closed:
                return "closed"
            if len(self._items) >= self._maxsize:
                self.dropped += 1
                return "dropped"
            self._items.append(delivery)
            self._cond.notify()
            if not self._async_waiters:
                return "delivered"
            waiters, self._async_waiters = self._async_waiters, []
        _wake(waiters)
        return "delivered"

    def _run_callback(self, callback: Callable[[Delivery], None]) -> None:
        for delivery in self:
            try:
                callback(delivery)
            except Exception:
                with self._cond:
                    self.callback_errors += 1
                self._bus._count("callback_errors")
                logger.exception(
                    "subscription %r: callback failed on %s", self.pattern, delivery.topic
                )


def _wake(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]) -> None:
    for loop, waiter in waiters:
        # RuntimeError: that event loop is closed, so nobody waits on it any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Bus(abc.ABC):
    """Publish events on topics; subscribe to topics or Redis-style glob patterns."""

    def __init__(self, *, queue_size: int = 10_000) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.queue_size = queue_size
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            ("published", "delivered", "dropped", "rejected", "reconnects", "callback_errors"), 0
        )
        self._subscriptions: set[Subscription] = set()
        self._closed = False
        self._publish_listeners: tuple[Callable[[str, Message], None], ...] = ()

    @abc.abstractmethod
    def publish(self, topic: str, message: Message, *, correlation: bytes | None = None) -> None:
        """Send ``message`` to every subscription matching ``topic``.

        ``correlation`` ties a reply to the request it answers (remote requests).
        """

    def on_publish(self, listener: Callable[[str, Message], None]) -> None:
        """Call ``listener(topic, message)`` on the publishing thread with every message
        published through this bus object, once it is sent: what this process publishes,
        not what it receives (the daemon's dashboard names the daemon of each event so).
        Keep it quick; an exception it raises is logged and counted as a callback error::

            bus.on_publish(lambda topic, message: print(topic))
        """
        with self._lock:
            self._publish_listeners = (*self._publish_listeners, listener)

    def _published(self, topic: str, message: Message) -> None:
        for listener in self._publish_listeners:
            try:
                listener(topic, message)
            except Exception:
                self._count("callback_errors")
                logger.exception("a publish listener failed on %s", topic)

    def subscribe(
        self,
        pattern: str,
        *,
        callback: Callable[[Delivery], None] | None = None,
        queue_size: int | None = None,
    ) -> Subscription:
        """Follow ``pattern``: an exact topic, or a glob when it holds ``*``, ``?`` or ``[``.

        With ``callback``, deliveries go to it on a dedicated thread; an exception
        it raises is logged and counted, and the next delivery goes to it as usual.
        """
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"a pattern must be a non-empty string, got {pattern!r}")
        self._check_open()
        size = self.queue_size if queue_size is None else queue_size
        sub = Subscription(self, pattern, queue_size=size, callback=callback)
        with self._lock:
            closed = self._closed
            if not closed:
                self._subscriptions.add(sub)
        if closed:  # closed meanwhile, by another thread
            sub.close()
            self._check_open()
        self._attach(sub)
        return sub

    def stats(self) -> dict[str, int]:
        """Counters: published, delivered, dropped, rejected, reconnects, callback_errors,
        and the number of open subscriptions."""
        with self._lock:
            return {**self._counts, "subscriptions": len(self._subscriptions)}

    @property
    def healthy(self) -> bool:
        return not self._closed

    def close(self) -> None:
        """Close every subscription and release the bus's resources. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subscriptions = list(self._subscriptions)
        for sub in subscriptions:
            sub.close()
        self._shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @abc.abstractmethod
    def _attach(self, sub: Subscription) -> None:
        """Start routing deliveries to a new subscription."""

    @abc.abstractmethod
    def _detach(self, sub: Subscription) -> None:
        """Stop routing deliveries to a closed subscription."""

    def _shutdown(self) -> None:  # noqa: B027 - an optional hook
        """Release what the implementation holds, after every subscription is closed."""

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(sub)
        self._detach(sub)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _fan_out(self, subs: Iterable[Subscription], delivery: Delivery) -> None:
        delivered = dropped = 0
        for sub in subs:
            outcome = sub._offer(delivery)
            if outcome == "delivered":
                delivered += 1
            elif outcome == "dropped":
                dropped += 1
        with self._lock:
            self._counts["delivered"] += delivered
            self._counts["dropped"] += dropped

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable("the bus is closed")


class MemoryBus(Bus):
    """An in-process bus: message objects are handed over as they are, never encoded."""

    def __init__(self, *, queue_size: int = 10_000) -> None:
        super().__init__(queue_size=queue_size)
        # Copy-on-write under self._lock, so that publish reads them without locking.
        self._exact: dict[str, tuple[Subscription, ...]] = {}
        self._patterns: tuple[tuple[re.Pattern[str], Subscription], ...] = ()

    def publish(self, topic: str, message: Message, *, correlation: bytes | None = None) -> None:
        _check_topic(topic)
        self._check_open()
        subs: Iterable[Subscription] = self._exact.get(topic, ())
        patterns = self._patterns
        if patterns:
            view = _byte_view(topic)
            matched = [sub for regex, sub in patterns if regex.match(view)]
            if matched:
                subs = [*subs, *matched]
        self._count("published")
        self._fan_out(subs, Delivery(topic, message, correlation))
        if self._publish_listeners:
            self._published(topic, message)

    def _attach(self, sub: Subscription) -> None:
        with self._lock:
            if is_pattern(sub.pattern):
                self._patterns = (*self._patterns, (compile_glob(sub.pattern), sub))
            else:
                self._exact[sub.pattern] = (*self._exact.get(sub.pattern, ()), sub)

    def _detach(self, sub: Subscription) -> None:
        with self._lock:
            if is_pattern(sub.pattern):
                self._patterns = tuple(entry for entry in self._patterns if entry[1] is not sub)
                return
            remaining = tuple(s for s in self._exact.get(sub.pattern, ()) if s is not sub)
            if remaining:
                self._exact[sub.pattern] = remaining
            else:
                self._exact.pop(sub.pattern, None)


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
    ) -> None:
        if not namespace or is_pattern(namespace):
            raise ValueError(f"namespace must be non-empty and free of * ? [, got {namespace!r}")
        if not 0 < reconnect_initial <= reconnect_max:
            raise ValueError("need 0 < reconnect_initial <= reconnect_max")
        if health_check_interval <= 0:
            raise ValueError("health_check_interval must be positive")
        super().__init__(queue_size=queue_size)
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
        _check_topic(topic)
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
