"""The rules of states, applied: what the state manager and the transaction manager share.

The rules themselves are data in :mod:`corral.messages.state` (the standard
:data:`~corral.messages.state.TRANSITION_RULES`, a declared
:class:`~corral.messages.state.StateMachine`); this module checks a write, applies it
to a state, and builds the errors every backend answers with, so that the memory
backend, the Redis backend and a transaction's read-your-writes overlay agree::

    check_write(write)                                   # InvalidMessage naming the field
    after = apply_transition(current, write, now_ms, machines)   # NotFound, Conflict
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import msgspec

from corral.errors import Conflict, InvalidMessage, NotFound
from corral.messages.base import MAX_TTL
from corral.messages.state import (
    KEEP,
    REMOVE,
    STANDARD_TRANSITIONS,
    TRANSITION_RULES,
    StateInfo,
    StateMachine,
    StateMachineTransition,
    StateWrite,
    TransitionRule,
)

__all__ = [
    "Guard",
    "apply_transition",
    "check_reads",
    "check_state_id",
    "check_write",
    "compile_guard",
    "guard_refused",
    "machine_from_table",
    "read_conflict",
    "status_conflict",
    "undeclared_transition",
]

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_GUARD_LENGTH = 500

Guard = Callable[[Mapping[str, Any], str], bool]
"""A compiled guard: given the state's data after the transition and its status before."""


def compile_guard(text: str) -> Guard:
    """A guard expression over a state's ``data`` (as the transition leaves it) and its
    ``status`` (before it), checked once here; ValueError saying what is not allowed.

    The language is a small part of Python's expressions, evaluated without ``eval``:
    literals, ``data.key`` and ``data["key"]`` (None when absent), indexes, ``and``,
    ``or``, ``not``, comparisons (``== != < <= > >= in not in``), ``+ - * /``, and
    ``len(...)``; arithmetic takes numbers only. An expression that fails on the data it
    gets (a comparison of None with a number, say) is false::

        paid = compile_guard("data.amount > 0 and data.currency in ['EUR', 'USD']")
        paid({"amount": 5, "currency": "EUR"}, "new")      # True
        paid({}, "new")                                    # False
    """
    if not isinstance(text, str) or not text.strip() or len(text) > _GUARD_LENGTH:
        raise ValueError(f"a guard is an expression of 1-{_GUARD_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"guard {text!r:.80}: {exc.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _GUARD_NODES):
            raise ValueError(f"guard {text!r:.80}: {type(node).__name__} is not allowed")
        if isinstance(node, ast.Name) and node.id not in ("data", "status", "len"):
            raise ValueError(f"guard {text!r:.80}: unknown name {node.id!r} (data, status, len)")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise ValueError(f"guard {text!r:.80}: {node.attr!r} is not allowed")
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id == "len" and len(node.args) == 1
        ):
            raise ValueError(f"guard {text!r:.80}: only len(x) may be called")
    body = tree.body

    def guard(data: Mapping[str, Any], status: str) -> bool:
        try:
            return bool(_evaluate(body, {"data": data, "status": status}))
        except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError):
            return False

    return guard


_GUARD_NODES = (
    ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd,
    ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Compare, ast.Eq, ast.NotEq, ast.Lt,
    ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Constant, ast.Name, ast.Load,
    ast.Attribute, ast.Subscript, ast.List, ast.Tuple, ast.Call,
)  # fmt: skip

_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_ARITHMETIC: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def _evaluate(node: ast.expr, names: dict[str, Any]) -> Any:
    """The value of a checked guard expression (see :func:`compile_guard`)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        container = _evaluate(node.value, names)
        return container.get(node.attr) if isinstance(container, Mapping) else None
    if isinstance(node, ast.Subscript):
        container, key = _evaluate(node.value, names), _evaluate(node.slice, names)
        if isinstance(container, Mapping):
            return container.get(key)
        return container[key] if isinstance(container, list | str) else None
    if isinstance(node, ast.BoolOp):
        values = (_evaluate(value, names) for value in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, names)
        if isinstance(node.op, ast.Not):
            return not operand
        return -operand if isinstance(node.op, ast.USub) else +operand
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, names), _evaluate(node.right, names)
        if not (isinstance(left, int | float) and isinstance(right, int | float)):
            raise TypeError("arithmetic on numbers only")  # no "x" * 10**12 from a client
        return _ARITHMETIC[type(node.op)](left, right)
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, names)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(comparator, names)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.List | ast.Tuple):
        return [_evaluate(item, names) for item in node.elts]
    if isinstance(node, ast.Call):
        return len(_evaluate(node.args[0], names))
    raise ValueError(f"{type(node).__name__} is not allowed")


_TRANSITION = re.compile(r"[a-z][a-z0-9_]{0,63}")
_STATE_ID = re.compile(r"[^\s*?\[\]]{1,200}")


def machine_from_table(state_type: str, table: dict[str, Any]) -> StateMachine:
    """The machine ``[managers.state.machines.<state_type>]`` declares; ValueError saying
    what is wrong (an unknown state, a missing ``initial``, a reserved name)::

        machine_from_table("Order", {"states": ["new", "paid"], "initial": "new",
                                     "transitions": {"pay": {"source": ["new"], "dest": "paid"}}})
    """
    if not _NAME.fullmatch(state_type):
        raise ValueError(f"a state type matches [A-Za-z][A-Za-z0-9_-]*, got {state_type!r:.70}")
    unknown = set(table) - {"states", "initial", "transitions"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}: states, initial, transitions")
    states = table.get("states")
    if (
        not isinstance(states, list)
        or not states
        or not all(isinstance(name, str) and _TRANSITION.fullmatch(name) for name in states)
    ):
        raise ValueError("states: a non-empty list of snake_case names")
    initial = table.get("initial")
    if not isinstance(initial, str) or initial not in states:
        raise ValueError(f"initial: one of the states {states}, got {initial!r:.70}")
    transitions = []
    declared = table.get("transitions", {})
    if not isinstance(declared, dict):
        raise ValueError("transitions: a table of name = { source = [...], dest = ... }")
    for name, rule in declared.items():
        where = f"transitions.{name}"
        if not _TRANSITION.fullmatch(name) or name in TRANSITION_RULES:
            raise ValueError(
                f"{where}: a snake_case name other than the standard {list(TRANSITION_RULES)}"
            )
        if not isinstance(rule, dict) or not {"source", "dest"} <= set(rule) <= {
            "source",
            "dest",
            "guard",
        }:
            raise ValueError(f"{where}: a table with source, dest and an optional guard")
        guard = rule.get("guard", "")
        if guard:
            try:
                compile_guard(guard)
            except ValueError as exc:
                raise ValueError(f"{where}.guard: {exc}") from None
        source = [rule["source"]] if isinstance(rule["source"], str) else rule["source"]
        if not isinstance(source, list) or not source:
            raise ValueError(f"{where}.source: a state, a list of states, or '*'")
        for state in source:
            if state != "*" and state not in states:
                raise ValueError(f"{where}.source: {state!r:.70} is not one of {states}")
        if rule["dest"] not in states:
            raise ValueError(f"{where}.dest: {rule['dest']!r:.70} is not one of {states}")
        transitions.append(
            StateMachineTransition(name=name, source=source, dest=rule["dest"], guard=guard)
        )
    return StateMachine(
        state_type=state_type, states=list(states), initial=initial, transitions=transitions
    )


def check_state_id(state_id: str, path: str = "state_id") -> None:
    """InvalidMessage at ``path`` unless ``state_id`` is 1-200 characters without
    whitespace or ``* ? [ ]``::

        check_state_id("order:{42}:items")
    """
    if not _STATE_ID.fullmatch(state_id):
        raise InvalidMessage(
            "a state id is 1-200 characters without whitespace or * ? [ ]", path=path
        )


def check_write(write: StateWrite) -> None:
    """Reject a malformed write with InvalidMessage naming the field (before any backend)."""
    check_state_id(write.state_id)
    if not _TRANSITION.fullmatch(write.transition):
        raise InvalidMessage(
            f"a transition is a snake_case name, got {write.transition!r:.70}", path="transition"
        )
    if write.transition == "create":
        if not _NAME.fullmatch(write.state_type):
            raise InvalidMessage(
                f"a state type matches [A-Za-z][A-Za-z0-9_-]*, got {write.state_type!r:.70}",
                path="state_type",
            )
        for i, name in enumerate(write.allowed_transitions or ()):
            if not _TRANSITION.fullmatch(name):
                raise InvalidMessage(
                    f"a transition is a snake_case name, got {name!r:.70}",
                    path=f"allowed_transitions[{i}]",
                )
    if write.expected_version is not None and write.expected_version < 0:
        raise InvalidMessage("expected_version must be >= 0", path="expected_version")
    if write.ttl is not None and not 0 < write.ttl <= MAX_TTL:
        raise InvalidMessage(
            f"ttl must be > 0 and <= {MAX_TTL:g} seconds, got {write.ttl}", path="ttl"
        )


def apply_transition(
    current: StateInfo | None,
    write: StateWrite,
    now_ms: int,
    machines: Mapping[str, StateMachine] | None = None,
    *,
    last_version: int = 0,
) -> StateInfo:
    """The state after ``write``, or NotFound / Conflict; the rules every backend follows.

    A state of a type with a declared machine in ``machines`` follows that machine's
    transitions; any other the standard ones. A removed state comes back with status
    ``deleted`` or ``expired``. The Redis backend's Lua script is generated from the
    same rules. A state created again under the id of a removed one goes on from that
    one's ``last_version``, so that no version of an id is ever reused::

        apply_transition(order, StateWrite(state_id="o1", transition="pay"), now_ms,
                         {"Order": order_machine})
    """
    transition = write.transition
    machines = machines or {}
    if current is None:
        if transition != "create":
            raise NotFound(f"no state {write.state_id!r}", {"state_id": write.state_id})
        if write.expected_version not in (None, 0):
            raise _version_conflict(write, 0)
        machine = machines.get(write.state_type)
        return StateInfo(
            state_id=write.state_id,
            state_type=write.state_type,
            status=TRANSITION_RULES["create"].target if machine is None else machine.initial,
            data=write.data if write.data is not None else {},
            version=last_version + 1,
            allowed_transitions=(
                machine.names()
                if machine is not None
                else list(write.allowed_transitions or STANDARD_TRANSITIONS)
            ),
            created_at=now_ms,
            updated_at=now_ms,
            expires_at=None if write.ttl is None else now_ms + int(write.ttl * 1000),
        )
    if transition == "create":
        raise Conflict(f"state {write.state_id!r} exists", {"state_id": write.state_id})
    if write.expected_version is not None and write.expected_version != current.version:
        raise _version_conflict(write, current.version)
    machine = machines.get(current.state_type)
    if machine is not None:
        found = machine.rules().get(transition)
        if found is None:
            raise undeclared_transition(write.state_id, transition, current.status, machine)
        rule = found
    else:
        if transition not in current.allowed_transitions and transition != "expire":
            raise Conflict(
                f"transition {transition!r} is not allowed for state {write.state_id!r}",
                {"state_id": write.state_id, "transition": transition,
                 "allowed": current.allowed_transitions},
            )  # fmt: skip
        rule = TRANSITION_RULES.get(transition, TransitionRule(frozenset(), KEEP))
    if rule.sources and current.status not in rule.sources:
        raise status_conflict(write.state_id, transition, current.status, rule.sources)
    if rule.target == REMOVE:
        status = "expired" if transition == "expire" else "deleted"
    else:
        status = current.status if rule.target == KEEP else rule.target
    expires_at = current.expires_at
    if write.ttl is not None:
        expires_at = now_ms + int(write.ttl * 1000)
    return msgspec.structs.replace(
        current,
        status=status,
        data=current.data if write.data is None else write.data,
        version=current.version + 1,
        updated_at=now_ms,
        expires_at=expires_at,
    )


def check_reads(reads: dict[str, int], current: Callable[[str], StateInfo | None]) -> None:
    """Conflict naming the first state of ``reads`` (id: version read, 0 for absent) that
    ``current`` (the state now, None when absent) shows at another version::

        check_reads({"a": 3}, lambda state_id: states.get(state_id))
    """
    for state_id, version in reads.items():
        state = current(state_id)
        actual = 0 if state is None else state.version
        if actual != version:
            raise read_conflict(state_id, version, actual)


def read_conflict(state_id: str, read_version: int, version: int) -> Conflict:
    """The error for a commit whose read set no longer holds: ``state_id`` was read at
    ``read_version`` (0: absent) and is at ``version`` now (0: absent)."""
    return Conflict(
        f"state {state_id!r} changed since the transaction read it "
        f"(read at version {read_version}, now {version}): a serializable commit "
        "needs every state it read unchanged",
        {"state_id": state_id, "read_version": read_version, "version": version},
    )


def undeclared_transition(
    state_id: str, transition: str, status: str, machine: StateMachine
) -> Conflict:
    """The error for a transition a state's machine does not declare."""
    allowed = machine.allowed_from(status)
    return Conflict(
        f"transition {transition!r} is not declared for {machine.state_type} states: "
        f"{state_id!r} is {status}, from where {', '.join(allowed)} may run",
        {"state_id": state_id, "transition": transition, "status": status, "allowed": allowed},
    )


def status_conflict(
    state_id: str, transition: str, status: str, sources: Collection[str]
) -> Conflict:
    """The error for a transition that cannot run from the state's current status."""
    ordered = sorted(sources)
    return Conflict(
        f"cannot {transition} state {state_id!r}: it is {status}, and {transition} runs "
        f"only from {', '.join(ordered)}",
        {"state_id": state_id, "transition": transition, "status": status, "sources": ordered},
    )


def guard_refused(
    state_id: str, transition: str, status: str, guard: str, machine: StateMachine
) -> Conflict:
    """The error for a transition whose guard does not hold for the state's data."""
    return Conflict(
        f"cannot {transition} state {state_id!r}: its guard does not hold ({guard})",
        {"state_id": state_id, "transition": transition, "status": status, "guard": guard,
         "allowed": machine.allowed_from(status)},
    )  # fmt: skip


def _version_conflict(write: StateWrite, actual: int) -> Conflict:
    return Conflict(
        f"state {write.state_id!r} is at version {actual}, not {write.expected_version}",
        {"state_id": write.state_id, "expected_version": write.expected_version,
         "version": actual},
    )  # fmt: skip
