"""The runtime under every manager: the only module that touches pykka's private API.

pykka runs each manager as an actor; corral replaces its inbox with a bounded
:class:`Mailbox`, its futures with lighter ones, and its loop with one that
dispatches typed messages, counts what the handlers do and turns a crash into a
restart by the supervisor (:class:`ActorCore`). pykka's envelope and stop message
are used here and handed out from here (:data:`Envelope`, :data:`ActorStop`), so a
new pykka release is checked against one file; ``setup.cfg`` bounds pykka to the
releases tested (the lowest by ``make test-lower-bounds``, the newest by ``make test``).

Users subclass :class:`corral.Manager`, never anything here.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self, cast

import pykka
from pykka import ActorDeadError, ActorRegistry
from pykka._envelope import Envelope
from pykka.messages import _ActorStop as ActorStop

from corral._loops import call_soon_batched, settle
from corral.errors import CorralError, ManagerUnavailable, Overloaded
from corral.messages.base import ErrorReply, Message
from corral.metrics import LATENCY_BUCKETS, HandlerStats, ManagerMetrics

if TYPE_CHECKING:
    from corral.manager import Manager, ManagerContext

__all__ = [
    "PROBE",
    "ActorCore",
    "ActorStop",
    "AsyncioFuture",
    "CallbackFuture",
    "Envelope",
    "Mailbox",
    "Probe",
    "ReplyFuture",
    "Schedule",
    "admit_all",
    "current_manager",
]

log = logging.getLogger(__name__)


class Probe:
    """The supervisor's liveness probe: goes ahead of the queue, answered with Health."""

    __slots__ = ()


PROBE = Probe()


class Mailbox:
    """A bounded actor inbox.

    A full mailbox makes ``put`` wait up to ``put_timeout`` seconds, then raise
    :class:`Overloaded`. Stop requests and liveness probes always get in, and
    probes go ahead of ordinary messages, so a long backlog is not taken for a
    hung actor::

        mailbox = Mailbox(capacity=10_000, put_timeout=1.0, owner="cache")
        mailbox.put(Envelope(CacheGet(key="k")))
        envelope = mailbox.get()        # on the actor's thread: waits for one

    The envelopes wait in deques under one lock; the actor waits for them on a
    ``queue.SimpleQueue`` holding one token per envelope put, which waits and wakes in C
    (a ``queue.Queue`` runs a Python ``Condition`` on both sides of every message).
    """

    def __init__(
        self,
        capacity: int,
        put_timeout: float,
        owner: str,
        metrics: ManagerMetrics | None = None,
    ) -> None:
        self.capacity = capacity
        self.put_timeout = put_timeout
        self.owner = owner
        self.metrics = metrics or ManagerMetrics()
        """Counts ``overloaded``: the puts refused because the mailbox stayed full."""
        self.closed = False
        self.queue: deque[Envelope[Any]] = deque()
        self.urgent: deque[Envelope[Any]] = deque()
        self.mutex = threading.Lock()
        self.not_full = threading.Condition(self.mutex)
        self._putters = 0
        """How many puts wait for room (in ``not_full``)."""
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        """At least one per envelope waiting; more after ``take_head`` and ``drain``."""

    def qsize(self) -> int:
        return len(self.queue) + len(self.urgent)

    def empty(self) -> bool:
        return not (self.queue or self.urgent)

    def put(self, item: Envelope[Any], block: bool = True, timeout: float | None = None) -> None:
        message = item.message
        with self.mutex:
            if message is PROBE:
                self._check_open()
                self.urgent.append(item)
            else:
                if len(self.queue) >= self.capacity and not isinstance(message, ActorStop):
                    self._wait_for_room()
                self._check_open()
                self.queue.append(item)
        self._tokens.put(None)

    def get(self) -> Envelope[Any]:
        """The next envelope (a probe first), waiting for one."""
        while True:
            self._tokens.get()
            with self.mutex:
                if self.urgent:
                    return self.urgent.popleft()
                if self.queue:
                    if self._putters:
                        self.not_full.notify()
                    return self.queue.popleft()
            # A token whose envelope take_head or drain took: wait for the next.

    def _wait_for_room(self) -> None:
        deadline = time.monotonic() + self.put_timeout
        self._putters += 1
        try:
            while len(self.queue) >= self.capacity:
                if self.closed:
                    break  # drained while we waited: the put below must not go into a dead mailbox
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.metrics.overloaded += 1
                    raise Overloaded(
                        f"the {self.owner} mailbox stayed full ({self.capacity} messages) "
                        f"for {self.put_timeout:g}s",
                        {"manager": self.owner, "capacity": self.capacity},
                    )
                self.not_full.wait(remaining)
        finally:
            self._putters -= 1

    def _check_open(self) -> None:
        if self.closed:
            raise ActorDeadError(f"the {self.owner} actor has stopped")

    def try_put(self, item: Envelope[Any]) -> bool:
        """Put without waiting; False when the mailbox is full or closed."""
        with self.mutex:
            if self.closed or len(self.queue) >= self.capacity:
                return False
            self.queue.append(item)
        self._tokens.put(None)
        return True

    def try_tell(self, message: Any) -> bool:
        """Put ``message``, which nobody answers, without waiting; False when full or closed."""
        return self.try_put(Envelope(message))

    def requeue(self, envelopes: list[Envelope[Any]]) -> bool:
        """Put envelopes taken from a dead predecessor ahead of anything new.

        False, taking nothing, when this mailbox has closed meanwhile.
        """
        with self.mutex:
            if self.closed:
                return False
            self.queue.extendleft(reversed(envelopes))
        for _ in envelopes:
            self._tokens.put(None)
        return True

    def take_head(self, message_type: type[Message], limit: int) -> list[Envelope[Any]]:
        """The envelopes of ``message_type`` at the head of the queue, up to ``limit``."""
        taken: list[Envelope[Any]] = []
        with self.mutex:
            queue = self.queue
            while queue and len(taken) < limit and type(queue[0].message) is message_type:
                taken.append(queue.popleft())
            if taken and self._putters:
                self.not_full.notify(len(taken))
        return taken

    def drain(self) -> list[Envelope[Any]]:
        """Close the mailbox and take what is in it; later puts raise ActorDeadError."""
        with self.mutex:
            self.closed = True
            taken = list(self.urgent) + list(self.queue)
            self.urgent.clear()
            self.queue.clear()
            self.not_full.notify_all()
            return taken


class ReplyFuture(pykka.Future[Any]):
    """The future of an ask: set once, from any thread, and waited for by the caller.

    A lock taken when it is made is its whole state: ``set`` stores the outcome and
    releases it, ``get`` waits to take it (in C), where pykka's ``ThreadingFuture`` runs
    a Python ``Condition`` with a lock of its own per wait::

        future = ReplyFuture()
        mailbox.put(Envelope(message, reply_to=future))
        reply = future.get(timeout=5.0)     # pykka.Timeout when nothing came in time
    """

    # pykka.Future's own state, which its __init__ would set: as class defaults, unused.
    _get_hook = None
    _get_hook_result = None

    def __init__(self) -> None:  # not pykka.Future's, which costs as much again
        self._done = done = threading.Lock()
        done.acquire()
        self._value: Any = None
        self._error: BaseException | None = None

    def get(self, *, timeout: float | None = None) -> Any:
        if not self._done.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise pykka.Timeout(f"{timeout} seconds")
        self._done.release()  # for any later get
        if self._error is not None:
            raise self._error
        return self._value

    def set(self, value: Any | None = None) -> None:
        self._settle(value, None)

    def set_exception(self, exc_info: Any = None) -> None:
        self._settle(None, (exc_info or sys.exc_info())[1])

    def _settle(self, value: Any, error: BaseException | None) -> None:
        if not self._done.locked():
            raise queue.Full  # set already: as pykka's futures, set once
        self._value, self._error = value, error
        self._done.release()


class AsyncioFuture(pykka.Future[Any]):
    """A pykka future that resolves an asyncio future, so awaiting never blocks the loop.

    (pykka's own futures block the event loop when awaited: pykka #99.)
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()

    def get(self, *, timeout: float | None = None) -> Any:  # pragma: no cover - never called
        raise NotImplementedError("await AsyncioFuture.future instead")

    def set(self, value: Any | None = None) -> None:
        self._call(value, None)

    def set_exception(self, exc_info: Any = None) -> None:
        self._call(None, exc_info[1])

    def _call(self, value: Any, exc: BaseException | None) -> None:
        try:
            call_soon_batched(self.loop, settle, self.future, value, exc)
        except RuntimeError:  # the caller's event loop is closed: nobody is waiting any more
            log.debug("reply dropped: the asking event loop is closed")


class CallbackFuture(pykka.Future[Any]):
    """A pykka future that calls ``callback(value, error)`` when the reply is set.

    The callback runs on the replying actor's thread: it must not wait long (the
    remote server sends the reply of its only request in flight from there, in one
    round trip, and hands the others over to its replier).

    ``correlation`` names the request in the logs (a remote request's id, in hex).
    ``admit``, when given, is asked on the actor's thread right before the handler
    runs; False skips the request (``admit`` has then answered it, or left it to
    someone else). The remote server uses it to refuse a request past its deadline
    and to record that a request has started. ``admit_together``, when given, is
    asked instead, once, for all the requests a handler takes together from the
    mailbox (:meth:`corral.Manager.take_queued`) whose futures share it: it gets their
    futures (each with its ``request``, what the sender keeps about it) and says, in
    order, which may run, so that their starts are recorded in one round trip.
    ``sender`` names who sent a request from outside the process: one that crashes
    its manager is a dead letter, not a bug of the process (see
    :mod:`corral.supervisor`)::

        future = CallbackFuture(on_reply, admit=lambda: time.time() < deadline)
    """

    def __init__(
        self,
        callback: Callable[[Any, BaseException | None], None],
        *,
        admit: Callable[[], bool] | None = None,
        admit_together: Callable[[list[CallbackFuture]], list[bool]] | None = None,
        request: Any = None,
        sender: str = "",
        correlation: str = "",
    ) -> None:
        super().__init__()
        self.callback = callback
        self.admit = admit
        self.admit_together = admit_together
        self.request = request
        self.sender = sender
        self.correlation = correlation

    def get(self, *, timeout: float | None = None) -> Any:  # pragma: no cover - never called
        raise NotImplementedError("CallbackFuture delivers through its callback")

    def set(self, value: Any | None = None) -> None:
        self.callback(value, None)

    def set_exception(self, exc_info: Any = None) -> None:
        self.callback(None, exc_info[1])


_running = threading.local()


def current_manager() -> ActorCore | None:
    """The manager whose thread this is, or None: for the logs' context.

    Its ``corral_current_envelope`` is the message it is handling (None between two).
    """
    actor: ActorCore | None = getattr(_running, "actor", None)
    return actor


def admit_all(envelopes: list[Envelope[Any]]) -> list[Envelope[Any]]:
    """The envelopes whose requests may run now, taken together from the mailbox: each
    future's ``admit`` asked, or the ``admit_together`` futures share asked once."""
    verdicts = [True] * len(envelopes)
    together: dict[Callable[[list[CallbackFuture]], list[bool]], list[int]] = {}
    for index, envelope in enumerate(envelopes):
        future = envelope.reply_to
        if not isinstance(future, CallbackFuture):
            continue
        if future.admit_together is not None:
            together.setdefault(future.admit_together, []).append(index)
        elif future.admit is not None:
            verdicts[index] = future.admit()
    for admit, indexes in together.items():
        futures = [cast(CallbackFuture, envelopes[i].reply_to) for i in indexes]
        for index, verdict in zip(indexes, admit(futures), strict=True):
            verdicts[index] = verdict
    return [envelope for envelope, verdict in zip(envelopes, verdicts, strict=True) if verdict]


class Schedule:
    """Work for an actor's thread, due after ``delay`` seconds, then every ``interval``
    seconds (None: once); made by :meth:`corral.Manager.every` and
    :meth:`corral.Manager.after`.

    A daemon thread of its own waits, then puts the schedule in the mailbox, where the
    actor's loop runs ``fn`` between two messages (see :meth:`run`). A run still queued
    is not queued again (a slow actor gets one, not a backlog); a mailbox that stays
    full skips that run. ``cancel`` stops it, from any thread; the actor cancels its
    schedules when it stops::

        schedule = Schedule(mailbox, sweep, delay=5.0, interval=5.0, name="sweep")
        schedule.start()
        ...
        schedule.cancel()
    """

    __slots__ = ("_cancelled", "_due", "_thread", "delay", "fn", "interval", "mailbox")

    def __init__(
        self,
        mailbox: Mailbox,
        fn: Callable[[], object],
        *,
        delay: float,
        interval: float | None,
        name: str,
    ) -> None:
        self.mailbox = mailbox
        self.fn = fn
        self.delay = delay
        self.interval = interval
        self._cancelled = threading.Event()
        self._due = threading.Event()
        """Set while a run waits in the mailbox."""
        self._thread = threading.Thread(target=self._wait_and_queue, name=name, daemon=True)

    @property
    def active(self) -> bool:
        """Started, not cancelled, and a run still to come or queued."""
        return not self._cancelled.is_set() and (self._thread.is_alive() or self._due.is_set())

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        """No run after this one (a run already queued is skipped)."""
        self._cancelled.set()

    def run(self) -> None:
        """On the actor's thread: ``fn()``, unless cancelled meanwhile. A corral error it
        raises is logged, as a handler's is answered; anything else crashes the actor."""
        self._due.clear()
        if self._cancelled.is_set():
            return
        try:
            self.fn()
        except CorralError as exc:
            log.warning("%s: %s", self._thread.name, exc)

    def _wait_and_queue(self) -> None:
        wait = self.delay
        while not self._cancelled.wait(max(0.0, wait)):
            if not self._due.is_set():
                self._due.set()
                try:
                    self.mailbox.put(Envelope(self))
                except Exception:  # stopping, or a mailbox that stayed full: skip this run
                    self._due.clear()
            if self.interval is None:
                return
            wait = self.interval


class ActorCore(pykka.ThreadingActor):
    """pykka's actor with corral's loop: typed dispatch, counters, a bounded mailbox, and
    a crash that stops the actor and tells its supervisor instead of running on.

    Everything kept here is named ``corral_*`` (as pykka's is ``actor_*``), so a
    manager's own attributes never collide with it. :class:`corral.Manager` is the
    public face on top.
    """

    use_daemon_thread = True  # a hung manager must not keep the process alive
    _corral_handlers: ClassVar[dict[type[Message], Callable[[Any, Any], Any]]] = {}
    """Message type -> handler, collected by :class:`corral.Manager` for each subclass."""

    def __init__(self, context: ManagerContext) -> None:
        self.corral_context = context
        super().__init__()
        self.corral_started_at = time.monotonic()
        metrics = context.metrics
        self.corral_handler_stats: dict[type[Message], HandlerStats] = {
            message_type: metrics.handler(getattr(message_type, "type_name", message_type.__name__))
            for message_type in self._corral_handlers
        }
        """Per message type handled, what its handler did (kept across restarts)."""
        self.corral_failure: BaseException | None = None
        self.corral_settled = threading.Event()
        self.corral_leftovers: list[Envelope[Any]] = []
        self.corral_thread: threading.Thread | None = None
        self.corral_current_envelope: Envelope[Any] | None = None
        self.corral_schedules: list[Schedule] = []

    @classmethod
    def corral_start(cls, context: ManagerContext) -> Self:
        """Create the actor and start its thread, as ``pykka.Actor.start`` does, and return
        the actor itself: its supervisor watches its thread, mailbox and failure."""
        actor = cls(context)
        ActorRegistry.register(actor.actor_ref)
        actor._start_actor_loop()
        return actor

    def _create_actor_inbox(self) -> Mailbox:  # type: ignore[override]
        context = self.corral_context
        return Mailbox(
            context.mailbox_size, context.mailbox_put_timeout, context.name, context.metrics
        )

    @property
    def corral_mailbox(self) -> Mailbox:
        """This manager's bounded inbox (``qsize()`` tells how many messages wait)."""
        inbox = self.actor_inbox
        assert isinstance(inbox, Mailbox)
        return inbox

    @property
    def corral_metrics(self) -> ManagerMetrics:
        """Where this manager counts: ``self.corral_metrics.add(REFUSED, "ip")``.

        Its supervisor keeps it across restarts (see :mod:`corral.metrics`).
        """
        return self.corral_context.metrics

    def corral_stats(self) -> dict[str, Any]:
        """Counters kept for every manager, since its first start; they go into
        ``Health.metrics``."""
        mailbox = self.corral_mailbox
        metrics = self.corral_context.metrics
        handlers = list(metrics.handlers.values())
        return {
            "handled": sum(stats.handled for stats in handlers),
            "errors": sum(stats.errors for stats in handlers) + metrics.unhandled,
            "handler_seconds": sum(stats.seconds.sum for stats in handlers),
            "mailbox_depth": mailbox.qsize(),
            "mailbox_capacity": mailbox.capacity,
            "overloaded": metrics.overloaded,
            "uptime_s": time.monotonic() - self.corral_started_at,
        }

    def corral_schedule(
        self, fn: Callable[[], object], *, delay: float, interval: float | None
    ) -> Schedule:
        """Start a :class:`Schedule` of ``fn`` on this actor, cancelled when it stops."""
        self.corral_schedules = [s for s in self.corral_schedules if s.active]
        kind = "every" if interval is not None else "after"
        schedule = Schedule(
            self.corral_mailbox,
            fn,
            delay=delay,
            interval=interval,
            name=f"corral-{kind}:{self.corral_context.name}",
        )
        self.corral_schedules.append(schedule)
        schedule.start()
        return schedule

    # -- pykka's loop, with corral's failure semantics ------------------------------------

    def _actor_loop(self) -> None:
        self.corral_thread = threading.current_thread()
        _running.actor = self
        try:
            super()._actor_loop()
        finally:
            self.corral_settled.set()
            if self.corral_context.on_exit is not None:
                manager = cast("Manager[Any]", self)
                self.corral_context.on_exit(manager, self.corral_failure, self.corral_leftovers)

    def _actor_loop_setup(self) -> None:
        try:
            super()._actor_loop_setup()  # pykka catches Exception in on_start, not SystemExit
        except BaseException as exc:  # a failed start, whatever it raised
            self._corral_crash(exc, run_hooks=False)  # as pykka: no on_failure for on_start
        self.corral_settled.set()

    def _actor_loop_running(self) -> None:
        inbox = self.actor_inbox
        stopped = self.actor_stopped
        handlers = self._corral_handlers
        handler_stats = self.corral_handler_stats
        clock = time.perf_counter
        bucket = functools.partial(bisect.bisect_left, LATENCY_BUCKETS)
        get = inbox.get
        while not stopped.is_set():
            envelope = get()
            reply_to = envelope.reply_to  # a remote request's admit() is asked right here
            if isinstance(reply_to, CallbackFuture) and reply_to.admit and not reply_to.admit():
                continue
            self.corral_current_envelope = envelope
            message = envelope.message
            try:
                handler = handlers.get(type(message))
                if handler is None:
                    if type(message) is Schedule:
                        message.run()
                        response = None
                    else:
                        response = self._handle_receive(message)  # pykka's own, probes
                else:
                    stats = handler_stats[type(message)]
                    started = clock()
                    try:
                        response = handler(self, message)
                    except CorralError as exc:
                        stats.errors += 1
                        response = ErrorReply.of(exc)
                    elapsed = clock() - started
                    stats.handled += 1
                    seconds = stats.seconds
                    seconds.counts[bucket(elapsed)] += 1
                    seconds.sum += elapsed
            except BaseException as exc:
                self._corral_crash(exc)
                if envelope.reply_to is not None:
                    what = getattr(envelope.message, "type_name", type(envelope.message).__name__)
                    unavailable = ManagerUnavailable(
                        f"manager {self.corral_context.name!r} crashed handling {what}: "
                        f"{type(exc).__name__}: {exc}",
                        {"manager": self.corral_context.name},
                    )
                    envelope.reply_to.set_exception((ManagerUnavailable, unavailable, None))
                return
            if envelope.reply_to is not None:
                try:
                    envelope.reply_to.set(response)
                except Exception:  # a caller that cannot take its reply is not our crash
                    log.warning(
                        "manager %s could not deliver a reply",
                        self.corral_context.name,
                        exc_info=True,
                    )
            self.corral_current_envelope = None

    def _actor_loop_teardown(self) -> None:
        for schedule in self.corral_schedules:
            schedule.cancel()
        self.corral_leftovers = self.corral_mailbox.drain()

    def _handle_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.corral_failure is None:
            self.corral_failure = exception_value
        super()._handle_failure(exception_type, exception_value, traceback)

    def _corral_crash(self, exc: BaseException, *, run_hooks: bool = True) -> None:
        self.corral_failure = exc
        log.error("manager %s crashed", self.corral_context.name, exc_info=exc)
        ActorRegistry.unregister(self.actor_ref)
        self.actor_stopped.set()
        if not run_hooks:
            return
        try:
            self.on_failure(type(exc), exc, exc.__traceback__)
        except Exception:
            log.exception("manager %s: on_failure raised", self.corral_context.name)
