"""System: the in-process entry point — bus, supervisor and managers, with routing by name.

::

    import corral
    from corral.messages.system import Ping

    with corral.System() as system:
        pong = system.ask(Ping(payload=b"hi"))
        for delivery in system.subscribe("supervisor.child.*"):
            ...

Callers hold manager *names*, never actor references: ``ask`` and ``tell`` route
by the message's manager to whichever actor currently serves it, and wait
(within the timeout) while that manager restarts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import msgspec
import pykka

from corral._events import EventsMixin
from corral._redis import REDIS_ERRORS, connect
from corral._runtime import AsyncioFuture, Envelope, Mailbox, ReplyFuture
from corral.actors import BUILTIN
from corral.bus import Bus, MemoryBus, RedisBus
from corral.clock import Clock
from corral.config import Config, ManagerSection, parse_options
from corral.errors import ConfigError, CorralError, Timeout
from corral.manager import Manager
from corral.messages.base import (
    TIMEOUT,
    Message,
    Reply,
    Request,
    check_batch,
    settled,
    unwrap,
    validate,
)
from corral.messages.codec import Codec
from corral.messages.system import (
    DEAD_LETTERS_CAP,
    DeadLetter,
    SystemHealth,
    dead_letters_key,
)
from corral.supervisor import ChildSpec, Supervisor, start_order

__all__ = ["System", "plan"]

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Reply)

DEAD_LETTERS_KEPT = 1_000
"""How many dead letters a System keeps in memory."""


class System(EventsMixin):
    """Bus + supervisor + managers in this process. See the module docstring.

    ``managers``: extra Manager classes (or full ChildSpecs) of the embedding
    service, run under the same supervisor as the configured ones. Their
    ``[managers.<name>]`` config section, if any, applies to them too.

    ``singletons_by_lease``: managers placed ``singleton`` wait in standby until
    this process holds their lease (the daemon's remote server takes it); without
    it, as in an embedding service, this system runs its own instance of them.

    ``clock``: where the supervisor and the managers read the time; a test passes a
    :class:`~corral.clock.ManualClock` and advances it instead of sleeping.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        managers: Iterable[type[Manager[Any]] | ChildSpec] = (),
        bus: Bus | None = None,
        on_escalate: Callable[[str], None] | None = None,
        singletons_by_lease: bool = False,
        clock: Clock | None = None,
    ) -> None:
        self.config = config or Config()
        specs = plan(self.config, managers)  # before anything is built, which a bad config stops
        singletons = [spec.name for spec in specs if spec.placement == "singleton"]
        if singletons and not singletons_by_lease and self.config.bus.backend == "redis":
            log.warning(
                "%s placed singleton: only corral run daemons take turns running it; "
                "this process runs an instance of its own",
                ", ".join(singletons),
            )
        self.ask_timeout = self.config.system.ask_timeout
        self.validate = self.config.system.validate
        self.codec = Codec(
            keys=[k.encode() for k in self.config.codec.signing_keys],
            max_size=self.config.codec.max_size,
            max_depth=self.config.codec.max_depth,
            replay_window=self.config.codec.replay_window,
        )
        self._own_bus = bus is None
        self.bus = bus or self._make_bus()
        self.supervisor = Supervisor(
            specs,
            self,
            policy=self.config.supervisor,
            publish=self.bus.publish,
            on_escalate=on_escalate,
            standby=singletons if singletons_by_lease else (),
            on_dead_letter=self._keep_dead_letter,
            clock=clock,
        )
        self._dead_letters: deque[DeadLetter] = deque(maxlen=DEAD_LETTERS_KEPT)
        self._started = False

    # -- building -------------------------------------------------------------------------

    def _make_bus(self) -> Bus:
        section = self.config.bus
        if section.backend == "redis":
            return RedisBus(
                section.url,
                namespace=section.namespace,
                codec=self.codec,
                queue_size=section.queue_size,
                callback_threads=section.callback_threads,
                reconnect_initial=section.reconnect_initial,
                reconnect_max=section.reconnect_max,
            )
        return MemoryBus(queue_size=section.queue_size, callback_threads=section.callback_threads)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> System:
        if not self._started:
            self._started = True
            self.supervisor.start()
        return self

    def stop(self) -> None:
        """Stop every manager in reverse start order, then the bus (if this system made it)."""
        self.supervisor.stop()
        if self._own_bus:
            self.bus.close()

    def __enter__(self) -> System:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- messaging ------------------------------------------------------------------------

    def ask(self, message: Request[R], *, timeout: float | None = None) -> R:
        """Send a request to the manager that handles it and return its reply.

        Raises the error the manager answered with (``NotFound``, ``Conflict``, ...),
        ``ManagerUnavailable`` when it is down, ``Timeout`` when no reply came in time.
        ``timeout`` is seconds, 0 to a day (``InvalidMessage`` otherwise); None: the
        config's ``system.ask_timeout``.
        """
        timeout = self._timeout(timeout)
        deadline = time.monotonic() + timeout
        name = self._route(message)
        if name == "supervisor":
            return self.health(timeout=timeout)  # type: ignore[return-value]
        future = ReplyFuture()
        self._deliver(name, Envelope(message, reply_to=future), timeout)
        try:
            reply = future.get(timeout=max(0.0, deadline - time.monotonic()))
        except pykka.Timeout:
            raise _no_reply(message, name, timeout) from None
        answer: R = unwrap(reply)
        return answer

    def ask_many(
        self, messages: Sequence[Request[Any]], *, timeout: float | None = None
    ) -> list[Reply | CorralError]:
        """Send every request at once, then wait for them all: their replies, in order,
        with the error a request met in its place (one failing request raises nothing).
        ``timeout`` bounds the whole batch of 1 to ``MAX_BATCH`` requests::

            answers = system.ask_many([CacheGet(key=k) for k in ("a", "b", "c")])
            values = [a.value for a in answers if isinstance(a, CacheValue) and a.found]
        """
        timeout = self._timeout(timeout)
        check_batch(messages)
        deadline = time.monotonic() + timeout
        results: list[Reply | CorralError] = []
        waiting: list[tuple[int, Request[Any], str, ReplyFuture]] = []
        for index, message in enumerate(messages):
            try:
                name = self._route(message)
                if name == "supervisor":
                    results.append(self.health(timeout=max(0.0, deadline - time.monotonic())))
                    continue
                future = ReplyFuture()
                envelope = Envelope(message, reply_to=future)
                self._deliver(name, envelope, max(0.0, deadline - time.monotonic()))
            except CorralError as exc:
                results.append(exc)
                continue
            results.append(_NO_REPLY_YET)
            waiting.append((index, message, name, future))
        for index, message, name, future in waiting:
            try:
                reply = future.get(timeout=max(0.0, deadline - time.monotonic()))
            except pykka.Timeout:
                results[index] = _no_reply(message, name, timeout)
                continue
            results[index] = settled(reply)
        return results

    async def ask_many_async(
        self, messages: Sequence[Request[Any]], *, timeout: float | None = None
    ) -> list[Reply | CorralError]:
        """:meth:`ask_many` for asyncio code: awaiting never blocks the event loop
        (``answers = await system.ask_many_async([CacheGet(key="a"), CacheGet(key="b")])``)."""
        timeout = self._timeout(timeout)
        check_batch(messages)
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        results: list[Reply | CorralError] = []
        waiting: list[tuple[int, Request[Any], str, AsyncioFuture]] = []
        for index, message in enumerate(messages):
            try:
                name = self._route(message)
                if name == "supervisor":
                    health = functools.partial(
                        self.health, timeout=max(0.0, deadline - time.monotonic())
                    )
                    results.append(await loop.run_in_executor(None, health))
                    continue
                bridge = AsyncioFuture(loop)
                envelope = Envelope(message, reply_to=bridge)
                if not self._try_put(name, envelope):
                    left = max(0.0, deadline - time.monotonic())
                    await loop.run_in_executor(None, self._deliver, name, envelope, left)
            except CorralError as exc:
                results.append(exc)
                continue
            results.append(_NO_REPLY_YET)
            waiting.append((index, message, name, bridge))
        if waiting:
            futures = [bridge.future for *_, bridge in waiting]
            await asyncio.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        for index, message, name, bridge in waiting:
            if not bridge.future.done():
                results[index] = _no_reply(message, name, timeout)
            elif (error := bridge.future.exception()) is not None:
                if not isinstance(error, CorralError):
                    raise error
                results[index] = error
            else:
                results[index] = settled(bridge.future.result())
        return results

    async def ask_async(self, message: Request[R], *, timeout: float | None = None) -> R:
        """``ask`` for asyncio code: awaiting never blocks the event loop."""
        timeout = self._timeout(timeout)
        deadline = time.monotonic() + timeout
        name = self._route(message)
        loop = asyncio.get_running_loop()
        if name == "supervisor":
            return await loop.run_in_executor(None, self.ask, message, timeout)  # type: ignore[arg-type]
        bridge = AsyncioFuture(loop)
        envelope = Envelope(message, reply_to=bridge)
        if not self._try_put(name, envelope):
            # Waiting for a restart or for room in the mailbox blocks: not on the loop.
            await loop.run_in_executor(
                None, self._deliver, name, envelope, deadline - time.monotonic()
            )
        try:
            reply = await asyncio.wait_for(bridge.future, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise _no_reply(message, name, timeout) from None
        answer: R = unwrap(reply)
        return answer

    def tell(self, message: Message) -> None:
        """Send a message without waiting for an answer (errors are counted, not raised)."""
        self._deliver(self._route(message), Envelope(message), self.ask_timeout)

    def dispatch(
        self, message: Message, reply_to: pykka.Future[Any] | None, *, timeout: float | None = None
    ) -> None:
        """Put ``message`` in the mailbox of its manager; its reply is set on ``reply_to``.

        The building block of ``ask`` for callers that must not wait (the daemon's
        remote request server passes a :class:`~corral._runtime.CallbackFuture`).
        """
        name = self._route(message)
        self._deliver(name, Envelope(message, reply_to=reply_to), self._timeout(timeout))

    def try_dispatch(self, message: Message, reply_to: pykka.Future[Any] | None) -> bool:
        """``dispatch`` without waiting: False when the manager is not running or its
        mailbox is full (nothing was sent then)."""
        return self._try_put(self._route(message), Envelope(message, reply_to=reply_to))

    def _try_put(self, name: str, envelope: Envelope[Any]) -> bool:
        ref = self.supervisor.live_ref(name)
        mailbox = ref.actor_inbox if ref is not None else None
        return isinstance(mailbox, Mailbox) and mailbox.try_put(envelope)

    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return self.ask_timeout
        checked: float = TIMEOUT.check(timeout, "timeout")
        return checked

    def _durable_source(self) -> tuple[str, str]:
        if self.config.bus.backend != "redis":
            raise ConfigError(
                "subscribing from an offset replays a stream kept in Redis: "
                'set bus.backend = "redis"'
            )
        return self.config.bus.url, self.config.bus.namespace

    def health(self, *, timeout: float = 1.0) -> SystemHealth:
        """Every manager's Health and the supervisor's view, aggregated."""
        return self.supervisor.health(self._timeout(timeout))

    def dead_letters(self) -> list[DeadLetter]:
        """The requests from outside that crashed a manager here, oldest first (the last
        thousand; with the bus on Redis, every daemon's are in the stream that
        ``corral dead-letters`` lists)."""
        return list(self._dead_letters)

    def _keep_dead_letter(self, letter: DeadLetter) -> None:
        letter = msgspec.structs.replace(letter, daemon=f"{socket.gethostname()}:{os.getpid()}")
        self._dead_letters.append(letter)
        section = self.config.bus
        if section.backend != "redis":
            return
        client = connect(section.url, setting="bus.url")
        try:
            client.xadd(
                dead_letters_key(section.namespace),
                {"m": self.codec.encode(letter)},
                maxlen=DEAD_LETTERS_CAP,
                approximate=True,
            )
        except REDIS_ERRORS as exc:
            log.warning("could not write a dead letter to Redis: %s", exc)
        finally:
            client.close()

    # -- routing internals ----------------------------------------------------------------

    def _route(self, message: Message) -> str:
        if self.validate:
            validate(message)
        name = message.route()
        if name is None:
            raise ConfigError(f"{message.type_name} names no manager to handle it")
        return name

    def _deliver(self, name: str, envelope: Envelope[Any], timeout: float) -> None:
        """Put an envelope in the mailbox of the actor now serving ``name``."""
        ref = self.supervisor.live_ref(name)
        if ref is not None:
            try:
                ref.actor_inbox.put(envelope)
                return
            except pykka.ActorDeadError:
                pass  # it died just now: wait for its successor below
        deadline = time.monotonic() + timeout
        stale = ref
        while True:
            ref = self.supervisor.resolve(name, deadline, stale=stale)
            try:
                ref.actor_inbox.put(envelope)
                return
            except pykka.ActorDeadError:
                stale = ref  # it died between resolve and put: wait for its successor


def plan(
    config: Config, managers: Iterable[type[Manager[Any]] | ChildSpec] = ()
) -> list[ChildSpec]:
    """The managers ``System(config, managers=managers)`` runs, as child specs in start order.

    Loads each configured manager's class and checks its options and the dependencies
    between managers, and starts nothing: ``System`` and ``corral config check`` both
    run this. Raises :class:`ConfigError` naming the setting (and where its value came
    from) rather than letting a manager fail in a restart loop.
    """
    given: dict[str, type[Manager[Any]] | ChildSpec] = {}
    for item in managers:
        name = item.name
        if not name:
            raise ConfigError(f"{item!r} has no manager name (set its class attribute `name`)")
        given[name] = item
    sections = dict(config.managers)
    names = ["system", *[n for n in sections if n != "system"]]
    names += [n for n in given if n not in names]
    # What every manager gets from the system it runs in, given specs included.
    redis_url = config.bus.url if config.bus.backend == "redis" else ""
    namespace = config.bus.namespace
    keys = tuple(k.encode() for k in config.codec.signing_keys)
    specs = []
    for name in names:
        section = sections.get(name, ManagerSection())
        if not section.enabled:
            continue
        given_item = given.get(name)
        if isinstance(given_item, ChildSpec):
            _check_options(config, name, given_item.manager, given_item.options)
            specs.append(
                dataclasses.replace(
                    given_item,
                    redis_url=redis_url if given_item.redis_url is None else given_item.redis_url,
                    namespace=namespace if given_item.namespace is None else given_item.namespace,
                    signing_keys=keys
                    if given_item.signing_keys is None
                    else given_item.signing_keys,
                )
            )
            continue
        manager = given_item or _load_manager(name, section)
        _check_options(config, name, manager, section.options)
        specs.append(
            ChildSpec(
                name=name,
                manager=manager,
                options=section.options,
                restart=section.restart,
                depends_on=tuple(section.depends_on),
                critical=section.critical,
                shutdown_timeout=(
                    section.shutdown_timeout
                    if section.shutdown_timeout is not None
                    else config.supervisor.shutdown_timeout
                ),
                mailbox_size=section.mailbox_size or config.system.mailbox_size,
                mailbox_put_timeout=config.system.mailbox_put_timeout,
                redis_url=redis_url,
                namespace=namespace,
                signing_keys=keys,
                placement=section.placement or manager.placement,
            )
        )
    return start_order(specs)


def _check_options(
    config: Config, name: str, manager: type[Manager[Any]], options: Mapping[str, Any]
) -> None:
    """The options parsed as the manager's Options, errors naming the key and its origin."""
    if manager.Options is None:
        return
    try:
        parse_options(manager.Options, options, manager=name)
    except ConfigError as exc:
        origin = config.sources.get(f"managers.{name}.{exc.details.get('field', '')}")
        raise ConfigError(f"{origin}: {exc}" if origin else str(exc), exc.details) from None


def _load_manager(name: str, section: ManagerSection) -> type[Manager[Any]]:
    path = section.class_path or BUILTIN.get(name)
    if not path:
        raise ConfigError(
            f'managers.{name}: unknown manager; set class_path = "package.module:Class" '
            f"(built-in: {', '.join(sorted(BUILTIN))})"
        )
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"managers.{name}.class_path: cannot load {path!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Manager)):
        raise ConfigError(f"managers.{name}.class_path: {path!r} is not a corral Manager")
    return cls


_NO_REPLY_YET = Timeout("no reply yet")
"""A batch's place holder for a reply it waits for."""


def _no_reply(message: Message, name: str, timeout: float) -> Timeout:
    return Timeout(
        f"no reply to {message.type_name} from {name!r} within {timeout:g}s",
        {"manager": name, "timeout": timeout},
    )
