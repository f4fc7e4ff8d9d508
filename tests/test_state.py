"""The state manager on both backends: transition rules, versions, history, TTL, bad input,
multi-write commits, and acknowledged writes surviving a killed redis-server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from corral.actors.state import StateManager
from corral.actors.state._memory import MemoryBackend
from corral.config import Config
from corral.errors import (
    BackendUnavailable,
    ConfigError,
    Conflict,
    InvalidMessage,
    ManagerUnavailable,
    NotFound,
)
from corral.messages.state import (
    STANDARD_TRANSITIONS,
    TRANSITION_RULES,
    StateChanged,
    StateCommit,
    StateDelete,
    StateExpireDue,
    StateGet,
    StateGetHistory,
    StateInfo,
    StateRegister,
    StateTransition,
    StateType,
    StateUpdate,
    StateWrite,
)
from corral.supervisor import ChildSpec
from corral.system import System
from tests.redis_server import RedisServer
from tests.support import next_event, wait_until


def make_system(backend: str, url: str = "", **options: Any) -> System:
    spec = ChildSpec(
        name="state",
        manager=StateManager,
        options={"backend": backend, **options},
        redis_url=url,
    )
    return System(Config(), managers=[spec]).start()


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def system(backend: str, redis_server: RedisServer) -> Iterator[System]:
    # Commits below change several states at once: one partition holds them all.
    system = make_system(
        backend, redis_server.url, history_limit=5, expiry_interval=0.05, partitions=1
    )
    yield system
    system.stop()


def register(system: System, state_id: str = "u1", **fields: Any) -> StateInfo:
    fields.setdefault("state_type", "User")
    return system.ask(StateRegister(state_id=state_id, **fields))


def put_in(system: System, state_id: str, status: str) -> None:
    register(system, state_id)
    if status == "inactive":
        system.ask(StateUpdate(state_id=state_id, transition="deactivate"))
    elif status == "suspended":
        system.ask(StateUpdate(state_id=state_id, transition="suspend"))


@pytest.mark.parametrize("status", ["active", "inactive", "suspended"])
def test_every_transition_rule_from_every_status(system: System, status: str) -> None:
    for transition, rule in TRANSITION_RULES.items():
        state_id = f"{transition}-{status}"
        put_in(system, state_id, status)
        before = system.ask(StateGet(state_id=state_id))
        update = StateUpdate(state_id=state_id, transition=transition)
        if transition == "create":
            with pytest.raises(InvalidMessage):
                system.ask(update)
            with pytest.raises(Conflict, match="exists"):
                register(system, state_id)
        elif rule.sources and status not in rule.sources:
            with pytest.raises(Conflict, match=f"it is {status}"):
                system.ask(update)
            assert system.ask(StateGet(state_id=state_id)) == before
        else:
            after = system.ask(update)
            assert after.version == before.version + 1
            expected = {"=": status, "-": "expired" if transition == "expire" else "deleted"}
            assert after.status == expected.get(rule.target, rule.target)
            if rule.target == "-":
                with pytest.raises(NotFound):
                    system.ask(StateGet(state_id=state_id))


def test_transitions_outside_the_allowed_list_are_refused(system: System) -> None:
    info = register(system, allowed_transitions=["update", "approve"])
    with pytest.raises(Conflict, match="'suspend' is not allowed"):
        system.ask(StateUpdate(state_id="u1", transition="suspend"))
    with pytest.raises(Conflict, match="'reject' is not allowed"):
        system.ask(StateUpdate(state_id="u1", transition="reject"))
    approved = system.ask(StateUpdate(state_id="u1", transition="approve", data={"ok": True}))
    assert (approved.status, approved.data, approved.version) == ("active", {"ok": True}, 2)
    assert info.allowed_transitions == ["update", "approve"]
    assert register(system, "u2").allowed_transitions == list(STANDARD_TRANSITIONS)


def test_expected_version_conflicts(system: System) -> None:
    register(system, data={"n": 0})
    system.ask(StateUpdate(state_id="u1", data={"n": 1}, expected_version=1))
    with pytest.raises(Conflict) as caught:
        system.ask(StateUpdate(state_id="u1", data={"n": 9}, expected_version=1))
    assert caught.value.details["version"] == 2
    with pytest.raises(Conflict):
        system.ask(StateDelete(state_id="u1", expected_version=5))
    assert system.ask(StateGet(state_id="u1")).data == {"n": 1}


def test_history_keeps_the_latest_changes_and_events_carry_offsets(system: System) -> None:
    with system.subscribe("state.changed.User.*") as sub:
        register(system, data={"n": 0})
        for n in range(1, 10):
            system.ask(StateUpdate(state_id="u1", data={"n": n}))
        events = [next_event(sub, StateChanged)[1] for _ in range(10)]
    history = system.ask(StateGetHistory(state_id="u1")).entries
    assert [e.version for e in history] == [6, 7, 8, 9, 10]
    assert history == events[-5:]
    assert [e.offset for e in events] == list(range(1, 11))
    assert events[0].old is None and events[0].new == {"n": 0}
    assert (events[3].old, events[3].new) == ({"n": 2}, {"n": 3})
    assert system.ask(StateGetHistory(state_id="u1", limit=2)).entries == events[-2:]


def test_a_removed_state_takes_its_history_with_it(system: System) -> None:
    """The same on both backends: NotFound after a delete or an expiry, and a state
    created again under the id starts a new history, at the version after the removed
    one's (a compare-and-set client never sees a version twice)."""
    register(system, data={"n": 0})
    system.ask(StateUpdate(state_id="u1", data={"n": 1}))
    system.ask(StateDelete(state_id="u1"))
    with pytest.raises(NotFound, match="no history of state 'u1'"):
        system.ask(StateGetHistory(state_id="u1"))
    register(system, data={"n": 2})
    history = system.ask(StateGetHistory(state_id="u1")).entries
    assert [(e.transition, e.version, e.new) for e in history] == [("create", 4, {"n": 2})]

    register(system, "s1", state_type="Session", ttl=0.05)
    wait_until(lambda: _gone(system, "s1"))
    system.ask(StateExpireDue())
    with pytest.raises(NotFound, match="no history of state 's1'"):
        system.ask(StateGetHistory(state_id="s1"))


def test_memory_states_outlive_a_crash_of_their_actor(monkeypatch: pytest.MonkeyPatch) -> None:
    with make_system("memory") as system:
        register(system, data={"n": 0})
        system.ask(StateUpdate(state_id="u1", data={"n": 1}))
        crashes = [RuntimeError("a bug in a handler")]

        def get_once_crashing(self: MemoryBackend, state_id: str, now_ms: int) -> StateInfo:
            if crashes:
                raise crashes.pop()
            return original_get(self, state_id, now_ms)

        original_get = MemoryBackend.get
        monkeypatch.setattr(MemoryBackend, "get", get_once_crashing)
        with pytest.raises(ManagerUnavailable):
            system.ask(StateGet(state_id="u1"))
        wait_until(lambda: system.health().managers["state"].restarts == 1)

        assert system.ask(StateGet(state_id="u1")).data == {"n": 1}
        history = system.ask(StateGetHistory(state_id="u1")).entries
        assert [e.version for e in history] == [1, 2]
        after = system.ask(StateUpdate(state_id="u1", data={"n": 2}))
        assert after.version == 3
        (event,) = system.ask(StateGetHistory(state_id="u1", limit=1)).entries
        assert (event.offset, event.epoch) == (3, history[0].epoch)  # one stream, not a new one

    with make_system("memory") as other, pytest.raises(NotFound):  # states of its own
        other.ask(StateGet(state_id="u1"))


def test_ttl_expiry_emits_expire_and_hides_the_state(system: System) -> None:
    with system.subscribe("state.changed.Session.s1") as sub:
        register(system, "s1", state_type="Session", data={"cart": [1]}, ttl=0.2)
        assert next_event(sub, StateChanged)[1].transition == "create"
        topic, event = next_event(sub, StateChanged)
    assert topic == "state.changed.Session.s1"
    assert (event.transition, event.status, event.old, event.new) == (
        "expire", "expired", {"cart": [1]}, None)  # fmt: skip
    with pytest.raises(NotFound):
        system.ask(StateGet(state_id="s1"))
    register(system, "s1", state_type="Session")  # the id is free again


def test_updating_the_ttl_keeps_a_session_alive(system: System) -> None:
    register(system, "s1", state_type="Session", ttl=30)
    info = system.ask(StateUpdate(state_id="s1", ttl=0.05))
    assert info.expires_at is not None and info.expires_at <= info.updated_at + 50
    wait_until(lambda: system.ask(StateExpireDue()).state_ids == ["s1"] or _gone(system, "s1"))


def _gone(system: System, state_id: str) -> bool:
    try:
        system.ask(StateGet(state_id=state_id))
    except NotFound:
        return True
    return False


@pytest.mark.parametrize(
    ("request_", "error", "text"),
    [
        (StateGet(state_id="nobody"), NotFound, "no state 'nobody'"),
        (StateUpdate(state_id="nobody"), NotFound, "no state 'nobody'"),
        (StateDelete(state_id="nobody"), NotFound, "no state 'nobody'"),
        (StateGetHistory(state_id="nobody"), NotFound, "no history"),
        (StateUpdate(state_id="u1", transition="Bad Name"), InvalidMessage, "transition"),
        (StateUpdate(state_id="u1", data={"x": "y" * 70_000}), InvalidMessage, "over the limit"),
        (StateUpdate(state_id="u1", ttl=-1.0), InvalidMessage, "ttl: must be > 0"),
        (StateUpdate(state_id="u*"), InvalidMessage, "state id"),
        (StateRegister(state_id="u2", state_type="a.b"), InvalidMessage, "state type"),
        (StateUpdate(state_id="u1", data={"x": object()}), InvalidMessage, "data.x"),
        (StateUpdate(state_id=5), InvalidMessage, "state_id: expected str"),  # type: ignore[arg-type]
        (StateUpdate(state_id="u1", transition="resume"), Conflict, "it is active"),
        (
            StateCommit(
                writes=[
                    StateWrite(state_id="u1", transition="update", data={"n": 1}),
                    StateWrite(state_id="nobody", transition="update"),
                ]
            ),
            NotFound,
            "no state 'nobody'",
        ),
    ],
)
def test_bad_input_gets_a_clear_error_and_changes_nothing(
    system: System, request_: Any, error: type[Exception], text: str
) -> None:
    with system.subscribe("state.changed.*") as sub:
        register(system, data={"n": 0})
        assert next_event(sub, StateChanged)[1].transition == "create"
        with pytest.raises(error, match=text):
            system.ask(request_)
        assert system.ask(StateGet(state_id="u1")).version == 1
        assert sub.get(timeout=0.05) is None
    assert [e.transition for e in system.ask(StateGetHistory(state_id="u1")).entries] == ["create"]


def test_a_commit_applies_every_write_in_order_with_one_event_each(system: System) -> None:
    with system.subscribe("state.changed.*") as sub:
        register(system, "a")
        next_event(sub, StateChanged)  # events are published after the reply
    writes = [
        StateWrite(state_id="b", transition="create", state_type="Resource", data={"n": 1}),
        StateWrite(state_id="b", transition="update", data={"n": 2}, expected_version=1),
        StateWrite(state_id="a", transition="suspend", expected_version=1),
        StateWrite(state_id="b", transition="deactivate"),
    ]
    with system.subscribe("state.changed.*") as sub:
        states = system.ask(StateCommit(writes=writes)).states
        events = [next_event(sub, StateChanged)[1] for _ in writes]
    assert [(s.state_id, s.status, s.version) for s in states] == [
        ("b", "active", 1),
        ("b", "active", 2),
        ("a", "suspended", 2),
        ("b", "inactive", 3),
    ]
    assert [e.transition for e in events] == ["create", "update", "suspend", "deactivate"]
    assert system.ask(StateGet(state_id="b")).data == {"n": 2}


def test_acknowledged_writes_survive_a_killed_redis_and_the_others_fail_cleanly() -> None:
    with RedisServer("--appendonly", "yes", "--appendfsync", "always") as server:
        system = make_system("redis", server.url)
        acknowledged: list[int] = []
        failures: list[Exception] = []
        killed = threading.Event()

        def writer() -> None:
            for n in range(100_000):
                try:
                    register(system, f"w{n}", data={"n": n})
                    acknowledged.append(n)
                except BackendUnavailable as exc:
                    failures.append(exc)
                    if len(failures) >= 20:
                        return
                except Exception as exc:  # anything else fails the test below
                    failures.append(exc)
                    return
                if n == 300:
                    killed.wait(10)

        thread = threading.Thread(target=writer)
        thread.start()
        wait_until(lambda: len(acknowledged) > 300)
        server.kill()
        killed.set()
        thread.join(30)
        assert failures and all(isinstance(f, BackendUnavailable) for f in failures), failures
        server.start()
        with redis.Redis.from_url(server.url) as client:
            stored = {int(k.rsplit(b":", 1)[1][1:]) for k in client.keys("corral:{state:*}:s:*")}
        assert set(acknowledged) <= stored
        assert len(stored - set(acknowledged)) <= 1  # at most the write in flight at the kill
        assert register(system, "after").version == 1  # the manager carries on
        system.stop()


# -- declared state machines -----------------------------------------------------------------

ORDER_MACHINE = {
    "states": ["created", "paid", "shipped", "delivered", "cancelled"],
    "initial": "created",
    "transitions": {
        "pay": {"source": ["created"], "dest": "paid"},
        "ship": {"source": ["paid"], "dest": "shipped"},
        "deliver": {"source": ["shipped"], "dest": "delivered"},
        "cancel": {"source": ["created", "paid"], "dest": "cancelled"},
        "note": {"source": "*", "dest": "created"},
    },
}


@pytest.fixture
def orders(backend: str, redis_server: RedisServer) -> Iterator[System]:
    system = make_system(backend, redis_server.url, machines={"Order": ORDER_MACHINE})
    yield system
    system.stop()


def test_a_declared_machine_refuses_what_it_does_not_allow(orders: System) -> None:
    created = orders.ask(StateRegister(state_id="o1", state_type="Order", data={"sum": 5}))
    assert (created.status, created.allowed_transitions) == (
        "created", ["update", "delete", "pay", "ship", "deliver", "cancel", "note"])  # fmt: skip
    with pytest.raises(Conflict, match="cannot deliver state 'o1': it is created") as early:
        orders.ask(StateUpdate(state_id="o1", transition="deliver"))
    assert early.value.details == {
        "state_id": "o1", "transition": "deliver", "status": "created",
        "sources": ["shipped"]}  # fmt: skip
    assert orders.ask(StateUpdate(state_id="o1", transition="pay")).status == "paid"
    with pytest.raises(Conflict, match="cannot pay state 'o1': it is paid") as twice:
        orders.ask(StateUpdate(state_id="o1", transition="pay"))
    assert twice.value.details["sources"] == ["created"]
    with pytest.raises(Conflict, match="not declared for Order") as unknown:
        orders.ask(StateUpdate(state_id="o1", transition="suspend"))
    assert unknown.value.details["allowed"] == ["delete", "update", "ship", "cancel", "note"]
    assert orders.ask(StateUpdate(state_id="o1", data={"sum": 6})).status == "paid"
    for step, status in (("ship", "shipped"), ("deliver", "delivered")):
        assert orders.ask(StateUpdate(state_id="o1", transition=step)).status == status
    with pytest.raises(Conflict, match="runs only from created, paid"):
        orders.ask(StateUpdate(state_id="o1", transition="cancel"))
    assert orders.ask(StateGet(state_id="o1")).version == 5
    # Other types keep the standard rules.
    assert orders.ask(StateRegister(state_id="u1", state_type="User")).status == "active"
    assert orders.ask(StateUpdate(state_id="u1", transition="suspend")).status == "suspended"
    with pytest.raises(InvalidMessage, match="follow their declared machine"):
        orders.ask(StateRegister(state_id="o2", state_type="Order", allowed_transitions=["x"]))


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"states": ["a"], "initial": "b"}, "initial"),
        ({"states": ["a"], "initial": "a", "transitions": {"go": {"source": ["z"], "dest": "a"}}},
         "'z' is not one of"),
        ({"states": ["a"], "initial": "a", "transitions": {"update": {"source": "*",
                                                                     "dest": "a"}}},
         "other than the standard"),
    ],
)  # fmt: skip
def test_a_bad_machine_is_a_config_error(table: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        make_system("memory", machines={"Order": table})


def test_the_design_vocabulary_enums_are_the_wire_strings(system: System) -> None:
    assert [str(t) for t in StateTransition] == list(TRANSITION_RULES)
    info = system.ask(StateRegister(state_id="s1", state_type=StateType.SESSION.value))
    assert info.state_type == "Session"
    assert system.ask(
        StateUpdate(state_id="s1", transition=StateTransition.SUSPEND.value)
    ).status == ("suspended")
