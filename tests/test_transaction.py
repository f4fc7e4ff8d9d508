"""The transaction manager over the state manager, both in memory and both on Redis:
read-your-writes, nested savepoints, all-or-nothing commits, concurrent conflicts, idle
rollback; and, on Redis, two systems (as two daemons) serving one transaction."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from corral.actors.state import StateManager
from corral.actors.transaction import TransactionManager
from corral.actors.transaction._redis import RedisStore
from corral.actors.transaction._store import TransactionRecord
from corral.clock import ManualClock
from corral.config import Config
from corral.errors import Conflict, NotFound
from corral.ext.transaction import Transaction, on_commit, transaction
from corral.messages.base import Request
from corral.messages.state import (
    StateChanged,
    StateGet,
    StateInfo,
    StateRegister,
    StateUpdate,
    StateWrite,
)
from corral.messages.system import HealthCheck
from corral.messages.transaction import (
    ISOLATION_LEVELS,
    IsolationLevel,
    TransactionBegin,
    TransactionCommit,
    TransactionGet,
    TransactionWrite,
)
from corral.supervisor import ChildSpec
from corral.system import System
from tests.redis_server import RedisServer
from tests.support import next_event, wait_until


def start_system(backend: str, redis_url: str, clock: ManualClock | None = None) -> System:
    """State and transaction managers, both on ``backend``; on Redis, sharing ``redis_url``'s
    data with any other system started so (as daemons of one namespace do)."""
    specs = [
        # Transactions below change several states at once: one partition holds them all.
        ChildSpec(name="state", manager=StateManager,
                  options={"backend": backend, "partitions": 1}, redis_url=redis_url),
        ChildSpec(name="transaction", manager=TransactionManager,
                  options={"backend": backend, "sweep_interval": 0.05}, redis_url=redis_url,
                  depends_on=("state",)),
    ]  # fmt: skip
    return System(Config(), managers=specs, clock=clock).start()


@pytest.fixture(params=["memory", "redis"])
def system(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[System]:
    if request.param == "memory":
        system = start_system("memory", "", ManualClock())
    else:
        system = start_system("redis", redis_server.url)
    assert system.ask(HealthCheck(target="transaction")).details["backend"] == request.param
    with system.subscribe("state.changed.*") as sub:
        for state_id in ("a", "b"):
            system.ask(StateRegister(state_id=state_id, state_type="User", data={"n": 0}))
            next_event(sub, StateChanged)  # published just after the reply: let it pass
    yield system
    system.stop()


def data(system: System, state_id: str) -> object:
    return system.ask(StateGet(state_id=state_id)).data


def record_key(redis_url: str, transaction_id: str) -> str:
    """Where a system of the default namespace keeps the transaction on Redis."""
    with contextlib.closing(RedisStore(redis_url, namespace="corral")) as store:
        return store.keys(transaction_id)[0]


def idle_past_timeout(system: System, redis_url: str, transaction_id: str, timeout: float) -> None:
    """The transaction's idle timeout runs out. In memory the system's manual clock moves
    past it; on Redis, whose key TTL times it (and cannot be moved), wait until Redis has
    expired the record."""
    clock = system.supervisor.clock
    if isinstance(clock, ManualClock):
        clock.advance(timeout)
        return
    with redis.Redis.from_url(redis_url) as client:
        key = record_key(redis_url, transaction_id)
        wait_until(lambda: not client.exists(key))


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


def test_an_idle_transaction_is_rolled_back(system: System, redis_server: RedisServer) -> None:
    tid = system.ask(TransactionBegin(idle_timeout=0.1)).transaction_id
    write = StateWrite(state_id="a", transition="update", data={"n": 1})
    system.ask(TransactionWrite(transaction_id=tid, write=write))

    idle_past_timeout(system, redis_server.url, tid, 0.1)  # asking meanwhile would keep it open
    if system.ask(HealthCheck(target="transaction")).details["backend"] == "memory":
        # Swept by the manager, not only refused when asked for.
        wait_until(lambda: system.ask(HealthCheck(target="transaction")).metrics["open"] == 0)
    with pytest.raises(NotFound, match="rolled back after its idle timeout"):
        system.ask(TransactionGet(transaction_id=tid, state_id="a"))
    with pytest.raises(NotFound):
        system.ask(TransactionCommit(transaction_id=tid))
    assert data(system, "a") == {"n": 0}
    with pytest.raises(NotFound) as unknown:
        system.ask(TransactionGet(transaction_id="never-begun", state_id="a"))
    assert "idle timeout" not in str(unknown.value)


def test_memory_transactions_on_a_redis_system_are_a_warning(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    start_system("memory", redis_server.url).stop()
    assert "backend = memory on a Redis bus" in caplog.text


# -- on Redis, served by several systems at once (as by several daemons) ---------------------


@pytest.fixture
def two_systems(redis_server: RedisServer) -> Iterator[tuple[System, System]]:
    first, second = (start_system("redis", redis_server.url) for _ in range(2))
    first.ask(StateRegister(state_id="a", state_type="User", data={"n": 0}))
    yield first, second
    first.stop()
    second.stop()


def metric(system: System, name: str) -> int:
    value = system.ask(HealthCheck(target="transaction")).metrics[name]
    assert isinstance(value, int)
    return value


def test_a_stored_transaction_changes_only_at_the_version_it_was_read(
    redis_server: RedisServer,
) -> None:
    first, second = (RedisStore(redis_server.url, namespace="cas") for _ in range(2))
    first.begin("t1", TransactionRecord(idle_timeout=30.0))
    (mine, version), (theirs, same) = first.load("t1"), second.load("t1")
    mine.writes.append(StateWrite(state_id="a", transition="update", data={"n": 1}))
    theirs.savepoints.append(("sp", 0))
    assert first.save("t1", mine, version)
    assert not second.save("t1", theirs, same)  # lost the race: nothing of it stored
    reread, newer = second.load("t1")
    assert (reread.writes, reread.savepoints, newer) == (mine.writes, [], version + 1)
    with redis.Redis.from_url(redis_server.url) as client:
        assert sorted(client.keys("cas:*")) == [b"cas:{tx:t1}", b"cas:{tx:t1}:idle"]
        assert 0 < client.pttl("cas:{tx:t1}") <= 30_000
    assert second.take("t1").writes == mine.writes
    with pytest.raises(NotFound):
        first.take("t1")
    first.close()
    second.close()


def test_concurrent_writers_on_two_systems_lose_no_write(
    two_systems: tuple[System, System],
) -> None:
    first, second = two_systems
    tid = first.ask(TransactionBegin()).transaction_id
    per_thread = 25

    def write_many(system: System, tag: int) -> None:
        for n in range(per_thread):
            write = StateWrite(state_id="a", transition="update", data={"by": tag, "n": n})
            system.ask(TransactionWrite(transaction_id=tid, write=write))

    threads = [
        threading.Thread(target=write_many, args=(system, tag))
        for tag, system in enumerate([first, second, first, second])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    committed = second.ask(TransactionCommit(transaction_id=tid)).states
    assert len(committed) == 4 * per_thread
    assert first.ask(StateGet(state_id="a")).version == 1 + 4 * per_thread
    print("compare-and-set retries:", metric(first, "retried") + metric(second, "retried"))


def test_an_idle_transaction_is_rolled_back_for_every_system(
    two_systems: tuple[System, System], redis_server: RedisServer
) -> None:
    first, second = two_systems
    tid = first.ask(TransactionBegin(idle_timeout=30)).transaction_id
    record = record_key(redis_server.url, tid)
    write = StateWrite(state_id="a", transition="update", data={"n": 1})
    with redis.Redis.from_url(redis_server.url) as client:
        # Redis's TTL times the timeout: shortened, it stands for most of it gone by.
        client.pexpire(record, 2000)
        second.ask(TransactionWrite(transaction_id=tid, write=write))  # restarts the timeout
        assert client.pttl(record) > 2000
        client.pexpire(record, 2000)
        first.ask(TransactionGet(transaction_id=tid, state_id="a"))  # so does a read
        assert client.pttl(record) > 2000
        assert second.ask(TransactionGet(transaction_id=tid, state_id="a")).data == {"n": 1}
        client.pexpire(record, 1)
        wait_until(lambda: not client.exists(record))  # idle past its timeout
    for system in two_systems:
        with pytest.raises(NotFound, match="rolled back after its idle timeout"):
            system.ask(TransactionWrite(transaction_id=tid, write=write))
    with pytest.raises(NotFound, match="rolled back after its idle timeout"):
        second.ask(TransactionCommit(transaction_id=tid))
    assert first.ask(StateGet(state_id="a")).version == 1


def test_two_concurrent_commits_of_one_transaction_apply_it_once(
    two_systems: tuple[System, System],
) -> None:
    first, second = two_systems
    tid = first.ask(TransactionBegin()).transaction_id
    write = StateWrite(state_id="a", transition="update", data={"n": 1})
    first.ask(TransactionWrite(transaction_id=tid, write=write))
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def commit(system: System) -> None:
        barrier.wait(5)
        try:
            system.ask(TransactionCommit(transaction_id=tid))
        except NotFound as exc:
            outcomes.append(f"not found: {exc}")
        else:
            outcomes.append("committed")

    threads = [threading.Thread(target=commit, args=(s,)) for s in two_systems]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(outcomes)[0] == "committed", outcomes
    assert sorted(outcomes)[1].startswith("not found: no open transaction"), outcomes
    assert first.ask(StateGet(state_id="a")).version == 2
    assert metric(first, "committed") + metric(second, "committed") == 1


# -- isolation: write skew -------------------------------------------------------------------


def go_off_call(
    system: System, doctor: str, both_read: threading.Barrier, isolation: IsolationLevel
) -> str:
    """A doctor goes off call if the other one is still on call (both read, then one writes)."""
    try:
        with transaction(system, isolation_level=isolation) as tx:
            on_call = [tx.get(name).data["on_call"] for name in ("a", "b")]
            both_read.wait(5)
            if all(on_call):
                tx.update(doctor, data={"on_call": False})
            both_read.wait(5)
    except Conflict as refused:
        return f"conflict {refused.details['state_id']}"
    return "committed"


@pytest.mark.parametrize("isolation", ISOLATION_LEVELS)
def test_two_doctors_cannot_both_go_off_call_when_serializable(
    system: System, isolation: IsolationLevel
) -> None:
    for doctor in ("a", "b"):
        system.ask(StateUpdate(state_id=doctor, data={"on_call": True}))
    both_read = threading.Barrier(2)
    outcomes: list[str] = []
    threads = [
        threading.Thread(
            target=lambda d=doctor: outcomes.append(go_off_call(system, d, both_read, isolation))
        )
        for doctor in ("a", "b")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    still_on_call = [data(system, name) == {"on_call": True} for name in ("a", "b")]
    if isolation == "serializable":
        assert sorted(o.split()[0] for o in outcomes) == ["committed", "conflict"]
        assert still_on_call.count(True) == 1
    else:  # write skew: each read a state the other then changed
        assert outcomes == ["committed", "committed"]
        assert still_on_call == [False, False]


def add_one_to_a_into_b(system: System, isolation: IsolationLevel, a_meanwhile: int) -> None:
    """Read a, let someone else set it to ``a_meanwhile``, write b = a + 1."""
    with transaction(system, isolation_level=isolation) as tx:
        seen = tx.get("a").data["n"]
        system.ask(StateUpdate(state_id="a", data={"n": a_meanwhile}))
        tx.update("b", data={"n": seen + 1})


def test_a_commit_whose_read_changed_meanwhile_is_refused_naming_the_state(
    system: System,
) -> None:
    system.ask(StateUpdate(state_id="a", data={"n": 1}))
    with pytest.raises(Conflict, match="'a' changed since the transaction read it") as refused:
        add_one_to_a_into_b(system, "serializable", a_meanwhile=100)
    assert refused.value.details == {"state_id": "a", "read_version": 2, "version": 3}
    assert data(system, "b") == {"n": 0}
    add_one_to_a_into_b(system, "read_committed", a_meanwhile=7)
    assert data(system, "b") == {"n": 101}


def read_while_changed_outside(system: System, reads: list[str], outside: Request[Any]) -> None:
    """Read ``reads`` in a transaction, then send ``outside`` before it commits."""
    with transaction(system) as tx:
        for state_id in reads:
            with contextlib.suppress(NotFound):
                tx.get(state_id)
        system.ask(outside)


def test_a_read_only_transaction_checks_its_reads_too(system: System) -> None:
    with pytest.raises(Conflict, match="'b'"):
        read_while_changed_outside(system, ["a", "b"], StateUpdate(state_id="b", data={"n": 5}))
    with pytest.raises(Conflict, match="'c'"):  # read as absent, created meanwhile
        read_while_changed_outside(
            system, ["a", "c"], StateRegister(state_id="c", state_type="User")
        )


# -- on_commit hooks and async with ----------------------------------------------------------


def test_on_commit_hooks_run_after_the_outermost_commit_and_only_then(system: System) -> None:
    ran: list[str] = []
    with transaction(system) as tx:
        tx.update("a", data={"n": 1})
        tx.on_commit(lambda: ran.append(f"committed a={data(system, 'a')}"))
        with transaction(system):
            on_commit(system, lambda: ran.append("kept savepoint"))
        with contextlib.suppress(RuntimeError), transaction(system):
            tx.on_commit(lambda: ran.append("rolled-back savepoint"))
            raise RuntimeError
        mark = tx.savepoint()
        tx.on_commit(lambda: ran.append("rolled back by name"))
        tx.rollback_to_savepoint(mark)
        assert ran == []
    assert ran == ["committed a={'n': 1}", "kept savepoint"]

    ran.clear()
    with contextlib.suppress(KeyError), transaction(system) as tx:
        tx.on_commit(lambda: ran.append("never"))
        raise KeyError
    on_commit(system, lambda: ran.append("no transaction: at once"))
    assert ran == ["no transaction: at once"]


def test_a_conflicting_commit_drops_its_hooks(system: System) -> None:
    ran: list[str] = []

    def commit_after_an_outside_change() -> None:
        with transaction(system) as tx:
            tx.update("a", data={"n": 1})
            tx.on_commit(lambda: ran.append("never"))
            system.ask(StateUpdate(state_id="a", data={"n": 2}))

    with pytest.raises(Conflict):
        commit_after_an_outside_change()
    assert ran == []


async def async_order(system: System, ran: list[str]) -> list[StateInfo]:
    async def notify() -> None:
        ran.append("async hook")

    async with transaction(system) as tx:
        await tx.update("a", data={"n": 1})
        tx.on_commit(notify)
        async with transaction(system) as inner:
            assert inner is tx
            await tx.register("c", "Resource", data={"new": True})
        with contextlib.suppress(RuntimeError):
            async with transaction(system):
                await tx.update("b", data={"n": 99})
                tx.on_commit(lambda: ran.append("never"))
                raise RuntimeError
        assert (await tx.get("b")).data == {"n": 0}
        assert data(system, "a") == {"n": 0}
    return tx.states


def test_async_with_transaction_commits_with_savepoints_and_hooks(system: System) -> None:
    ran: list[str] = []
    states = asyncio.run(async_order(system, ran))
    assert [(s.state_id, s.version) for s in states] == [("a", 2), ("c", 1)]
    assert ran == ["async hook"]
    assert (data(system, "a"), data(system, "b"), data(system, "c")) == (
        {"n": 1}, {"n": 0}, {"new": True})  # fmt: skip


def test_async_with_rolls_back_on_an_error(system: System) -> None:
    async def fail() -> None:
        async with transaction(system, isolation_level="read_committed") as tx:
            await tx.update("a", data={"n": 1})
            raise LookupError("abort")

    with pytest.raises(LookupError):
        asyncio.run(fail())
    assert data(system, "a") == {"n": 0}


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_transaction_follows_the_declared_machine(
    backend: str, redis_server: RedisServer
) -> None:
    machine = {
        "states": ["created", "paid"],
        "initial": "created",
        "transitions": {"pay": {"source": ["created"], "dest": "paid"}},
    }
    specs = [
        ChildSpec(name="state", manager=StateManager,
                  options={"backend": backend, "partitions": 1, "machines": {"Order": machine}},
                  redis_url=redis_server.url),
        ChildSpec(name="transaction", manager=TransactionManager, options={"backend": backend},
                  redis_url=redis_server.url, depends_on=("state",)),
    ]  # fmt: skip
    with System(Config(), managers=specs) as system:
        with transaction(system) as tx:
            assert tx.register("o1", "Order").status == "created"
            assert tx.update("o1", transition="pay").status == "paid"
            with pytest.raises(Conflict, match="cannot pay state 'o1': it is paid"):
                tx.update("o1", transition="pay")
        assert system.ask(StateGet(state_id="o1")).status == "paid"
