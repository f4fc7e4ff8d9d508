"""Declared state machines on both backends: guards over the state's data, the entered and
exited events, versions that never restart, and the same outcomes as python-statemachine."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from statemachine import State
from statemachine import StateMachine as Reference
from statemachine.exceptions import TransitionNotAllowed

from corral._statemachine import compile_guard
from corral.errors import ConfigError, Conflict, NotFound
from corral.messages.state import (
    StateChanged,
    StateCommit,
    StateDelete,
    StateGet,
    StateRegister,
    StateUpdate,
    StateWrite,
)
from corral.messages.system import HealthCheck
from corral.system import System
from tests.redis_server import RedisServer
from tests.test_state import make_system

ORDER = {
    "states": ["new", "paid", "shipped", "delivered", "cancelled"],
    "initial": "new",
    "transitions": {
        "pay": {"source": "new", "dest": "paid", "guard": "data.amount > 0"},
        "ship": {"source": "paid", "dest": "shipped"},
        "deliver": {"source": "shipped", "dest": "delivered"},
        "cancel": {"source": ["new", "paid"], "dest": "cancelled"},
    },
}


@pytest.fixture(params=["memory", "redis"])
def orders(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[System]:
    system = make_system(request.param, redis_server.url, machines={"Order": ORDER})
    yield system
    system.stop()


def test_a_guard_refuses_a_transition_its_data_does_not_allow(orders: System) -> None:
    orders.ask(StateRegister(state_id="o1", state_type="Order", data={"amount": 0}))
    with pytest.raises(Conflict, match=r"cannot pay state 'o1': its guard does not hold") as no:
        orders.ask(StateUpdate(state_id="o1", transition="pay"))
    assert no.value.details == {
        "state_id": "o1", "transition": "pay", "status": "new",
        "guard": "data.amount > 0", "allowed": ["delete", "update", "pay", "cancel"],
    }  # fmt: skip
    assert orders.ask(StateGet(state_id="o1")).version == 1  # nothing changed
    # The guard sees the data as the transition leaves it.
    paid = orders.ask(StateUpdate(state_id="o1", transition="pay", data={"amount": 12}))
    assert (paid.status, paid.data, paid.version) == ("paid", {"amount": 12}, 2)

    orders.ask(StateRegister(state_id="o2", state_type="Order", data={"amount": 5}))
    with pytest.raises(Conflict, match="its guard does not hold"):  # in a commit too
        orders.ask(StateCommit(writes=[
            StateWrite(state_id="o2", transition="update", data={"amount": -1}),
            StateWrite(state_id="o2", transition="pay"),
        ]))  # fmt: skip
    committed = orders.ask(StateCommit(writes=[
        StateWrite(state_id="o2", transition="update", data={"amount": 7}),
        StateWrite(state_id="o2", transition="pay"),
    ])).states  # fmt: skip
    assert [s.status for s in committed] == ["new", "paid"]


def test_entering_and_leaving_a_state_are_published(orders: System) -> None:
    with (
        orders.subscribe("state.entered.Order.*") as entered,
        orders.subscribe("state.exited.Order.*") as exited,
    ):
        orders.ask(StateRegister(state_id="o1", state_type="Order", data={"amount": 3}))
        orders.ask(StateUpdate(state_id="o1", data={"amount": 4}))  # stays new: no news
        orders.ask(StateUpdate(state_id="o1", transition="pay"))
        orders.ask(StateDelete(state_id="o1"))
        seen_entered = [entered.get(timeout=5) for _ in range(2)]
        seen_exited = [exited.get(timeout=5) for _ in range(2)]
        assert entered.get(timeout=0.2) is None and exited.get(timeout=0.2) is None
    assert [(d.topic, _transition(d.message)) for d in seen_entered if d] == [
        ("state.entered.Order.new", "create"), ("state.entered.Order.paid", "pay")]  # fmt: skip
    assert [(d.topic, _transition(d.message)) for d in seen_exited if d] == [
        ("state.exited.Order.new", "pay"), ("state.exited.Order.paid", "delete")]  # fmt: skip
    assert seen_entered[1] is not None
    pay = seen_entered[1].message
    assert isinstance(pay, StateChanged)
    assert (pay.previous_status, pay.status) == ("new", "paid")


def test_a_state_created_again_goes_on_from_its_last_version(
    orders: System, redis_server: RedisServer
) -> None:
    orders.ask(StateRegister(state_id="o1", state_type="Order", data={"amount": 1}))
    orders.ask(StateUpdate(state_id="o1", data={"amount": 2}))
    removed = orders.ask(StateDelete(state_id="o1", expected_version=2))
    assert removed.version == 3
    with pytest.raises(NotFound):
        orders.ask(StateGet(state_id="o1"))
    again = orders.ask(StateRegister(state_id="o1", state_type="Order"))
    assert again.version == 4
    # A compare-and-set client holding version 2 from before cannot mistake it.
    with pytest.raises(Conflict, match="is at version 4, not 2"):
        orders.ask(StateUpdate(state_id="o1", data={}, expected_version=2))
    # Deleted and created again in one commit: still no version twice.
    states = orders.ask(StateCommit(writes=[
        StateWrite(state_id="o1", transition="delete"),
        StateWrite(state_id="o1", transition="create", state_type="Order"),
    ])).states  # fmt: skip
    assert [s.version for s in states] == [5, 6]
    if orders.ask(HealthCheck(target="state")).details["backend"] == "redis":
        orders.ask(StateDelete(state_id="o1"))  # a removed state leaves its version, a while
        with redis.Redis.from_url(redis_server.url) as client:
            (key,) = client.scan_iter("*s:o1")
            assert client.hgetall(key) == {b"version": b"7", b"tombstone": b"1"}
            assert 0 < client.pttl(key) <= 30 * 86_400_000


def _transition(event: object) -> str:
    assert isinstance(event, StateChanged)
    return event.transition


class ReferenceOrder(Reference):
    """The same order workflow in python-statemachine."""

    new = State(initial=True)
    paid = State()
    shipped = State()
    delivered = State(final=True)
    cancelled = State(final=True)
    pay = new.to(paid, cond="amount_positive")
    ship = paid.to(shipped)
    deliver = shipped.to(delivered)
    cancel = new.to(cancelled) | paid.to(cancelled)

    def amount_positive(self, amount: int = 0) -> bool:
        return amount > 0


def test_the_same_random_events_give_the_same_outcomes_as_python_statemachine(
    orders: System,
) -> None:
    chance = random.Random(20261127)
    outcomes: dict[str, int] = {"accepted": 0, "refused": 0}
    for order in range(20):
        state_id = f"order-{order}"
        orders.ask(StateRegister(state_id=state_id, state_type="Order", data={"amount": 0}))
        reference = ReferenceOrder()
        for _ in range(12):
            event = chance.choice(["pay", "pay", "ship", "deliver", "cancel"])
            amount = chance.choice([-5, 0, 0, 7, 30])
            data: dict[str, Any] | None = {"amount": amount} if event == "pay" else None
            try:
                reference.send(event, amount=amount)
                expected = "accepted"
            except TransitionNotAllowed:
                expected = "refused"
            try:
                orders.ask(StateUpdate(state_id=state_id, transition=event, data=data))
                got = "accepted"
            except Conflict:
                got = "refused"
            assert got == expected, (state_id, event, amount)
            outcomes[got] += 1
            status = orders.ask(StateGet(state_id=state_id)).status
            assert status == next(iter(reference.configuration)).id, (state_id, event, amount)
    assert outcomes["accepted"] > 30 and outcomes["refused"] > 30  # both paths were taken


@pytest.mark.parametrize(
    ("guard", "problem"),
    [
        ("__import__('os')", "only len(x) may be called"),
        ("data.__class__", "'__class__' is not allowed"),
        ("amount > 0", "unknown name 'amount'"),
        ("[x for x in data]", "ListComp is not allowed"),
        ("data.a >", "invalid syntax"),
    ],
)
def test_a_guard_outside_the_language_is_a_config_error(guard: str, problem: str) -> None:
    table = {**ORDER, "transitions": {"pay": {"source": "new", "dest": "paid", "guard": guard}}}
    with pytest.raises(ConfigError, match=re.escape(problem)):
        make_system("memory", machines={"Order": table})


def test_a_guard_is_false_on_data_it_cannot_judge() -> None:
    positive = compile_guard("data.amount * 2 > 10 and len(data['items']) >= 1")
    assert positive({"amount": 6, "items": ["a"]}, "new")
    assert not positive({"amount": "x" * 10, "items": ["a"]}, "new")  # no string arithmetic
    assert not positive({"amount": None, "items": ["a"]}, "new")
    assert not positive({}, "new")
    assert compile_guard("status == 'new' and not data.blocked")({}, "new")
