"""The transaction manager over the state manager (both backends): read-your-writes,
nested savepoints, all-or-nothing commits, concurrent conflicts, idle rollback."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from corral.actors.state import StateManager
from corral.actors.transaction import TransactionManager
from corral.config import Config
from corral.errors import Conflict, NotFound
from corral.ext.transaction import Transaction, transaction
from corral.messages.state import StateChanged, StateGet, StateRegister, StateUpdate, StateWrite
from corral.messages.system import HealthCheck
from corral.messages.transaction import (
    TransactionBegin,
    TransactionCommit,
    TransactionGet,
    TransactionWrite,
)
from corral.supervisor import ChildSpec
from corral.system import System
from tests.redis_server import RedisServer
from tests.support import next_event, wait_until


@pytest.fixture(params=["memory", "redis"])
def system(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[System]:
    specs = [
        # Transactions below change several states at once: one partition holds them all.
        ChildSpec(name="state", manager=StateManager,
                  options={"backend": request.param, "partitions": 1},
                  redis_url=redis_server.url),
        ChildSpec(name="transaction", manager=TransactionManager,
                  options={"sweep_interval": 0.05}, depends_on=("state",)),
    ]  # fmt: skip
    system = System(Config(), managers=specs).start()
    with system.subscribe("state.changed.*") as sub:
        for state_id in ("a", "b"):
            system.ask(StateRegister(state_id=state_id, state_type="User", data={"n": 0}))
            next_event(sub, StateChanged)  # published just after the reply: let it pass
    yield system
    system.stop()


def data(system: System, state_id: str) -> object:
    return system.ask(StateGet(state_id=state_id)).data


def undone_block(
    system: System,
    tx: Transaction | None,
    *changes: tuple[str, int | None],
    error: Exception,
) -> None:
    """A ``with transaction(system)`` block making ``changes`` (None: delete), then raising."""
    with transaction(system) as inner:
        assert tx is None or inner is tx
        for state_id, n in changes:
            if n is None:
                inner.delete(state_id)
            else:
                inner.update(state_id, data={"n": n})
        raise error


def test_writes_are_buffered_visible_inside_and_published_after_commit(system: System) -> None:
    with system.subscribe("state.changed.*") as sub:
        with transaction(system) as tx:
            assert tx.update("a", data={"n": 1}).version == 2
            tx.register("c", "Resource", data={"new": True})
            tx.update("c", transition="suspend")
            assert tx.get("a").data == {"n": 1}
            assert tx.get("c").status == "suspended"
            assert data(system, "a") == {"n": 0}  # nothing applied yet
            with pytest.raises(NotFound):
                system.ask(StateGet(state_id="c"))
            assert sub.get(timeout=0.1) is None  # nor published
        events = [next_event(sub, StateChanged)[1] for _ in range(3)]
    assert [(e.state_id, e.transition) for e in events] == [
        ("a", "update"), ("c", "create"), ("c", "suspend")]  # fmt: skip
    assert [s.version for s in tx.states] == [2, 1, 2]
    assert data(system, "a") == {"n": 1}


def test_nested_savepoints_roll_back_exactly_their_part(system: System) -> None:
    with transaction(system) as tx:
        tx.update("a", data={"n": 1})
        with transaction(system):
            tx.update("a", data={"n": 2})
            with pytest.raises(RuntimeError, match="innermost"):
                undone_block(system, tx, ("b", 3), ("a", 4), error=RuntimeError("innermost"))
            assert (tx.get("a").data, tx.get("b").data) == ({"n": 2}, {"n": 0})
            tx.update("b", data={"n": 5})
        with pytest.raises(ValueError, match="this one too"):
            undone_block(system, tx, ("b", None), error=ValueError("this one too"))
        assert tx.get("b").data == {"n": 5}
    assert (data(system, "a"), data(system, "b")) == ({"n": 2}, {"n": 5})
    assert system.ask(StateGet(state_id="a")).version == 3


def test_an_error_in_the_outer_block_rolls_everything_back(system: System) -> None:
    with pytest.raises(KeyError, match="abort"):
        undone_block(system, None, ("a", 1), error=KeyError("abort"))
    assert data(system, "a") == {"n": 0}


def test_explicit_savepoints(system: System) -> None:
    with transaction(system) as tx:
        tx.update("a", data={"n": 1})
        first = tx.savepoint()
        tx.update("a", data={"n": 2})
        tx.savepoint("second")
        tx.update("a", data={"n": 3})
        tx.rollback_to_savepoint(first)
        assert tx.get("a").data == {"n": 1}
        with pytest.raises(NotFound, match="second"):
            tx.rollback_to_savepoint("second")
    assert data(system, "a") == {"n": 1}


def test_two_concurrent_transactions_one_commits_the_other_conflicts(system: System) -> None:
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def run(value: int) -> None:
        try:
            with transaction(system) as tx:
                tx.update("a", data={"n": value})
                tx.update("b", data={"n": value})
                barrier.wait(5)
        except Conflict:
            outcomes.append("conflict")
        else:
            outcomes.append(f"committed {value}")

    threads = [threading.Thread(target=run, args=(v,)) for v in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(o.split()[0] for o in outcomes) == ["committed", "conflict"]
    winner = next(int(o.split()[1]) for o in outcomes if o.startswith("committed"))
    assert (data(system, "a"), data(system, "b")) == ({"n": winner}, {"n": winner})
    assert system.ask(StateGet(state_id="b")).version == 2


def test_a_change_made_outside_makes_the_commit_fail_and_apply_nothing(system: System) -> None:
    def race_with_an_outside_change() -> None:
        with transaction(system) as tx:
            tx.update("b", data={"n": 1})
            tx.update("a", data={"n": 1})
            system.ask(StateUpdate(state_id="a", data={"n": "outside"}))

    with pytest.raises(Conflict):
        race_with_an_outside_change()
    assert (data(system, "a"), data(system, "b")) == ({"n": "outside"}, {"n": 0})


def test_bad_writes_are_refused_at_once(system: System) -> None:
    with transaction(system) as tx:
        with pytest.raises(NotFound):
            tx.update("nobody")
        with pytest.raises(Conflict, match="it is active"):
            tx.update("a", transition="resume")
        with pytest.raises(Conflict, match="version"):
            tx.update("a", data={}, expected_version=7)
        tx.delete("a")
        with pytest.raises(NotFound):
            tx.get("a")
    with pytest.raises(NotFound):
        system.ask(StateGet(state_id="a"))


def test_an_idle_transaction_is_rolled_back(system: System) -> None:
    tid = system.ask(TransactionBegin(idle_timeout=0.1)).transaction_id
    write = StateWrite(state_id="a", transition="update", data={"n": 1})
    system.ask(TransactionWrite(transaction_id=tid, write=write))

    wait_until(lambda: system.ask(HealthCheck(target="transaction")).metrics["open"] == 0)
    with pytest.raises(NotFound, match="rolled back after its idle timeout"):
        system.ask(TransactionGet(transaction_id=tid, state_id="a"))
    with pytest.raises(NotFound):
        system.ask(TransactionCommit(transaction_id=tid))
    assert data(system, "a") == {"n": 0}
