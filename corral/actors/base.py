"""The Manager base: a pykka actor with typed dispatch, health, counters and a bounded mailbox.

A manager declares the messages it handles with :func:`handles`; a handler
returns a Reply, or raises a :mod:`corral.errors` error, which answers the
caller and leaves the actor running::

    class Greeter(Manager):
        name = "greeter"

        @handles(Greet)
        def greet(self, msg: Greet) -> Greeting:
            if not msg.who:
                raise InvalidMessage("who must not be empty", path="who")
            return Greeting(text=f"hello {msg.who}")

Any other exception is a crash: the caller gets ``ManagerUnavailable``, the
actor stops and its supervisor is told (through the context), which restarts
it with the messages still queued in its mailbox.
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
import typing
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, Self, TypeVar, cast

import pykka
from pykka import ActorDeadError, ActorRegistry
from pykka._envelope import Envelope
from pykka.messages import _ActorStop

from corral.clock import Clock, SystemClock
from corral.config import Section, parse_options
from corral.errors import (
    ConfigError,
    CorralError,
    InvalidMessage,
    ManagerUnavailable,
    Overloaded,
)
from corral.messages.base import ErrorReply, Event, Message, Reply, Request
from corral.messages.system import Health, HealthCheck, Reconfigure, Reconfigured
from corral.metrics import LATENCY_BUCKETS, Family, HandlerStats, ManagerMetrics

__all__ = [
    "AsyncioFuture",
    "CallbackFuture",
    "Mailbox",
    "Manager",
    "ManagerContext",
    "Probe",
    "ReplyFuture",
    "Router",
    "current_manager",
    "handles",
]

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Reply)
M = TypeVar("M", bound=Message)
F = TypeVar("F", bound=Callable[..., Any])


class Router(Protocol):
    """What a manager may do outside itself: reach other managers by name, publish events."""

    def ask(self, message: Request[R], *, timeout: float | None = None) -> R: ...

    def tell(self, message: Message) -> None: ...

    def publish(self, topic: str, event: Event) -> None: ...


ExitCallback = Callable[["Manager[Any]", BaseException | None, list[Envelope[Any]]], None]


@dataclass
class ManagerContext:
    """Everything a manager gets from the system that runs it, as ``self.corral_context``."""

    name: str
    router: Router
    options: Mapping[str, Any] = field(default_factory=dict)
    mailbox_size: int = 10_000
    mailbox_put_timeout: float = 1.0
    on_exit: ExitCallback | None = None
    redis_url: str = ""
    """The system's Redis (``bus.url`` when the bus is on Redis): a default for managers."""
    namespace: str = "corral"
    """Prefix for the Redis keys and channels of this system (``bus.namespace``)."""
    signing_keys: tuple[bytes, ...] = ()
    """The codec's HMAC keys (``codec.signing_keys``; the first signs): for a manager's own
    signed Redis traffic."""
    metrics: ManagerMetrics = field(default_factory=ManagerMetrics)
    """Where the manager counts: its supervisor keeps it across restarts."""
    clock: Clock = field(default_factory=SystemClock)
    """Where the manager reads the time (its system's; a test's :class:`ManualClock`)."""


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
                if len(self.queue) >= self.capacity and not isinstance(message, _ActorStop):
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
            self.loop.call_soon_threadsafe(self._resolve, value, exc)
        except RuntimeError:  # the caller's event loop is closed: nobody is waiting any more
            log.debug("reply dropped: the asking event loop is closed")

    def _resolve(self, value: Any, exc: BaseException | None) -> None:
        if self.future.done():
            return
        if exc is not None:
            self.future.set_exception(exc)
        else:
            self.future.set_result(value)


class CallbackFuture(pykka.Future[Any]):
    """A pykka future that calls ``callback(value, error)`` when the reply is set.

    The callback runs on the replying actor's thread: it must only hand over
    (put in a queue), never wait on the network.

    ``correlation`` names the request in the logs (a remote request's id, in hex).
    ``admit``, when given, is asked on the actor's thread right before the handler
    runs; False skips the request (``admit`` has then answered it, or left it to
    someone else). The remote server uses it to refuse a request past its deadline
    and to record that a request has started. ``admit_together``, when given, is
    asked instead, once, for all the requests a handler takes together from the
    mailbox (:meth:`Manager.take_queued`) whose futures share it: it gets their
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


def current_manager() -> Manager[Any] | None:
    """The manager whose thread this is, or None: for the logs' context.

    Its ``corral_current_envelope`` is the message it is handling (None between two).
    """
    actor: Manager[Any] | None = getattr(_running, "actor", None)
    return actor


def _admit_all(envelopes: list[Envelope[Any]]) -> list[Envelope[Any]]:
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


def handles(*message_types: type[Message]) -> Callable[[F], F]:
    """Mark a Manager method as the handler of one or more message types."""

    def mark(func: F) -> F:
        func.__corral_handles__ = message_types  # type: ignore[attr-defined]
        return func

    return mark


if TYPE_CHECKING:
    from typing_extensions import TypeVar as _TypeVarWithDefault

    OptionsT = _TypeVarWithDefault("OptionsT", default=Mapping[str, Any])
else:
    OptionsT = TypeVar("OptionsT")
"""A manager's options: its ``Options`` section, or the raw ``[managers.<name>]`` table."""


class Manager(pykka.ThreadingActor, Generic[OptionsT]):
    """Base class of every corral manager. Subclasses set ``name`` and mark handlers.

    The type argument is the class of its typed options, which it gets parsed and
    checked from its ``[managers.<name>]`` table as ``self.options``::

        class Greeter(Manager[GreeterOptions]):
            name = "greeter"

            @handles(Greet)
            def greet(self, msg: Greet) -> Greeting:
                return Greeting(text=f"{self.options.greeting} {msg.who}")

    Without one (``class Greeter(Manager)``), ``self.options`` is the table as given.

    What a subclass may use: ``name``, ``Options``, ``placement``,
    ``metric_families``, ``options``, ``router``, ``defer_reply``, ``take_queued``,
    ``health`` and the hooks ``on_start``, ``on_stop`` and ``on_failure``. Everything
    else the base keeps is named ``corral_*`` (as pykka's is ``actor_*``), so a
    subclass's own attributes never collide with it: ``corral_context`` (the name it
    runs under, its Redis URL, namespace and signing keys), ``corral_mailbox``,
    ``corral_metrics`` (where it counts, kept across restarts) and ``corral_stats()``.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[Section] | None] = None
    """The typed options of ``[managers.<name>]``, taken from the type argument;
    None takes any options, unchecked."""
    placement: ClassVar[Literal["any", "singleton"]] = "any"
    """``any``: every daemon runs this manager, so it must keep no state of its own in
    memory. ``singleton``: one daemon of the namespace runs it at a time (a lease in
    Redis). ``[managers.<name>] placement`` overrides it."""
    metric_families: ClassVar[tuple[Family, ...]] = ()
    """The manager's own figures on ``/metrics``, counted into ``corral_metrics``
    (see :mod:`corral.metrics`)."""
    use_daemon_thread = True  # a hung manager must not keep the process alive
    _corral_handlers: ClassVar[dict[type[Message], Callable[[Any, Any], Any]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Options" not in cls.__dict__:
            cls.Options = _options_class(cls) or cls.Options
        handlers: dict[type[Message], Callable[[Any, Any], Any]] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                for message_type in getattr(attr, "__corral_handles__", ()):
                    handlers[message_type] = attr
        cls._corral_handlers = handlers

    def __init__(self, context: ManagerContext) -> None:
        self.corral_context = context
        self.options = cast(
            OptionsT,
            parse_options(self.Options, context.options, manager=context.name)
            if self.Options is not None
            else context.options,
        )
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

    # -- the public face for subclasses ---------------------------------------------------

    @property
    def router(self) -> Router:
        """Other managers, by name, and the bus: ``self.router.ask(CacheGet(key="k"))``."""
        return self.corral_context.router

    def defer_reply(self) -> pykka.Future[Any] | None:
        """Take the reply future of the request being handled, to answer it later.

        The handler's return value is then dropped; set the future (with a Reply,
        or an ErrorReply) when the answer is known, from any thread. None for a tell.
        Waiting callers cost a list entry, not a blocked mailbox::

            @handles(WaitFor)
            def wait_for(self, msg: WaitFor) -> None:
                self.waiters.append(self.defer_reply())
        """
        envelope = self.corral_current_envelope
        if envelope is None:
            return None
        future, envelope.reply_to = envelope.reply_to, None
        return future

    def take_queued(
        self, message_type: type[M], limit: int
    ) -> list[tuple[M, pykka.Future[Any] | None]]:
        """Requests of ``message_type`` waiting right behind the one being handled.

        For handling them together with it, e.g. in one Redis round trip for many
        callers. Only the consecutive ones at the head of the mailbox are taken, so
        nothing is overtaken; remote requests among them are admitted together (their
        starts recorded in one round trip). Answer each through its future (None for a
        tell)::

            @handles(CacheGet)
            def get(self, msg: CacheGet) -> CacheValue:
                for queued, future in self.take_queued(CacheGet, 100):
                    ...
        """
        taken = _admit_all(self.corral_mailbox.take_head(message_type, limit))
        self.corral_handler_stats[message_type].handled += len(taken)
        return [(envelope.message, envelope.reply_to) for envelope in taken]

    def health(self) -> Health:
        """This manager's own health; override to report backends and details."""
        return Health(status="healthy")

    def reconfigure(self, options: OptionsT) -> bool:
        """Take new options while running (``corral run`` on SIGHUP); False when they
        need a restart, which is the default. Runs on the actor's thread; ``self.options``
        becomes ``options`` once it returns True::

            def reconfigure(self, options: GreeterOptions) -> bool:
                return dataclasses.replace(options, greeting=self.options.greeting) == self.options
        """
        return False

    # -- what the base keeps, under corral_ --------------------------------------------------

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

    # -- dispatch -------------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        """Messages without a typed handler: the liveness probe, or an error reply."""
        if message is PROBE:
            return self._corral_full_health()
        self.corral_context.metrics.unhandled += 1
        what = getattr(message, "type_name", type(message).__name__)
        error = InvalidMessage(f"manager {self.corral_context.name!r} does not handle {what}")
        return ErrorReply.of(error)

    @handles(HealthCheck)
    def _corral_answer_health_check(self, _message: HealthCheck) -> Health:
        return self._corral_full_health()

    @handles(Reconfigure)
    def _corral_reconfigure(self, message: Reconfigure) -> Reconfigured:
        try:
            options = cast(
                OptionsT,
                parse_options(self.Options, message.options, manager=self.corral_context.name)
                if self.Options is not None
                else message.options,
            )
        except ConfigError as exc:
            raise InvalidMessage(f"{exc.message:.300}", path="options") from None
        if options == self.options:
            return Reconfigured(applied=True)
        if not self.reconfigure(options):
            return Reconfigured(applied=False, reason="this manager takes new options on restart")
        self.options = options
        return Reconfigured(applied=True, changed=True)

    def _corral_full_health(self) -> Health:
        own = self.health()
        return Health(
            status=own.status,
            details=own.details,
            metrics={**self.corral_stats(), **own.metrics},
            dependencies=own.dependencies,
        )

    # -- pykka's loop, with corral's failure semantics ------------------------------------
    #
    # These override private pykka methods: setup.cfg bounds pykka to the releases tested
    # (the lowest by `make test-lower-bounds`, the newest by `make test`).

    def _actor_loop(self) -> None:
        self.corral_thread = threading.current_thread()
        _running.actor = self
        try:
            super()._actor_loop()
        finally:
            self.corral_settled.set()
            if self.corral_context.on_exit is not None:
                self.corral_context.on_exit(self, self.corral_failure, self.corral_leftovers)

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
                    response = self._handle_receive(message)  # pykka's own messages, probes
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

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Runs after a crash, on the actor's thread; by default ``on_stop``.

        So that whatever ``on_stop`` releases (connections, threads, waiting
        callers) is released on a crash too. Override to do something else.
        """
        self.on_stop()


def _options_class(cls: type[Manager[Any]]) -> type[Section] | None:
    """The Section a class names as its type argument: ``Manager[CacheOptions]``."""
    for base in cls.__dict__.get("__orig_bases__", ()):
        origin = typing.get_origin(base)
        if isinstance(origin, type) and issubclass(origin, Manager):
            argument = typing.get_args(base)[0]
            if isinstance(argument, type) and issubclass(argument, Section):
                return argument
    return None
