"""Supervision for managers, modelled on Erlang/OTP (which pykka leaves out).

A :class:`Supervisor` starts its children in the topological order of
``depends_on``, watches them, restarts the ones that die according to their
restart policy and the strategy, and gives up (escalates) when restarts come
faster than ``max_restarts`` within ``period`` seconds::

    supervisor = Supervisor(
        [ChildSpec(name="cache", manager=CacheManager, critical=True)],
        router,
        policy=SupervisorSection(strategy="one_for_one", max_restarts=5, period=30),
    )
    supervisor.start()
    ref = supervisor.resolve("cache", deadline=time.monotonic() + 1)

It sees every way a pykka actor dies: a crash in a handler (ask or tell), a
failure in ``on_start``, an exit it did not ask for, and a hung actor that does
not answer the liveness probe within ``probe_timeout`` (replaced, and its
thread reported). A restarted child takes over its predecessor's mailbox, so a
restart is invisible to callers except for the request that was in flight.

Requests from outside the process are untrusted input, not the process's own
bugs. OTP would count a crash they cause like any other, and a client repeating a
poison message would make the supervisor give up on a manager that serves everyone
else (and, once the intensity is exceeded, stop the daemon). Here a crash on a
request whose future names a ``sender`` (:class:`~corral._runtime.CallbackFuture`)
is a dead letter: published as :class:`~corral.messages.system.DeadLetter` and kept
by ``on_dead_letter``; the same request sent again is refused without reaching the
manager (:meth:`Supervisor.quarantined`); and the crash does not count towards the
restart intensity. The manager still restarts, as its state may be corrupt.

All lifecycle work happens on one control thread; callers only read state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import heapq
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Literal

import pykka
from pykka import ActorRef, ActorRegistry

from corral._backoff import Backoff
from corral._runtime import PROBE, ActorStop, CallbackFuture, Envelope
from corral.clock import Clock, SystemClock
from corral.config import Placement, Restart, SupervisorSection
from corral.errors import ConfigError, ManagerUnavailable
from corral.manager import Manager, ManagerContext, Router
from corral.messages.base import Event, Message
from corral.messages.system import (
    ChildStatus,
    DeadLetter,
    Health,
    HealthChanged,
    HealthStatus,
    SupervisorChildChanged,
    SystemHealth,
)
from corral.metrics import ManagerMetrics

__all__ = [
    "ChildSpec",
    "Supervisor",
    "fingerprint",
    "start_order",
]

log = logging.getLogger(__name__)

ChildState = Literal["starting", "running", "restarting", "stopped", "failed", "standby"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChildSpec:
    """How to run one manager under a supervisor.

    ``restart``: permanent children are always restarted, transient ones only
    after a crash, temporary ones never. A ``critical`` child that is down makes
    the whole system unhealthy.
    """

    name: str
    manager: type[Manager[Any]]
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    restart: Restart = "permanent"
    depends_on: tuple[str, ...] = ()
    critical: bool = False
    shutdown_timeout: float = 5.0
    mailbox_size: int = 10_000
    mailbox_put_timeout: float = 1.0
    redis_url: str | None = None
    """The Redis a manager uses by default; None: the system's (``bus.url`` on Redis)."""
    namespace: str | None = None
    """Prefix of the manager's Redis keys and channels; None: the system's."""
    signing_keys: tuple[bytes, ...] | None = None
    """HMAC keys for what the manager signs itself; None: the system's codec keys."""
    placement: Placement = "any"
    """``any``: every daemon runs the manager. ``singleton``: one daemon of the namespace
    at a time, the one holding its lease (see :mod:`corral.remote`)."""


def start_order(specs: Iterable[ChildSpec]) -> list[ChildSpec]:
    """Specs sorted so that every child comes after what it depends on (stable otherwise)."""
    by_name: dict[str, ChildSpec] = {}
    for spec in specs:
        if spec.name in by_name:
            raise ConfigError(f"two managers are named {spec.name!r}")
        by_name[spec.name] = spec
    for spec in by_name.values():
        for dependency in spec.depends_on:
            if dependency not in by_name:
                raise ConfigError(
                    f"managers.{spec.name}.depends_on: no manager named {dependency!r} "
                    f"(managers: {', '.join(sorted(by_name))})"
                )
    ordered: list[ChildSpec] = []
    visiting: list[str] = []
    done: set[str] = set()

    def visit(spec: ChildSpec) -> None:
        if spec.name in done:
            return
        if spec.name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(spec.name) :], spec.name])
            raise ConfigError(f"managers depend on each other in a cycle: {cycle}")
        visiting.append(spec.name)
        for dependency in spec.depends_on:
            visit(by_name[dependency])
        visiting.pop()
        done.add(spec.name)
        ordered.append(spec)

    for spec in by_name.values():
        visit(spec)
    return ordered


class _Child:
    """The supervisor's record of one child; mutated only on the control thread."""

    def __init__(self, spec: ChildSpec, index: int) -> None:
        self.spec = spec
        self.index = index
        self.actor: Manager[Any] | None = None
        self.live_ref: ActorRef[Any] | None = None  # set only while running: the router's fast path
        self.state: ChildState = "stopped"
        self.restarts = 0
        self.restart_times: deque[float] = deque()
        self.last_error: str | None = None
        self.started_at = 0.0
        self.pending: list[Envelope[Any]] = []
        self.probe: tuple[pykka.Future[Any], float] | None = None
        self.last_probe = 0.0
        self.last_health: Health | None = None
        self.metrics = ManagerMetrics()
        """What the child's actors counted, from the first start: a restart resets nothing."""


_STOP = object()


class Supervisor:
    """Starts, watches, restarts and stops a set of managers. See the module docstring.

    ``clock`` times the restart backoff and the intensity window, and is every manager's
    (``corral_context.clock``); liveness probes and start-up timeouts wait in real time.
    """

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        router: Router,
        *,
        policy: SupervisorSection | None = None,
        publish: Callable[[str, Event], None] | None = None,
        on_escalate: Callable[[str], None] | None = None,
        standby: Collection[str] = (),
        on_dead_letter: Callable[[DeadLetter], None] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.policy = policy or SupervisorSection()
        self.clock = clock or SystemClock()
        self.router = router
        self._publish = publish
        self._on_escalate = on_escalate
        self._on_dead_letter = on_dead_letter
        self._quarantine: OrderedDict[str, None] = OrderedDict()
        self._children = {spec.name: _Child(spec, i) for i, spec in enumerate(start_order(specs))}
        self._order = list(self._children.values())
        unknown = set(standby) - set(self._children)
        if unknown:
            raise ConfigError(f"standby: no manager named {sorted(unknown)[0]!r}")
        for name in standby:
            self._children[name].state = "standby"
        self._cond = threading.Condition()
        self._events: queue.Queue[Any] = queue.Queue()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_ids = itertools.count()
        self._restart_times: deque[float] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.escalated: str | None = None
        self.dead_letters = 0
        self.abandoned_threads: list[str] = []
        self._status: HealthStatus = "healthy"
        self._running = False
        self.mounted: dict[str, Any] = {}
        """What each child's ``Manager.mount`` left for its actors (``HttpMount.shared``),
        by name: filled by the daemon before it starts the supervisor."""

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [c.spec.name for c in self._order]

    @property
    def running(self) -> bool:
        """Started (every child launched) and neither stopping nor given up."""
        return self._running and not self._stopping and self.escalated is None

    @property
    def specs(self) -> list[ChildSpec]:
        """The children's specs, in start order."""
        return [c.spec for c in self._order]

    def metrics(self) -> dict[str, ManagerMetrics]:
        """What each child counted since the supervisor started it first, in start order."""
        return {c.spec.name: c.metrics for c in self._order}

    def start(self) -> None:
        """Start every child in dependency order; return when all run (or raise)."""
        if self._thread is not None:
            raise RuntimeError("supervisor already started")
        self._thread = threading.Thread(target=self._run, name="corral-supervisor", daemon=True)
        self._thread.start()
        for child in self._order:
            if child.state == "standby":
                continue  # started by activate(), when this process holds its lease
            done = threading.Event()
            self._events.put(("call", lambda c=child, d=done: self._initial_start(c, d)))
            done.wait()
            deadline = (
                time.monotonic()
                + self.policy.start_timeout
                + self.policy.backoff_max * (self.policy.max_restarts + 1)
            )
            with self._cond:
                while child.state in ("starting", "restarting") and self.escalated is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                state = child.state
            if self.escalated is not None:
                self.stop()
                raise ManagerUnavailable(f"supervisor gave up during start-up: {self.escalated}")
            if state != "running":
                log.warning("manager %s did not start: %s", child.spec.name, child.last_error)
        self._events.put(("call", self._started))

    def activate(self, name: str) -> None:
        """Start a child waiting in standby (a singleton whose lease this process now holds).

        Returns at once; the child starts (and restarts) as any other.
        """
        child = self._children[name]
        self._events.put(("call", lambda: self._activate(child)))

    def deactivate(self, name: str, reason: str) -> None:
        """Stop a child and put it back in standby (its lease is lost or handed over).

        Returns once it has stopped, so that no other process can start it meanwhile.
        """
        child = self._children[name]
        done = threading.Event()

        def stop() -> None:
            try:
                if child.state not in ("standby", "stopped", "failed"):
                    self._stop_child(child, then="standby")
                    self._lifecycle(child, "standby", reason)
            finally:
                done.set()

        self._events.put(("call", stop))
        done.wait()

    def update_options(self, name: str, options: Mapping[str, Any]) -> None:
        """The options a child gets from its next start on (a running one took them already
        through :class:`~corral.messages.system.Reconfigure`)."""
        child = self._children[name]
        self._events.put(
            (
                "call",
                lambda: setattr(child, "spec", dataclasses.replace(child.spec, options=options)),
            )
        )

    def restart_with(self, name: str, options: Mapping[str, Any]) -> None:
        """Stop a running child and start it again with ``options``: for new options it
        cannot take while running. A planned restart, not a crash (its restart count and
        the intensity stay); a child that is not running gets them at its next start.
        Returns once it runs again, or failed to start."""
        child = self._children[name]
        done = threading.Event()

        def restart() -> None:
            try:
                child.spec = dataclasses.replace(child.spec, options=options)
                if child.state == "running" and not self._stopping:
                    self._stop_child(child, then="restarting")
                    self._launch(child, change="restarted")
            finally:
                done.set()

        self._events.put(("call", restart))
        done.wait()

    def _activate(self, child: _Child) -> None:
        if child.state == "standby" and not self._stopping and self.escalated is None:
            self._launch(child, change="started")

    def _started(self) -> None:
        self._running = True
        self._update_status()

    def stop(self) -> None:
        """Stop every child in reverse start order, each within its shutdown timeout."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        done = threading.Event()
        self._events.put(("call", lambda: self._stop_all(done)))
        done.wait()
        self._events.put(_STOP)
        thread.join()

    def settle(self) -> None:
        """Return once the control thread has handled everything asked of it before, and
        run the restarts due by now on the supervisor's clock. After moving a
        :class:`~corral.clock.ManualClock`, what the supervisor does at the new time is done::

            clock.advance(policy.backoff_max)
            supervisor.settle()                 # a restart that was due has happened
        """
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        done = threading.Event()

        def run_due_timers() -> None:
            try:
                self._run_due_timers()
            finally:
                done.set()

        self._events.put(("call", run_due_timers))
        done.wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the supervisor stops (or escalates); False on timeout."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # -- dead letters -------------------------------------------------------------------

    def quarantined(self, message: Message) -> str | None:
        """The fingerprint of ``message`` if the same request crashed its manager before."""
        if not self._quarantine:
            return None
        found = fingerprint(message)
        return found if found in self._quarantine else None

    def _dead_letter(self, child: _Child, actor: Manager, failure: BaseException) -> bool:
        """Quarantine and report the request from outside that crashed ``actor``, if any."""
        envelope = actor.corral_current_envelope
        future = envelope.reply_to if envelope is not None else None
        if envelope is None or not isinstance(future, CallbackFuture) or not future.sender:
            return False
        message = envelope.message
        mark = fingerprint(message)
        self._quarantine[mark] = None
        while len(self._quarantine) > QUARANTINE_SIZE:
            self._quarantine.popitem(last=False)
        letter = DeadLetter(
            child=child.spec.name,
            message_type=getattr(message, "type_name", type(message).__name__),
            message=repr(message)[:DEAD_LETTER_TEXT],
            error=_describe(failure)[:DEAD_LETTER_TEXT],
            sender=future.sender,
            fingerprint=mark,
            at=time.time(),
        )
        log.warning(
            "manager %s crashed on %s from %s: dead-lettered, and refused if sent again",
            child.spec.name,
            letter.message_type,
            future.sender,
        )
        self._emit("supervisor.dead_letter", letter)
        if self._on_dead_letter is not None:
            try:
                self._on_dead_letter(letter)
            except Exception:
                log.warning("could not keep a dead letter", exc_info=True)
        return True

    # -- routing --------------------------------------------------------------------------

    def live_ref(self, name: str) -> ActorRef[Any] | None:
        """The running actor of a child, without waiting; None while it is not running."""
        child = self._children.get(name)
        return child.live_ref if child is not None else None

    def resolve(
        self, name: str, deadline: float, *, stale: ActorRef[Any] | None = None
    ) -> ActorRef[Any]:
        """The live actor of a child, waiting (until ``deadline``) while it restarts."""
        child = self._children.get(name)
        if child is None:
            raise ManagerUnavailable(
                f"no manager named {name!r} (managers: {', '.join(self.names) or 'none'})",
                {"manager": name},
            )
        ref = child.live_ref
        if ref is not None and ref is not stale:
            return ref
        if child.state == "standby":
            raise ManagerUnavailable(
                f"manager {name!r} is a singleton that another daemon runs now; "
                "reach it through corral.connect()",
                {"manager": name, "state": "standby"},
            )
        with self._cond:
            while True:
                ref = child.live_ref
                if ref is not None and ref is not stale:
                    return ref
                if self.escalated is not None:
                    raise ManagerUnavailable(
                        f"manager {name!r} is down: the supervisor gave up ({self.escalated})",
                        {"manager": name},
                    )
                if child.state in ("stopped", "failed") or self._stopping:
                    raise ManagerUnavailable(
                        f"manager {name!r} is {child.state}"
                        + (f" ({child.last_error})" if child.last_error else ""),
                        {"manager": name, "state": child.state},
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ManagerUnavailable(
                        f"manager {name!r} is {child.state} and was not back in time",
                        {"manager": name, "state": child.state},
                    )
                self._cond.wait(remaining)

    # -- health ---------------------------------------------------------------------------

    def health(self, timeout: float = 1.0) -> SystemHealth:
        """Ask every running child for its Health (in parallel) and aggregate."""
        deadline = time.monotonic() + timeout
        asked: dict[str, pykka.Future[Any]] = {}
        for child in self._order:
            ref = child.live_ref
            if ref is not None:
                with contextlib.suppress(pykka.ActorDeadError):
                    asked[child.spec.name] = ref.ask(PROBE, block=False)
        answers: dict[str, Health | None] = {}
        for name, future in asked.items():
            try:
                answers[name] = future.get(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                answers[name] = None
        return self._aggregate(answers, assume_healthy=False)

    def snapshot(self) -> SystemHealth:
        """The health as last seen by the liveness probe, without asking anyone.

        A running child that has not been probed yet counts as healthy.
        """
        return self._aggregate(
            {c.spec.name: c.last_health for c in self._order}, assume_healthy=True
        )

    def _aggregate(
        self, answers: Mapping[str, Health | None], *, assume_healthy: bool
    ) -> SystemHealth:
        now = time.monotonic()
        managers: dict[str, ChildStatus] = {}
        worst = 0
        with self._cond:
            for child in self._order:
                name = child.spec.name
                health = answers.get(name)
                running = child.state == "running"
                status: HealthStatus = "unhealthy"
                if running and health is not None:
                    status = health.status
                elif (running and assume_healthy) or child.state == "standby":
                    status = "healthy"
                if status != "healthy":
                    worst = max(worst, 2 if child.spec.critical and status == "unhealthy" else 1)
                actor = child.actor
                managers[name] = ChildStatus(
                    name=name,
                    state=child.state,
                    status=status,
                    critical=child.spec.critical,
                    restarts=child.restarts,
                    last_error=child.last_error,
                    mailbox_depth=actor.corral_mailbox.qsize() if actor is not None else 0,
                    uptime_s=now - child.started_at if running else 0.0,
                    health=health,
                )
            if self.escalated is not None:
                worst = 2
        statuses: tuple[HealthStatus, ...] = ("healthy", "degraded", "unhealthy")
        return SystemHealth(
            status=statuses[worst], managers=managers, escalated=self.escalated is not None
        )

    # -- the control thread ---------------------------------------------------------------

    def _run(self) -> None:
        tick = min(0.25, self.policy.probe_interval / 2, self.policy.probe_timeout / 4)
        while True:
            wait = tick
            if self._timers:
                wait = max(0.0, min(wait, self._timers[0][0] - self.clock.monotonic()))
            try:
                item = self._events.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            try:
                if item is not None:
                    self._handle(item)
                self._run_due_timers()
                if not self._stopping and self.escalated is None:
                    self._probe_children()
            except Exception:
                log.exception("supervisor control loop error")

    def _handle(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "call":
            item[1]()
        elif kind == "exit":
            self._handle_exit(item[1], item[2], item[3])

    def _schedule(self, delay: float, action: Callable[[], None]) -> None:
        due = self.clock.monotonic() + delay
        heapq.heappush(self._timers, (due, next(self._timer_ids), action))

    def _run_due_timers(self) -> None:
        now = self.clock.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, action = heapq.heappop(self._timers)
            action()

    def _on_exit(
        self, actor: Manager[Any], failure: BaseException | None, leftovers: list[Envelope[Any]]
    ) -> None:
        # Runs on the dying actor's thread: hand over to the control thread.
        self._events.put(("exit", actor, failure, leftovers))

    def _emit(self, topic: str, event: Event) -> None:
        if self._publish is None:
            return
        try:
            self._publish(topic, event)
        except Exception:
            log.warning("could not publish %s", topic, exc_info=True)

    def _lifecycle(self, child: _Child, change: str, reason: str = "") -> None:
        log.info(
            "manager %s %s%s",
            child.spec.name,
            change,
            f": {reason}" if reason else "",
            extra={"manager": child.spec.name, "change": change},
        )
        self._emit(
            f"supervisor.child.{change}",
            SupervisorChildChanged(
                child=child.spec.name,
                change=change,  # type: ignore[arg-type]
                reason=reason,
                restarts=child.restarts,
            ),
        )
        self._update_status()

    def _update_status(self) -> None:
        if not self._running or (self._stopping and self.escalated is None):
            return  # children come and go one by one in start() and stop(): not news
        current = self.snapshot()
        if current.status != self._status:
            previous, self._status = self._status, current.status
            reasons = [
                f"{s.name} is {s.state if s.state != 'running' else s.status}"
                for s in current.managers.values()
                if s.status != "healthy"
            ]
            log.warning("system health %s -> %s", previous, current.status)
            self._emit(
                "health.changed",
                HealthChanged(status=current.status, previous=previous, reasons=reasons),
            )

    def _set_state(
        self, child: _Child, state: ChildState, actor: Manager[Any] | None = None
    ) -> None:
        with self._cond:
            child.state = state
            child.actor = actor if state in ("starting", "running") else None
            child.live_ref = actor.actor_ref if state == "running" and actor else None
            child.probe = None
            self._cond.notify_all()

    # -- starting -------------------------------------------------------------------------

    def _initial_start(self, child: _Child, done: threading.Event) -> None:
        try:
            self._launch(child, change="started")
        finally:
            done.set()

    def _launch(self, child: _Child, *, change: str) -> None:
        spec = child.spec
        context = ManagerContext(
            name=spec.name,
            router=self.router,
            options=spec.options,
            mailbox_size=spec.mailbox_size,
            mailbox_put_timeout=spec.mailbox_put_timeout,
            on_exit=self._on_exit,
            redis_url=spec.redis_url or "",
            namespace=spec.namespace or "corral",
            signing_keys=spec.signing_keys or (),
            metrics=child.metrics,
            mounted=self.mounted.get(spec.name),
            clock=self.clock,
        )
        child.metrics.clear_gauges(spec.manager.metric_families)
        self._set_state(child, "starting")
        try:
            actor = spec.manager.corral_start(context)
        except Exception as exc:  # the manager's __init__ failed
            log.error("manager %s could not be created", spec.name, exc_info=exc)
            self._child_down(child, _describe(exc), abnormal=True, leftovers=[])
            return
        self._set_state(child, "starting", actor)
        if not actor.corral_settled.wait(self.policy.start_timeout):
            self._abandon(actor)
            self._child_down(
                child,
                f"on_start did not finish within {self.policy.start_timeout:g}s",
                abnormal=True,
                leftovers=actor.corral_mailbox.drain(),
            )
            return
        if actor.corral_failure is not None or not actor.actor_ref.is_alive():
            return  # its exit event follows and is handled as a crash
        if child.pending and actor.corral_mailbox.requeue(child.pending):
            child.pending = []  # else it died at once: they wait for the next successor
        child.started_at = time.monotonic()
        child.last_health = None
        self._set_state(child, "running", actor)
        self._lifecycle(child, change)

    # -- dying ----------------------------------------------------------------------------

    def _handle_exit(
        self, actor: Manager[Any], failure: BaseException | None, leftovers: list[Envelope[Any]]
    ) -> None:
        child = self._children.get(actor.corral_context.name)
        if child is None:
            return
        if child.actor is not actor:
            self._rehome(child, leftovers)  # an actor we stopped or abandoned
            return
        if failure is None and not self._stopping:
            self._child_down(child, "stopped by itself", abnormal=False, leftovers=leftovers)
        else:
            self._child_down(
                child,
                _describe(failure) if failure else "stopped",
                abnormal=failure is not None,
                leftovers=leftovers,
                counted=failure is None or not self._dead_letter(child, actor, failure),
            )

    def _rehome(self, child: _Child, leftovers: list[Envelope[Any]]) -> None:
        """Give messages left in a replaced actor's mailbox to its successor, or fail them."""
        if not leftovers:
            return
        running = child.state == "running" and child.actor is not None
        if running and child.actor is not None and child.actor.corral_mailbox.requeue(leftovers):
            return
        if running or child.state in ("starting", "restarting"):
            child.pending.extend(leftovers)  # a closed mailbox: its exit comes next
        else:
            self._fail_envelopes(child, leftovers)

    def _fail_envelopes(self, child: _Child, envelopes: list[Envelope[Any]]) -> None:
        reason = child.last_error or child.state
        for envelope in envelopes:
            if envelope.reply_to is None:
                self.dead_letters += 1
                continue
            if isinstance(envelope.message, ActorStop):
                envelope.reply_to.set(None)
                continue
            error = ManagerUnavailable(
                f"manager {child.spec.name!r} is {child.state} ({reason})",
                {"manager": child.spec.name},
            )
            envelope.reply_to.set_exception((ManagerUnavailable, error, None))
        if self.dead_letters:
            log.warning("manager %s: %d dead letters so far", child.spec.name, self.dead_letters)

    def _abandon(self, actor: Manager[Any]) -> None:
        """Give up on an actor that does not answer: it can never take another message."""
        thread = actor.corral_thread.name if actor.corral_thread is not None else "?"
        self.abandoned_threads.append(thread)
        actor.actor_stopped.set()
        ActorRegistry.unregister(actor.actor_ref)

    def _child_down(
        self,
        child: _Child,
        reason: str,
        *,
        abnormal: bool,
        leftovers: list[Envelope[Any]],
        counted: bool = True,
    ) -> None:
        """A child is down: restart it (or not) per its policy. ``counted``: the crash
        counts towards the restart intensity (a dead letter's does not)."""
        child.last_error = reason if abnormal else child.last_error
        child.pending.extend(leftovers)
        restart = child.spec.restart == "permanent" or (
            child.spec.restart == "transient" and abnormal
        )
        if self._stopping or not restart:
            self._set_state(child, "failed" if abnormal else "stopped")
            self._lifecycle(child, "failed" if abnormal else "stopped", reason)
            pending, child.pending = child.pending, []
            self._fail_envelopes(child, pending)
            return
        self._set_state(child, "restarting")
        if abnormal:
            self._lifecycle(child, "failed", reason)
        now = self.clock.monotonic()
        if counted:
            self._restart_times.append(now)
            while self._restart_times and self._restart_times[0] < now - self.policy.period:
                self._restart_times.popleft()
            if len(self._restart_times) > self.policy.max_restarts:
                self._escalate(
                    f"{len(self._restart_times)} restarts within {self.policy.period:g}s "
                    f"(max {self.policy.max_restarts}); last: {child.spec.name}: {reason}"
                )
                return
            child.restart_times.append(now)
        while child.restart_times and child.restart_times[0] < now - self.policy.period:
            child.restart_times.popleft()
        group = self._restart_group(child)
        for other in reversed(group):
            if other is not child:
                self._stop_child(other, then="restarting")
        delay = self._backoff(len(child.restart_times)) if counted else 0.0
        log.info("restarting %s in %.3fs", ", ".join(c.spec.name for c in group), delay)
        self._schedule(delay, lambda: self._restart(group))

    def _restart_group(self, child: _Child) -> list[_Child]:
        strategy = self.policy.strategy
        if strategy == "one_for_all":
            return [c for c in self._order if c is child or c.state in ("running", "starting")]
        if strategy == "rest_for_one":
            return [
                c
                for c in self._order
                if c is child or (c.index > child.index and c.state in ("running", "starting"))
            ]
        return [child]

    def _backoff(self, attempt: int) -> float:
        policy = self.policy
        return Backoff(policy.backoff_initial, policy.backoff_max, policy.backoff_jitter).delay(
            attempt
        )

    def _restart(self, group: list[_Child]) -> None:
        if self._stopping or self.escalated is not None:
            return
        for child in group:
            if child.state == "restarting":
                child.restarts += 1
                self._launch(child, change="restarted")

    def _stop_child(self, child: _Child, *, then: ChildState) -> None:
        actor = child.actor
        self._set_state(child, then)
        if actor is None:
            return
        try:
            actor.actor_ref.stop(block=True, timeout=child.spec.shutdown_timeout)
        except pykka.Timeout:
            log.error(
                "manager %s did not stop within %gs; abandoning its thread",
                child.spec.name,
                child.spec.shutdown_timeout,
            )
            self._abandon(actor)
            self._rehome(child, actor.corral_mailbox.drain())
        except pykka.ActorDeadError:
            pass
        if then == "stopped":
            self._lifecycle(child, "stopped")

    def _escalate(self, reason: str) -> None:
        log.critical("supervisor gives up: %s", reason)
        with self._cond:
            self.escalated = reason
            self._cond.notify_all()
        self._emit(
            "supervisor.child.escalated",
            SupervisorChildChanged(child="*", change="escalated", reason=reason),
        )
        self._stop_all(None)
        self._update_status()
        if self._on_escalate is not None:
            self._on_escalate(reason)

    def _stop_all(self, done: threading.Event | None) -> None:
        self._stopping = True
        try:
            for child in reversed(self._order):
                if child.state in ("running", "starting"):
                    self._stop_child(child, then="stopped")
                else:
                    self._set_state(child, "failed" if child.state == "failed" else "stopped")
                pending, child.pending = child.pending, []
                self._fail_envelopes(child, pending)
        finally:
            if done is not None:
                done.set()

    # -- liveness -------------------------------------------------------------------------

    def _probe_children(self) -> None:
        now = time.monotonic()
        for child in self._order:
            actor = child.actor
            if child.state != "running" or actor is None:
                continue
            if child.probe is not None:
                future, sent = child.probe
                try:
                    child.last_health = future.get(timeout=0)
                    child.probe = None
                except pykka.Timeout:
                    if now - sent > self.policy.probe_timeout:
                        self._hung(child, actor, now - sent)
                except Exception:
                    child.probe = None
            elif now - child.last_probe >= self.policy.probe_interval:
                child.last_probe = now
                try:
                    child.probe = (actor.actor_ref.ask(PROBE, block=False), now)
                except pykka.ActorDeadError:
                    child.probe = None
        self._update_status()

    def _hung(self, child: _Child, actor: Manager[Any], waited: float) -> None:
        thread = actor.corral_thread.name if actor.corral_thread is not None else "?"
        reason = (
            f"hung: no answer to the liveness probe for {waited:.1f}s (thread {thread} abandoned)"
        )
        self._abandon(actor)
        self._lifecycle(child, "hung", reason)
        self._child_down(child, reason, abnormal=True, leftovers=actor.corral_mailbox.drain())


QUARANTINE_SIZE = 10_000
"""How many poison requests a supervisor remembers (the oldest are forgotten first)."""

DEAD_LETTER_TEXT = 4096
"""How much of a dead letter's request and error is kept."""


def fingerprint(message: Message) -> str:
    """Identifies a request by its type and fields (not its id): the same one sent again."""
    return hashlib.blake2b(repr(message).encode(), digest_size=16).hexdigest()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
