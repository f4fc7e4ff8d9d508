"""Client: the System's interface, talking to running daemons over Redis.

::

    import corral
    from corral.messages.system import Ping

    with corral.connect("redis://127.0.0.1:6379/0") as remote:
        remote.ask(Ping(payload=b"hi"))                 # served by exactly one daemon
        for delivery in remote.subscribe("supervisor.child.*"):
            print(delivery.topic, delivery.message)

``ask``, ``ask_async``, ``tell``, ``publish`` and ``subscribe`` behave as on
:class:`corral.System`, so embedding code moves between in-process and remote
without change. A request when no daemon serves its manager fails at once with
``ManagerUnavailable``; one with no reply in time fails with ``Timeout``. The
URL may carry a password or ACL user (``redis://user:pass@host/0``), use TLS
(``rediss://``), name any node of a Redis Cluster, or name Sentinels
(``redis+sentinel://host:26379,host:26380/service``): see ``corral._redis``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import TracebackType
from typing import Any, TypeVar

from corral._events import EventsMixin
from corral._redis import REDIS_ERRORS, describe
from corral._redis import connect as connect_redis
from corral._wire import SUBMIT_SCRIPT, alive_key, new_reply_topic, stream_key
from corral.bus import Delivery, RedisBus
from corral.errors import BackendUnavailable, ManagerUnavailable, Timeout
from corral.messages.base import (
    MAX_TIMEOUT,
    TIMEOUT,
    Message,
    Range,
    Reply,
    Request,
    unwrap,
    validate,
)
from corral.messages.codec import Codec, new_id
from corral.messages.signing import DEFAULT_REPLAY_WINDOW
from corral.messages.system import SystemHealth, SystemHealthCheck

__all__ = ["Client", "connect"]

R = TypeVar("R", bound=Reply)

STREAM_CAP = 100_000
"""Approximate cap of a request stream: requests are deleted once served."""

_ASK_TIMEOUT = Range(gt=0, le=MAX_TIMEOUT, unit="s")


class _Waiter:
    """Where a reply lands: a threading event, or an asyncio future on its loop."""

    __slots__ = ("event", "future", "loop", "reply")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.reply: Message | None = None
        self.event = threading.Event()
        self.loop = loop
        self.future: asyncio.Future[Message] | None = loop.create_future() if loop else None

    def resolve(self, reply: Message) -> None:
        self.reply = reply
        self.event.set()
        if self.loop is not None and self.future is not None:
            future = self.future
            # A closed loop (RuntimeError) means nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(
                    lambda: None if future.done() else future.set_result(reply)
                )


class Client(EventsMixin):
    """A connection to the corral daemons on one Redis (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "corral",
        signing_keys: tuple[str, ...] | list[str] = (),
        replay_window: float = DEFAULT_REPLAY_WINDOW,
        ask_timeout: float = 5.0,
        validate_messages: bool = True,
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.ask_timeout: float = _ASK_TIMEOUT.check(ask_timeout, "ask_timeout")
        self.validate = validate_messages
        self.codec = Codec(keys=[k.encode() for k in signing_keys], replay_window=replay_window)
        self.reply_topic = new_reply_topic()
        self.bus = RedisBus(url, namespace=namespace, codec=self.codec, own_topic=self.reply_topic)
        self.where = self.bus.where
        self._redis = connect_redis(url, setting="url")
        self._submit = self._redis.register_script(SUBMIT_SCRIPT)
        self._pending: dict[bytes, _Waiter] = {}
        self._replies = self.bus.subscribe(self.reply_topic, callback=self._on_reply)

    # -- the System interface -------------------------------------------------------------

    def ask(self, message: Request[R], *, timeout: float | None = None) -> R:
        """Send a request to a daemon and return its reply (see :meth:`System.ask`)."""
        timeout = self._checked_timeout(timeout)
        waiter = _Waiter()
        request_id = self._send(message, timeout, waiter)
        try:
            if not waiter.event.wait(timeout):
                raise self._timeout(message, timeout)
        finally:
            self._pending.pop(request_id, None)
        answer: R = unwrap(waiter.reply)
        return answer

    async def ask_async(self, message: Request[R], *, timeout: float | None = None) -> R:
        """``ask`` for asyncio code: never blocks the event loop."""
        timeout = self._checked_timeout(timeout)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop)
        assert waiter.future is not None
        request_id = await loop.run_in_executor(None, self._send, message, timeout, waiter)
        try:
            reply = await asyncio.wait_for(waiter.future, timeout)
        except TimeoutError:
            raise self._timeout(message, timeout) from None
        finally:
            self._pending.pop(request_id, None)
        answer: R = unwrap(reply)
        return answer

    def tell(self, message: Message) -> None:
        """Queue a message for a daemon without waiting for its handling."""
        self._send(message, self.ask_timeout, None)

    def _durable_source(self) -> tuple[str, str]:
        return self.url, self.namespace

    def health(self, *, timeout: float | None = None) -> SystemHealth:
        """The daemons' system health, as ``System.health()`` gives it."""
        return self.ask(SystemHealthCheck(), timeout=timeout)

    def close(self) -> None:
        self._replies.close()
        self.bus.close()
        self._redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------

    def _send(self, message: Message, timeout: float, waiter: _Waiter | None) -> bytes:
        if self.validate:
            validate(message)
        manager = message.route()
        if manager is None:
            raise ManagerUnavailable(f"{message.type_name} names no manager to handle it")
        request_id = new_id()
        reply_to = self.reply_topic if waiter is not None else None
        stream = stream_key(self.namespace, manager)
        deadline_ms = int((time.time() + timeout) * 1000)
        data = self.codec.encode(
            message, id=request_id, reply_to=reply_to, deadline=deadline_ms, channel=stream
        )
        if waiter is not None:
            self._pending[request_id] = waiter
        try:
            queued = self._submit(
                keys=[stream, alive_key(self.namespace, manager)], args=[data, STREAM_CAP]
            )
        except REDIS_ERRORS as exc:
            self._pending.pop(request_id, None)
            raise BackendUnavailable(
                f"cannot send {message.type_name}: {describe(exc, self.where)}"
            ) from exc
        if not queued:
            self._pending.pop(request_id, None)
            raise ManagerUnavailable(
                f"no corral daemon is serving {manager} at {self.where} "
                f"in namespace {self.namespace!r}",
                {"manager": manager, "url": self.where, "namespace": self.namespace},
            )
        return request_id

    def _checked_timeout(self, timeout: float | None) -> float:
        """``timeout`` (seconds, 0 to a day; else InvalidMessage), or the default."""
        if timeout is None:
            return self.ask_timeout
        checked: float = TIMEOUT.check(timeout, "timeout")
        return checked

    def _on_reply(self, delivery: Delivery) -> None:
        if delivery.correlation is None:
            return
        waiter = self._pending.get(delivery.correlation)
        if waiter is not None:
            waiter.resolve(delivery.message)

    def _timeout(self, message: Message, timeout: float) -> Timeout:
        return Timeout(
            f"no reply to {message.type_name} from a daemon at {self.where} "
            f"in namespace {self.namespace!r} within {timeout:g}s",
            {"manager": message.route() or "", "timeout": timeout},
        )


def connect(url: str, **options: Any) -> Client:
    """Connect to the corral daemons on the Redis at ``url`` (see :class:`Client`)."""
    return Client(url, **options)
