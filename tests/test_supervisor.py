"""Supervision: strategies, restart policies, intensity, backoff, the three deaths, health."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pykka import ActorDeadError

from corral._runtime import Envelope, Mailbox
from corral.clock import ManualClock
from corral.config import Config, SupervisorSection, SystemSection
from corral.errors import ConfigError, ManagerUnavailable, NotFound, Overloaded
from corral.messages.system import HealthChanged, SupervisorChildChanged
from corral.supervisor import ChildSpec, start_order
from corral.system import System
from tests.support import Work, Worker, mailbox_depth, next_event, wait_until

FAST = SupervisorSection(
    backoff_initial=0.01,
    backoff_max=0.05,
    backoff_jitter=0.0,
    max_restarts=20,
    period=10.0,
    probe_interval=0.1,
    probe_timeout=0.5,
    shutdown_timeout=2.0,
    start_timeout=2.0,
)


PATIENT = SupervisorSection(**{**FAST.__dict__, "probe_timeout": 30.0})
"""For tests that block an actor on purpose: the liveness probe must not replace it."""


def spec(name: str, **kwargs: Any) -> ChildSpec:
    return ChildSpec(name=name, manager=Worker, **kwargs)


def make_system(
    *specs: ChildSpec,
    supervisor: SupervisorSection = FAST,
    clock: ManualClock | None = None,
    **system: Any,
) -> System:
    config = Config().replace(
        supervisor=supervisor, system=SystemSection(ask_timeout=3.0, **system)
    )
    return System(config, managers=specs, clock=clock)


def state(system: System, name: str) -> str:
    return system.supervisor.snapshot().managers[name].state


@pytest.fixture
def journal() -> list[str]:
    return []


def incarnation(system: System, name: str) -> int:
    return system.ask(Work(target=name)).incarnation


def test_start_in_dependency_order_and_stop_in_reverse(journal: list[str]) -> None:
    options = {"journal": journal}
    system = make_system(
        spec("web", depends_on=("cache", "db"), options=options),
        spec("cache", depends_on=("db",), options=options),
        spec("db", options=options),
    )
    with system:
        assert journal == ["start db", "start cache", "start web"]
        assert system.supervisor.names == ["system", "db", "cache", "web"]
    assert journal[3:] == ["stop web", "stop cache", "stop db"]


def test_dependency_cycle_and_unknown_dependency_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        start_order([spec("a", depends_on=("b",)), spec("b", depends_on=("a",))])
    with pytest.raises(ConfigError, match="no manager named 'ghost'"):
        start_order([spec("a", depends_on=("ghost",))])


def test_expected_error_answers_the_caller_and_the_actor_lives() -> None:
    with make_system(spec("worker")) as system:
        first = incarnation(system, "worker")
        with pytest.raises(NotFound, match="nothing here") as caught:
            system.ask(Work(action="refuse"))
        assert caught.value.details == {"asked": "refuse"}
        assert incarnation(system, "worker") == first
        assert system.supervisor.snapshot().managers["worker"].restarts == 0


def test_crash_in_ask_gives_manager_unavailable_and_a_restart() -> None:
    with make_system(spec("worker")) as system:
        events = system.subscribe("supervisor.child.*")
        first = incarnation(system, "worker")
        with pytest.raises(
            ManagerUnavailable, match=r"crashed handling test\.work: RuntimeError: boom"
        ):
            system.ask(Work(action="crash"))
        assert incarnation(system, "worker") == first + 1  # the name now reaches the new actor
        topic, failed = next_event(events, SupervisorChildChanged)
        assert (topic, failed.child) == ("supervisor.child.failed", "worker")
        assert "RuntimeError: boom" in failed.reason
        topic, restarted = next_event(events, SupervisorChildChanged)
        assert (topic, restarted.child, restarted.restarts) == (
            "supervisor.child.restarted",
            "worker",
            1,
        )


def test_crash_in_tell_is_seen_and_restarted() -> None:
    with make_system(spec("worker")) as system:
        first = incarnation(system, "worker")
        system.tell(Work(action="crash"))
        wait_until(lambda: system.supervisor.snapshot().managers["worker"].restarts == 1)
        assert incarnation(system, "worker") == first + 1


def test_failure_in_on_start_is_retried_until_it_starts() -> None:
    failures = {"flaky": 2}
    with make_system(spec("flaky", options={"fail_starts": failures})) as system:
        status = system.supervisor.snapshot().managers["flaky"]
        assert status.state == "running"
        assert status.restarts == 2
        assert "refuses to start" in (status.last_error or "")
        assert failures["flaky"] == 0


def test_system_exit_in_a_handler_stops_only_that_actor() -> None:
    with make_system(spec("a"), spec("b")) as system:
        b_before = incarnation(system, "b")
        with pytest.raises(ManagerUnavailable, match="SystemExit"):
            system.ask(Work(target="a", action="exit"))
        assert incarnation(system, "b") == b_before
        wait_until(lambda: system.supervisor.snapshot().managers["a"].state == "running")


def test_crash_in_one_actor_leaves_the_others_serving() -> None:
    with make_system(spec("a"), spec("b")) as system:
        b_before = incarnation(system, "b")
        for _ in range(3):
            system.tell(Work(target="a", action="crash"))
            assert system.ask(Work(target="b")).incarnation == b_before
        wait_until(lambda: system.supervisor.snapshot().managers["a"].restarts >= 1)
        assert system.supervisor.snapshot().managers["b"].restarts == 0


@pytest.mark.parametrize(
    ("strategy", "restarted"),
    [
        ("one_for_one", {"b"}),
        ("one_for_all", {"a", "b", "c"}),
        ("rest_for_one", {"b", "c"}),
    ],
)
def test_strategies_restart_the_right_children(strategy: str, restarted: set[str]) -> None:
    policy = SupervisorSection(**{**FAST.__dict__, "strategy": strategy})
    with make_system(spec("a"), spec("b"), spec("c"), supervisor=policy) as system:
        before = {n: incarnation(system, n) for n in "abc"}
        system.tell(Work(target="b", action="crash"))
        wait_until(lambda: system.supervisor.snapshot().managers["b"].restarts == 1)
        wait_until(
            lambda: all(
                s.state == "running" for s in system.supervisor.snapshot().managers.values()
            )
        )
        after = {n: incarnation(system, n) for n in "abc"}
        assert {n for n in "abc" if after[n] != before[n]} == restarted


@pytest.mark.parametrize(
    ("restart", "after_crash", "after_normal_stop"),
    [
        ("permanent", "running", "running"),
        ("transient", "running", "stopped"),
        ("temporary", "failed", "stopped"),
    ],
)
def test_restart_policies(restart: str, after_crash: str, after_normal_stop: str) -> None:
    clock = ManualClock()
    with make_system(spec("w", restart=restart), clock=clock) as system:
        system.tell(Work(target="w", action="crash"))
        wait_until(lambda: state(system, "w") != "running")  # the crash is handled
        clock.advance(FAST.backoff_max)  # a restart, if one is coming, is due
        system.supervisor.settle()
        assert state(system, "w") == after_crash
        if after_crash != "running":
            with pytest.raises(ManagerUnavailable, match="'w' is failed"):
                system.ask(Work(target="w"))
            return
        system.tell(Work(target="w", action="stop"))
        wait_until(lambda: state(system, "w") != "running")
        clock.advance(FAST.backoff_max)
        system.supervisor.settle()
        assert state(system, "w") == after_normal_stop


def test_intensity_exceeded_escalates() -> None:
    escalations: list[str] = []
    policy = SupervisorSection(**{**FAST.__dict__, "max_restarts": 2, "period": 30.0})
    config = Config().replace(supervisor=policy)
    system = System(config, managers=[spec("w", critical=True)], on_escalate=escalations.append)
    with system:
        health_events = system.subscribe("health.changed")
        for _ in range(3):
            ref = wait_until(lambda: system.supervisor.live_ref("w") or escalations)
            if escalations:
                break
            system.tell(Work(target="w", action="crash"))
            wait_until(lambda: system.supervisor.live_ref("w") is not ref)  # noqa: B023
        wait_until(lambda: escalations)
        assert "3 restarts within 30s (max 2)" in escalations[0]
        assert system.health().status == "unhealthy"
        assert system.health().escalated
        with pytest.raises(ManagerUnavailable, match="supervisor gave up"):
            system.ask(Work(target="w"))
        statuses = []
        while (delivery := health_events.get(timeout=0.5)) is not None:
            assert isinstance(delivery.message, HealthChanged)
            statuses.append(delivery.message.status)
        assert statuses
        assert statuses[-1] == "unhealthy"


def test_backoff_doubles_between_restarts() -> None:
    policy = SupervisorSection(
        **{**FAST.__dict__, "backoff_initial": 0.1, "backoff_max": 1.0, "backoff_jitter": 0.0}
    )
    clock = ManualClock()
    with make_system(spec("w"), supervisor=policy, clock=clock) as system:
        for n, backoff in enumerate([0.1, 0.2, 0.4], 1):
            system.tell(Work(target="w", action="crash"))
            wait_until(lambda: state(system, "w") == "restarting")
            clock.advance(backoff - 0.001)
            system.supervisor.settle()
            assert state(system, "w") == "restarting"  # not yet
            clock.advance(0.002)
            system.supervisor.settle()
            assert state(system, "w") == "running"
            assert system.supervisor.snapshot().managers["w"].restarts == n


def test_restarts_further_apart_than_the_period_do_not_escalate() -> None:
    policy = SupervisorSection(**{**FAST.__dict__, "max_restarts": 2, "period": 30.0})
    escalations: list[str] = []
    clock = ManualClock()
    config = Config().replace(supervisor=policy)
    system = System(config, managers=[spec("w")], on_escalate=escalations.append, clock=clock)
    with system:

        def crash_and_restart(after: float) -> None:
            system.tell(Work(target="w", action="crash"))
            wait_until(lambda: state(system, "w") == "restarting")
            clock.advance(after)
            system.supervisor.settle()
            assert state(system, "w") == "running" and not escalations

        for _ in range(4):
            crash_and_restart(after=15.01)  # never more than two restarts in 30 s
        clock.advance(30.0)  # the window forgets them all
        crash_and_restart(after=FAST.backoff_max)
        crash_and_restart(after=FAST.backoff_max)
        system.tell(Work(target="w", action="crash"))
        wait_until(lambda: escalations)
        assert "3 restarts within 30s (max 2)" in escalations[0]


def test_hung_actor_is_replaced_and_its_thread_reported() -> None:
    gate = threading.Event()
    with make_system(spec("w", options={"gate": gate})) as system:
        first = incarnation(system, "w")
        events = system.subscribe("supervisor.child.hung")
        system.tell(Work(target="w", action="block", seconds=30))
        _, hung = next_event(events, SupervisorChildChanged)
        assert "no answer to the liveness probe" in hung.reason
        assert incarnation(system, "w") == first + 1
        assert len(system.supervisor.abandoned_threads) == 1
        assert system.supervisor.abandoned_threads[0] in hung.reason
        gate.set()


def test_messages_queued_at_a_crash_go_to_the_successor() -> None:
    gate = threading.Event()
    with make_system(spec("w", options={"gate": gate}), supervisor=PATIENT) as system:
        first = incarnation(system, "w")
        system.tell(Work(target="w", action="block", seconds=5))
        system.tell(Work(target="w", action="crash"))
        replies: list[Any] = []
        threads = [
            threading.Thread(target=lambda: replies.append(system.ask(Work(target="w"))))
            for _ in range(5)
        ]
        for t in threads:
            t.start()
        wait_until(lambda: mailbox_depth(system, "w") >= 6)
        gate.set()
        for t in threads:
            t.join(5)
        assert len(replies) == 5
        assert {r.incarnation for r in replies} == {first + 1}


def test_bounded_mailbox_pushes_back_then_raises_overloaded() -> None:
    gate = threading.Event()
    system = make_system(
        spec("w", options={"gate": gate}, mailbox_size=3, mailbox_put_timeout=0.2),
        supervisor=PATIENT,
    )
    with system:
        system.tell(Work(target="w", action="block", seconds=10))
        wait_until(lambda: mailbox_depth(system, "w") == 0)
        for _ in range(3):
            system.tell(Work(target="w"))
        started = time.monotonic()
        with pytest.raises(Overloaded, match="the w mailbox stayed full"):
            system.tell(Work(target="w"))
        assert time.monotonic() - started >= 0.19
        gate.set()
        assert system.ask(Work(target="w")).handled == 5


def test_health_aggregation(journal: list[str]) -> None:
    system = make_system(
        spec("core", critical=True, restart="temporary"),
        spec("extra", restart="temporary"),
        spec("tired", options={"status": "degraded"}),
    )
    with system:
        system.ask(Work(target="core"))
        health = system.health()
        assert health.status == "degraded"
        assert health.managers["tired"].status == "degraded"
        assert health.managers["core"].health is not None
        assert health.managers["core"].health.metrics["handled"] == 1
        system.tell(Work(target="extra", action="crash"))
        wait_until(lambda: system.health().managers["extra"].state == "failed")
        assert system.health().status == "degraded"
        system.tell(Work(target="core", action="crash"))
        wait_until(lambda: system.health().managers["core"].state == "failed")
        health = system.health()
        assert health.status == "unhealthy"
        assert health.managers["core"].last_error == "RuntimeError: boom"


def test_all_healthy_is_healthy() -> None:
    with make_system(spec("a"), spec("b", critical=True)) as system:
        health = system.health()
        assert health.status == "healthy"
        assert {n: s.state for n, s in health.managers.items()} == {
            "system": "running",
            "a": "running",
            "b": "running",
        }


@pytest.fixture
def running() -> Iterator[System]:
    with make_system(spec("worker")) as system:
        yield system


def test_restart_is_invisible_to_a_caller_holding_the_name(running: System) -> None:
    done = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            try:
                done.append(running.ask(Work()).incarnation)
            except ManagerUnavailable:
                done.append(-1)

    first = running.ask(Work()).incarnation
    thread = threading.Thread(target=caller)
    thread.start()
    wait_until(lambda: len(done) > 10)
    running.tell(Work(action="crash"))
    wait_until(lambda: done and done[-1] == first + 1 and len(done) > 20)
    stop.set()
    thread.join()
    assert -1 not in done  # the caller never saw the restart


def test_system_exit_in_on_start_is_a_failed_start_not_a_clean_stop() -> None:
    exits = {"w": 1}
    with make_system(spec("w", restart="transient", options={"exit_on_start": exits})) as system:
        status = system.supervisor.snapshot().managers["w"]
        assert status.state == "running"  # transient: restarted, so the exit was a failure
        assert status.restarts == 1
        assert status.last_error == "SystemExit: w exits in on_start"


def test_a_crash_runs_on_failure_which_runs_on_stop(journal: list[str]) -> None:
    with make_system(spec("w", options={"journal": journal})) as system:
        system.tell(Work(target="w", action="crash"))
        wait_until(lambda: system.supervisor.snapshot().managers["w"].restarts == 1)
        assert journal[:3] == ["start w", "stop w", "start w"]  # released before the restart


def test_a_put_waiting_on_a_full_mailbox_is_refused_when_the_actor_dies() -> None:
    mailbox = Mailbox(capacity=1, put_timeout=10.0, owner="w")
    mailbox.put(Envelope("first"))
    outcome: list[BaseException] = []

    def blocked_put() -> None:
        try:
            mailbox.put(Envelope("second"))
        except BaseException as exc:  # the test inspects whatever it is
            outcome.append(exc)

    thread = threading.Thread(target=blocked_put)
    thread.start()
    wait_until(lambda: mailbox.not_full._waiters)  # type: ignore[attr-defined]
    assert [e.message for e in mailbox.drain()] == ["first"]
    thread.join(5)
    assert len(outcome) == 1
    assert isinstance(outcome[0], ActorDeadError)  # the router retries with the successor
    assert mailbox.qsize() == 0
    assert not mailbox.requeue([Envelope("late")])
