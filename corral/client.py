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

How a reply comes back: ``ask`` sends the request and waits for its reply in one Redis
round trip, on the calling thread (the submit script and a ``BLPOP`` on the request's
own reply list, pipelined); with signing keys the reply must be signed for that list,
and pass a replay guard. ``ask_async``, ``ask_many`` and ``ask_many_async`` take their
replies from the client's reply topic, read by its bus; so do replies to requests other
tools send (``corral send``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar, cast

import redis

from corral._closing import Closing
from corral._events import EventsMixin
from corral._junk import REJECTED, junk_kind
from corral._loops import call_soon_batched, settle
from corral._redis import REDIS_ERRORS, KeptConnections, describe, node_of
from corral._redis import connect as connect_redis
from corral._wire import (
    REPLY_LIST,
    REPLY_LIST_TTL_MS,
    SUBMIT_SCRIPT,
    alive_key,
    new_reply_topic,
    reply_list_key,
    stream_key,
)
from corral.bus import Delivery, RedisBus
from corral.errors import (
    BackendUnavailable,
    CorralError,
    InvalidMessage,
    ManagerUnavailable,
    Timeout,
)
from corral.messages.base import (
    MAX_TIMEOUT,
    TIMEOUT,
    Message,
    Range,
    Reply,
    Request,
    check_batch,
    settled,
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

_WAIT_SLACK = 1.0
"""Seconds a reply list's ``BLPOP`` may take past its own timeout before the socket's
read gives up, at least: Redis unblocks it itself at the timeout."""

_SHORTEST_WAIT = 0.001
"""The shortest ``BLPOP`` timeout sent: Redis counts it in ms, and 0 waits forever."""


def _blpop(reply_list: str, timeout: float) -> tuple[Any, ...]:
    return ("BLPOP", reply_list, max(timeout, _SHORTEST_WAIT))


def _socket_timeout(wait: float) -> float:
    """How long a connection's reads may block, for a ``BLPOP`` of ``wait`` seconds: a
    power of two past it, so that connections are kept for a few timeouts only."""
    return float(2 ** math.ceil(math.log2(wait + _WAIT_SLACK)))


log = logging.getLogger(__name__)


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
            # A closed loop (RuntimeError) means nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                call_soon_batched(self.loop, settle, self.future, reply)


class _Submission(NamedTuple):
    """A request encoded for its stream: what the submit script takes."""

    message: Message
    request_id: bytes
    keys: list[str]
    args: list[Any]


_UNSENT = Timeout("not sent yet")
"""A batch's place holder for a request on its way."""


class Client(EventsMixin, Closing):
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
        self._connections = KeptConnections()
        self._list_guard = self.codec.replay_guard()
        """With keys, replies taken from reply lists pass it: fresh, and each once."""
        self._replies = self.bus.subscribe(self.reply_topic, callback=self._on_reply)

    # -- the System interface -------------------------------------------------------------

    def ask(self, message: Request[R], *, timeout: float | None = None) -> R:
        """Send a request to a daemon and return its reply (see :meth:`System.ask`)."""
        timeout = self._checked_timeout(timeout)
        answer: R = unwrap(self._ask_by_list(message, timeout))
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
        self._connections.close()
        self._redis.close()

    # -- internals ------------------------------------------------------------------------

    def _send(self, message: Message, timeout: float, waiter: _Waiter | None) -> bytes:
        submission = self._prepare(message, timeout, waiter)
        try:
            queued = self._submit(keys=submission.keys, args=submission.args)
        except REDIS_ERRORS as exc:
            queued = exc
        self._check_queued(submission, queued)
        return submission.request_id

    def _prepare(
        self, message: Message, timeout: float, waiter: _Waiter | None, *, by_list: bool = False
    ) -> _Submission:
        """``message`` checked and encoded for its manager's request stream; ``waiter``
        (None for a tell) is registered for its reply. ``by_list``: its reply goes to its
        own reply list, the third key (the submit script's third argument, its TTL)."""
        if self.validate:
            validate(message)
        manager = message.route()
        if manager is None:
            raise ManagerUnavailable(f"{message.type_name} names no manager to handle it")
        request_id = new_id()
        reply_to = (
            REPLY_LIST + self.reply_topic if by_list else self.reply_topic if waiter else None
        )
        stream = stream_key(self.namespace, manager)
        deadline_ms = int((time.time() + timeout) * 1000)
        data = self.codec.encode(
            message, id=request_id, reply_to=reply_to, deadline=deadline_ms, channel=stream
        )
        if waiter is not None:
            self._pending[request_id] = waiter
        keys: list[str] = [stream, alive_key(self.namespace, manager)]
        args: list[Any] = [data, STREAM_CAP]
        if by_list:
            keys.append(reply_list_key(self.namespace, manager, request_id))
            args.append(REPLY_LIST_TTL_MS)
        return _Submission(message, request_id, keys, args)

    def _ask_by_list(self, message: Message, timeout: float) -> Message:
        """Send ``message`` and wait for its reply on its own reply list, in one round
        trip: the submit script and a ``BLPOP`` on the list, pipelined on one connection."""
        submission = self._prepare(message, timeout, None, by_list=True)
        keys, args = submission.keys, submission.args
        reply_list = keys[2]
        deadline = time.monotonic() + timeout
        evalsha = ("EVALSHA", self._submit.sha, len(keys), *keys, *args)
        try:
            answers = self._blocking_call(reply_list, [evalsha, _blpop(reply_list, timeout)])
        except REDIS_ERRORS as exc:
            answers = [exc]
        queued = answers[0]
        if isinstance(queued, redis.ResponseError):
            # Nothing was queued (Redis lost the script, or the slot moved): again the
            # long way, through redis-py, which loads the script and follows the slot.
            try:
                queued = self._submit(keys=keys, args=args)
            except REDIS_ERRORS as exc:
                queued = exc
            answers = [queued]
        self._check_queued(submission, queued)
        # The reply; or, when no daemon serves, the item the script pushed, at once.
        popped = self._item(answers[1]) if len(answers) > 1 else b""
        while popped is not None:
            if popped:
                reply = self._reply_from(popped, reply_list, submission.request_id)
                if reply is not None:
                    return reply
            popped = self._pop(reply_list, deadline - time.monotonic())
        raise self._timeout(message, timeout)

    def _pop(self, reply_list: str, timeout: float) -> bytes | None:
        """The next item of ``reply_list`` within ``timeout`` seconds, or None."""
        if timeout <= 0:
            return None
        try:
            answer = self._blocking_call(reply_list, [_blpop(reply_list, timeout)])[0]
        except REDIS_ERRORS as exc:
            answer = exc
        return self._item(answer)

    def _item(self, answer: object) -> bytes | None:
        """The item a ``BLPOP`` answered, None when it timed out."""
        if isinstance(answer, Exception):
            raise BackendUnavailable(
                f"lost Redis while waiting for a reply: {describe(answer, self.where)}"
            ) from answer
        return None if answer is None else cast(list[bytes], answer)[1]

    def _blocking_call(self, key: str, commands: list[tuple[Any, ...]]) -> list[object]:
        """:meth:`KeptConnections.call` on the node holding ``key``; the last command, a
        ``BLPOP``, sets how long its answer may take."""
        wait = float(commands[-1][-1])
        return self._connections.call(node_of(self._redis, key), commands, _socket_timeout(wait))

    def _reply_from(self, data: bytes, reply_list: str, request_id: bytes) -> Message | None:
        """The reply in ``data`` popped from ``reply_list``; None (counted as junk) for
        anything else written there."""
        try:
            envelope = self.codec.decode(data, channel=reply_list, guard=self._list_guard)
        except InvalidMessage as exc:
            REJECTED.reject("client", junk_kind(exc), f"on {reply_list}: {exc}", log)
            return None
        if envelope.correlation != request_id:
            REJECTED.reject("client", "uncorrelated", f"on {reply_list}", log)
            return None
        return envelope.message

    def _check_queued(self, submission: _Submission, queued: object) -> None:
        """Raise what the submit script's answer (or error) means for ``submission``."""
        if queued and not isinstance(queued, BaseException):
            return
        self._pending.pop(submission.request_id, None)
        message = submission.message
        if isinstance(queued, BaseException):
            raise BackendUnavailable(
                f"cannot send {message.type_name}: {describe(queued, self.where)}"
            ) from queued
        manager = message.route() or ""
        raise ManagerUnavailable(
            f"no corral daemon is serving {manager} at {self.where} "
            f"in namespace {self.namespace!r}",
            {"manager": manager, "url": self.where, "namespace": self.namespace},
        )

    def ask_many(
        self, messages: Sequence[Request[Any]], *, timeout: float | None = None
    ) -> list[Reply | CorralError]:
        """:meth:`System.ask_many` to the daemons: every request sent in one Redis round
        trip (a pipeline), then their replies, in order, each error in its place."""
        timeout = self._checked_timeout(timeout)
        deadline = time.monotonic() + timeout
        results, sent = self._prepare_many(messages, timeout, None)
        try:
            for index, submission, waiter in self._queue_many(results, sent):
                if waiter.event.wait(max(0.0, deadline - time.monotonic())):
                    assert waiter.reply is not None
                    results[index] = settled(waiter.reply)
                else:
                    results[index] = self._timeout(submission.message, timeout)
        finally:
            self._forget(sent)
        return results

    async def ask_many_async(
        self, messages: Sequence[Request[Any]], *, timeout: float | None = None
    ) -> list[Reply | CorralError]:
        """:meth:`ask_many` for asyncio code: never blocks the event loop."""
        timeout = self._checked_timeout(timeout)
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        results, sent = self._prepare_many(messages, timeout, loop)
        try:
            waiting = await loop.run_in_executor(None, self._queue_many, results, sent)
            futures = [waiter.future for *_, waiter in waiting if waiter.future is not None]
            if futures:
                await asyncio.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
            for index, submission, waiter in waiting:
                if waiter.future is not None and waiter.future.done():
                    results[index] = settled(waiter.future.result())
                else:
                    results[index] = self._timeout(submission.message, timeout)
        finally:
            self._forget(sent)
        return results

    def _prepare_many(
        self,
        messages: Sequence[Request[Any]],
        timeout: float,
        loop: asyncio.AbstractEventLoop | None,
    ) -> tuple[list[Reply | CorralError], list[tuple[int, _Submission, _Waiter]]]:
        """The batch checked and encoded: the results so far (each refused request's error
        in its place), and the requests to send, with waiters for their replies (futures
        of ``loop``, when given)."""
        check_batch(messages)
        results: list[Reply | CorralError] = []
        sent: list[tuple[int, _Submission, _Waiter]] = []
        for index, message in enumerate(messages):
            waiter = _Waiter(loop)
            try:
                sent.append((index, self._prepare(message, timeout, waiter), waiter))
            except CorralError as exc:
                results.append(exc)
                continue
            results.append(_UNSENT)
        return results, sent

    def _queue_many(
        self,
        results: list[Reply | CorralError],
        sent: list[tuple[int, _Submission, _Waiter]],
    ) -> list[tuple[int, _Submission, _Waiter]]:
        """Send the prepared requests in one round trip; those now queued for a daemon
        (the others get their error in ``results``)."""
        answers = self._submit_all([submission for _, submission, _ in sent])
        waiting = []
        for (index, submission, waiter), queued in zip(sent, answers, strict=True):
            try:
                self._check_queued(submission, queued)
            except CorralError as exc:
                results[index] = exc
            else:
                waiting.append((index, submission, waiter))
        return waiting

    def _forget(self, sent: list[tuple[int, _Submission, _Waiter]]) -> None:
        for _, submission, _ in sent:
            self._pending.pop(submission.request_id, None)

    def _submit_all(self, submissions: list[_Submission]) -> list[object]:
        """The submit script's answers for ``submissions``, in one round trip (one per
        node, on a cluster); a request its pipeline could not run (a node that did not
        know the script yet, a slot that moved) is sent again alone."""
        answers: list[object] = [None] * len(submissions)
        for node, indexes in self._by_node(submissions).items():
            pipe = node.pipeline(transaction=False)
            for i in indexes:
                self._submit(keys=submissions[i].keys, args=submissions[i].args, client=pipe)
            try:
                done: list[object] = pipe.execute(raise_on_error=False)
            except REDIS_ERRORS as exc:
                done = [exc] * len(indexes)
            for i, answer in zip(indexes, done, strict=True):
                answers[i] = answer
        for i, answer in enumerate(answers):
            if isinstance(answer, Exception):
                try:
                    answers[i] = self._submit(keys=submissions[i].keys, args=submissions[i].args)
                except REDIS_ERRORS as exc:
                    answers[i] = exc
        return answers

    def _by_node(self, submissions: list[_Submission]) -> dict[redis.Redis, list[int]]:
        """The submissions by the client of the node their stream lives on (the one
        client, on standalone Redis or Sentinel)."""
        groups: dict[redis.Redis, list[int]] = {}
        for i, submission in enumerate(submissions):
            groups.setdefault(node_of(self._redis, submission.keys[0]), []).append(i)
        return groups

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
