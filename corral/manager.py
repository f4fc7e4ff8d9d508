"""The Manager base: what a corral manager subclasses.

A manager is an actor: its handlers run one at a time on its own thread. It declares
the messages it handles with :func:`handles`; a handler returns a Reply, or raises a
:mod:`corral.errors` error, which answers the caller and leaves the actor running::

    from corral.errors import InvalidMessage
    from corral.manager import Manager, handles

    class Greeter(Manager):
        name = "greeter"

        def on_start(self) -> None:  # on the actor's thread, before any message
            self.greeted = 0
            self.every(60.0, lambda: print(f"{self.greeted} greeted"))

        @handles(Greet)
        def greet(self, msg: Greet) -> Greeting:
            if not msg.who:
                raise InvalidMessage("who must not be empty", path="who")
            self.greeted += 1
            return Greeting(text=f"hello {msg.who}")

        def on_stop(self) -> None:  # after the last message, and after a crash
            print("bye")

Any other exception is a crash: the caller gets ``ManagerUnavailable``, the
actor stops and its supervisor is told (through the context), which restarts
it with the messages still queued in its mailbox.
"""

from __future__ import annotations

import logging
import threading
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Generic,
    Protocol,
    TypeVar,
    cast,
    runtime_checkable,
)

import pykka

from corral._runtime import PROBE, ActorCore, Envelope, Schedule, admit_all
from corral.clock import Clock, SystemClock
from corral.config import Placement, Section, parse_options
from corral.errors import ConfigError, CorralError, InvalidMessage
from corral.messages.base import ErrorReply, Event, Message, Reply, Request
from corral.messages.signing import DEFAULT_REPLAY_WINDOW
from corral.messages.system import Health, HealthCheck, Reconfigure, Reconfigured
from corral.metrics import Family, ManagerMetrics

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "Asker",
    "AsyncAsker",
    "AsyncRouter",
    "DeferredReply",
    "HttpMount",
    "Manager",
    "ManagerContext",
    "Router",
    "Schedule",
    "handles",
]

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Reply)
M = TypeVar("M", bound=Message)
F = TypeVar("F", bound=Callable[..., Any])


@runtime_checkable
class Asker(Protocol):
    """Anything that can ask: a :class:`corral.System`, a :func:`corral.connect` client, a
    manager's :class:`Router`::

        def balance(asker: Asker, account: str) -> int:
            return asker.ask(StateGet(state_type="account", state_id=account)).data["balance"]
    """

    def ask(self, message: Request[R], *, timeout: float | None = None) -> R: ...


@runtime_checkable
class AsyncAsker(Protocol):
    """Anything that can ask from asyncio: a :class:`corral.System`, a
    :func:`corral.connect` client."""

    async def ask_async(self, message: Request[R], *, timeout: float | None = None) -> R: ...


class Router(Asker, Protocol):
    """What a manager may do outside itself: reach other managers by name, publish events."""

    def tell(self, message: Message) -> None: ...

    def publish(self, topic: str, event: Event) -> None: ...


class AsyncRouter(Router, AsyncAsker, Protocol):
    """A Router that asyncio code can ask without blocking its loop (``System``, ``Client``)."""


@dataclass(kw_only=True)
class HttpMount:
    """What :meth:`Manager.mount` gets from the daemon that is about to serve the manager.

    One per configured manager and daemon. ``app`` is the daemon's aiohttp application:
    add routes and ``on_startup`` / ``on_shutdown`` / ``on_cleanup`` hooks, which run on
    the daemon's asyncio loop. ``system`` reaches the managers by message. What the hook
    puts in ``shared`` is handed to the manager's actors on this daemon as
    ``self.corral_context.mounted``, so that what runs on the loop and the actor find
    each other within one daemon.
    """

    name: str
    """The manager's name in the config (``[managers.<name>]``)."""
    options: Mapping[str, Any]
    """Its options table, as given (``parse_options(cls.Options, ...)`` checks them)."""
    app: web.Application
    system: AsyncRouter
    redis_url: str = ""
    """As :attr:`ManagerContext.redis_url`."""
    namespace: str = "corral"
    signing_keys: tuple[bytes, ...] = ()
    replay_window: float = DEFAULT_REPLAY_WINDOW
    """The codec's: how fresh a signed payload must be."""
    metrics: ManagerMetrics = field(default_factory=ManagerMetrics)
    """Where the manager counts (its actors get the same store)."""
    shared: Any = None


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
    mounted: Any = None
    """What the manager's :meth:`Manager.mount` left in :attr:`HttpMount.shared` on the
    daemon running it; None in a process that serves no HTTP."""
    clock: Clock = field(default_factory=SystemClock)
    """Where the manager reads the time (its system's; a test's :class:`ManualClock`)."""


class DeferredReply:
    """The reply to a request, sent later, from any thread, once.

    Made by :meth:`Manager.defer_reply` and :meth:`Manager.take_queued`. ``pending``
    is False for a tell (nobody waits) and once the reply is sent; sending again does
    nothing::

        reply = self.defer_reply()
        self.waiters.append(reply)
        ...
        reply.resolve(Greeting(text="hello"))     # or reply.fail(NotFound("no such key"))
    """

    __slots__ = ("_future", "_lock")

    def __init__(self, future: pykka.Future[Any] | None) -> None:
        self._future = future
        self._lock = threading.Lock()

    @property
    def pending(self) -> bool:
        return self._future is not None

    def resolve(self, reply: Reply) -> None:
        """Answer with ``reply``."""
        self._send(reply)

    def fail(self, error: CorralError) -> None:
        """Answer with ``error``, which the caller's ``ask`` raises."""
        self._send(ErrorReply.of(error))

    def _send(self, value: Reply) -> None:
        with self._lock:
            future, self._future = self._future, None
        if future is None:
            return
        try:
            future.set(value)
        except Exception:  # a caller that cannot take its reply is not the manager's failure
            log.warning("a deferred reply could not be delivered", exc_info=True)


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


class Manager(ActorCore, Generic[OptionsT]):
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
    ``metric_families``, ``options``, ``router``, ``defer_reply()``, ``take_queued()``,
    ``every()``, ``after()``, ``health()``, ``reconfigure()``, the class hook ``mount``
    (HTTP routes on the daemon, see :meth:`mount`) and the hooks ``on_start``,
    ``on_stop`` and ``on_failure``, all run on the actor's thread:
    ``on_start`` before the first message, ``on_stop`` after the last one, and
    ``on_failure`` after a crash. Everything else the base keeps is named ``corral_*``
    (as pykka's is ``actor_*``), so a subclass's own attributes never collide with it:
    ``corral_context`` (the name it runs under, its Redis URL, namespace and signing
    keys), ``corral_mailbox``, ``corral_metrics`` (where it counts, kept across
    restarts) and ``corral_stats()``.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[Section] | None] = None
    """The typed options of ``[managers.<name>]``, taken from the type argument;
    None takes any options, unchecked."""
    placement: ClassVar[Placement] = "any"
    """``any``: every daemon runs this manager, so it must keep no state of its own in
    memory. ``singleton``: one daemon of the namespace runs it at a time (a lease in
    Redis). ``[managers.<name>] placement`` overrides it."""
    metric_families: ClassVar[tuple[Family, ...]] = ()
    """The manager's own figures on ``/metrics``, counted into ``corral_metrics``
    (see :mod:`corral.metrics`)."""

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
        self.options = cast(
            OptionsT,
            parse_options(self.Options, context.options, manager=context.name)
            if self.Options is not None
            else context.options,
        )
        super().__init__(context)

    # -- the public face for subclasses ---------------------------------------------------

    @property
    def router(self) -> Router:
        """Other managers, by name, and the bus: ``self.router.ask(CacheGet(key="k"))``."""
        return self.corral_context.router

    def defer_reply(self) -> DeferredReply:
        """Take over the reply to the request being handled, to send it later.

        The handler's return value is then dropped; send the reply with
        :meth:`DeferredReply.resolve` or :meth:`DeferredReply.fail` when it is known,
        from any thread. For a tell, the reply is not ``pending``. Waiting callers
        cost a list entry, not a blocked mailbox::

            @handles(WaitFor)
            def wait_for(self, msg: WaitFor) -> None:
                self.waiters.append(self.defer_reply())
        """
        envelope = self.corral_current_envelope
        if envelope is None:
            return DeferredReply(None)
        future, envelope.reply_to = envelope.reply_to, None
        return DeferredReply(future)

    def take_queued(self, message_type: type[M], limit: int) -> list[tuple[M, DeferredReply]]:
        """Requests of ``message_type`` waiting right behind the one being handled.

        For handling them together with it, e.g. in one Redis round trip for many
        callers. Only the consecutive ones at the head of the mailbox are taken, so
        nothing is overtaken; remote requests among them are admitted together (their
        starts recorded in one round trip). Answer each through its reply::

            @handles(CacheGet)
            def get(self, msg: CacheGet) -> CacheValue:
                for queued, reply in self.take_queued(CacheGet, 100):
                    ...
        """
        taken = admit_all(self.corral_mailbox.take_head(message_type, limit))
        self.corral_handler_stats[message_type].handled += len(taken)
        return [(envelope.message, DeferredReply(envelope.reply_to)) for envelope in taken]

    def every(self, interval: float, fn: Callable[[], object]) -> Schedule:
        """Run ``fn`` on the actor's thread every ``interval`` seconds, between two
        messages, until the manager stops or the schedule is cancelled. A run still
        waiting in the mailbox is not queued again. Call it from the actor's thread (a
        hook or a handler)::

            def on_start(self) -> None:
                self.every(self.options.sweep_interval, self._sweep)
        """
        return self.corral_schedule(fn, delay=interval, interval=interval)

    def after(self, delay: float, fn: Callable[[], object]) -> Schedule:
        """Run ``fn`` once on the actor's thread, ``delay`` seconds from now, unless the
        manager stops or the schedule is cancelled first. Call it from the actor's
        thread::

            self.retry = self.after(5.0, self._reconnect)
            ...
            self.retry.cancel()
        """
        return self.corral_schedule(fn, delay=delay, interval=None)

    def health(self) -> Health:
        """This manager's own health; override to report backends and details."""
        return Health(status="healthy")

    @classmethod
    def mount(cls, http: HttpMount) -> None:
        """Offer HTTP routes on the daemon's port. ``corral run`` calls it once for each
        configured manager, before any manager starts; an embedded System never does.
        The default offers none::

            @classmethod
            def mount(cls, http: HttpMount) -> None:
                http.app.router.add_get("/greeter/hello", hello)
                http.shared = Visitors()    # the actor's self.corral_context.mounted
        """

    def reconfigure(self, options: OptionsT) -> bool:
        """Take new options while running (``corral run`` on SIGHUP); False when they
        need a restart, which is the default. Runs on the actor's thread; ``self.options``
        becomes ``options`` once it returns True::

            def reconfigure(self, options: GreeterOptions) -> bool:
                return dataclasses.replace(options, greeting=self.options.greeting) == self.options
        """
        return False

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

    # -- what every manager answers -------------------------------------------------------

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


def _options_class(cls: type[Manager[Any]]) -> type[Section] | None:
    """The Section a class names as its type argument: ``Manager[CacheOptions]``."""
    for base in cls.__dict__.get("__orig_bases__", ()):
        origin = typing.get_origin(base)
        if isinstance(origin, type) and issubclass(origin, Manager):
            argument = typing.get_args(base)[0]
            if isinstance(argument, type) and issubclass(argument, Section):
                return argument
    return None
