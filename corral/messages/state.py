"""Messages of the ``state`` manager: typed states, transitions, history and change events.

A state has an id, a type (``System``, ``User``, ``Session``, ``Resource``,
``Feature``, ``Subscription`` or a custom name), a data map, a version, a status,
the transitions it allows and an optional TTL. Every change is a transition,
checked against :data:`TRANSITION_RULES` and the state's allowed transitions, and
emits :class:`StateChanged` on ``state.changed.<state_type>.<state_id>``::

    info = system.ask(StateRegister(state_id="u1", state_type="User", data={"n": 1}))
    info = system.ask(
        StateUpdate(state_id="u1", data={"n": 2}, expected_version=info.version)
    )
    system.ask(StateUpdate(state_id="u1", transition="suspend"))

The rules live here, as data, so that every backend (the memory backend, the
Redis Lua script generated from them, a transaction's read-your-writes overlay)
applies the same ones: :func:`apply_transition`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Collection, Mapping
from typing import Annotated, Any

from corral.errors import Conflict, InvalidMessage, NotFound
from corral.messages.base import MAX_TTL, Event, Offset, Range, Reply, Request, Ttl, message

__all__ = [
    "DEFAULT_PARTITIONS",
    "KEEP",
    "MACHINE_STANDARD_TRANSITIONS",
    "MAX_PARTITIONS",
    "REMOVE",
    "STANDARD_TRANSITIONS",
    "STATE_TYPES",
    "TRANSITION_RULES",
    "StateChanged",
    "StateCommit",
    "StateCommitted",
    "StateDelete",
    "StateExpireDue",
    "StateExpired",
    "StateGet",
    "StateGetHistory",
    "StateGetMachine",
    "StateHistory",
    "StateInfo",
    "StateMachine",
    "StateMachineTransition",
    "StateRegister",
    "StateTransition",
    "StateType",
    "StateUpdate",
    "StateWrite",
    "TransitionRule",
    "apply_transition",
    "changed_topic",
    "check_reads",
    "check_state_id",
    "check_write",
    "machine_from_table",
    "read_conflict",
    "status_conflict",
    "undeclared_transition",
]


class StateType(enum.StrEnum):
    """The design documents' state types; their values are the ``state_type`` strings (the
    codec takes plain ``str`` fields, so pass ``.value``)::

    StateRegister(state_id="s1", state_type=StateType.SESSION.value)
    """

    SYSTEM = "System"
    USER = "User"
    SESSION = "Session"
    RESOURCE = "Resource"
    FEATURE = "Feature"
    SUBSCRIPTION = "Subscription"


STATE_TYPES = tuple(StateType)
"""The seeds' state types; any other name matching ``[A-Za-z][A-Za-z0-9_-]*`` is a custom type."""

KEEP = "="
"""A rule's target meaning: the status does not change."""
REMOVE = "-"
"""A rule's target meaning: the state is removed."""


@dataclasses.dataclass(frozen=True)
class TransitionRule:
    """From which statuses a transition may run (empty: any) and the status it leads to."""

    sources: frozenset[str]
    target: str


TRANSITION_RULES: dict[str, TransitionRule] = {
    "create": TransitionRule(frozenset(), "active"),
    "update": TransitionRule(frozenset({"active", "inactive"}), KEEP),
    "activate": TransitionRule(frozenset({"inactive"}), "active"),
    "deactivate": TransitionRule(frozenset({"active"}), "inactive"),
    "suspend": TransitionRule(frozenset({"active", "inactive"}), "suspended"),
    "resume": TransitionRule(frozenset({"suspended"}), "active"),
    "delete": TransitionRule(frozenset(), REMOVE),
    "expire": TransitionRule(frozenset(), REMOVE),
}
"""The standard transitions. ``create`` needs an absent state, every other one an
existing state; a custom transition (any other name) keeps the status, from any status."""


class StateTransition(enum.StrEnum):
    """The standard transitions by name; their values are the ``transition`` strings::

    StateUpdate(state_id="s1", transition=StateTransition.SUSPEND.value)
    """

    CREATE = "create"
    UPDATE = "update"
    ACTIVATE = "activate"
    DEACTIVATE = "deactivate"
    SUSPEND = "suspend"
    RESUME = "resume"
    DELETE = "delete"
    EXPIRE = "expire"


STANDARD_TRANSITIONS = tuple(TRANSITION_RULES)
"""What a state allows when registered without ``allowed_transitions``."""

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_TRANSITION = re.compile(r"[a-z][a-z0-9_]{0,63}")
_STATE_ID = re.compile(r"[^\s*?\[\]]{1,200}")


MAX_PARTITIONS = 1024
"""The most partitions the states of a namespace can be spread over."""
DEFAULT_PARTITIONS = 16
"""How many partitions, unless ``[managers.state] partitions`` says otherwise."""

Partition = Annotated[int, Range(ge=0, le=MAX_PARTITIONS - 1)]


def changed_topic(state_type: str = "*", state_id: str = "*") -> str:
    """The topic of a state's change events; the defaults make a pattern for all of them."""
    return f"state.changed.{state_type}.{state_id}"


@message("state.info")
class StateInfo(Reply):
    """A state as stored. Timestamps are unix milliseconds; ``status`` is ``active``,
    ``inactive``, ``suspended``, or ``deleted`` / ``expired`` for a state just removed."""

    state_id: str
    state_type: str
    status: str
    data: dict[str, Any]
    version: Offset
    allowed_transitions: list[str]
    created_at: int
    updated_at: int
    expires_at: int | None = None


@message("state.changed")
class StateChanged(Event):
    """One change of one state: published on ``state.changed.<state_type>.<state_id>``.

    ``old``/``new`` are the data before and after (None before ``create`` and after a
    removal); ``offset`` and ``epoch`` place the event in the durable event stream of
    its ``partition`` (resume a subscription from there); ``ts`` is unix milliseconds.
    """

    state_id: str
    state_type: str
    transition: str
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    version: Offset
    offset: Offset
    epoch: str
    ts: int
    status: str = ""
    partition: Partition = 0


@message("state.write")
class StateWrite(Reply):
    """One change to apply: what StateRegister/Update/Delete ask for, and what a
    transaction buffers and commits. ``data`` None keeps the data; ``ttl`` (seconds, at
    most ten years) sets a new expiry; ``state_type`` and ``allowed_transitions`` count
    for ``create``."""

    state_id: str
    transition: str
    state_type: str = ""
    data: dict[str, Any] | None = None
    expected_version: Offset | None = None
    ttl: Ttl | None = None
    allowed_transitions: list[str] | None = None


@message("state.register")
class StateRegister(Request[StateInfo]):
    """Create a state (transition ``create``); Conflict if it exists.

    ``allowed_transitions`` defaults to the standard ones; list custom names here to
    allow them. With ``ttl`` (seconds) the state expires, emitting ``expire``.
    """

    manager = "state"
    state_id: str
    state_type: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    allowed_transitions: list[str] | None = None
    ttl: Ttl | None = None


@message("state.get", idempotent=True)
class StateGet(Request[StateInfo]):
    """The current state; NotFound if there is none (or it has expired)."""

    manager = "state"
    state_id: str


@message("state.update")
class StateUpdate(Request[StateInfo]):
    """Run ``transition`` (default ``update``) on a state, replacing its data when given.

    Conflict when the transition is not allowed or ``expected_version`` is not current.
    ``ttl`` (seconds) restarts the state's expiry.
    """

    manager = "state"
    state_id: str
    transition: str = "update"
    data: dict[str, Any] | None = None
    expected_version: Offset | None = None
    ttl: Ttl | None = None


@message("state.delete")
class StateDelete(Request[StateInfo]):
    """Remove a state (transition ``delete``); answers its last form, status ``deleted``."""

    manager = "state"
    state_id: str
    expected_version: Offset | None = None


@message("state.history")
class StateHistory(Reply):
    """A state's latest changes, oldest first (at most the manager's ``history_limit``)."""

    state_id: str
    entries: list[StateChanged]


@message("state.get_history", idempotent=True)
class StateGetHistory(Request[StateHistory]):
    """The latest ``limit`` changes of a state; NotFound when it has no history."""

    manager = "state"
    state_id: str
    limit: Annotated[int, Range(ge=1)] = 100


@message("state.committed")
class StateCommitted(Reply):
    """The states after a commit, one per write, in the order of the writes."""

    states: list[StateInfo]


@message("state.commit")
class StateCommit(Request[StateCommitted]):
    """Apply several writes all or nothing: every transition and expected version is
    checked first, then all apply at once and their events follow. Sent by the
    ``transaction`` manager; usable directly for a one-shot multi-state change.

    ``reads`` names states the commit depends on without writing them, each with the
    version it was read at (0: it was absent); one at another version now refuses the
    whole commit with Conflict naming it (a serializable transaction's read set)::

        StateCommit(writes=[StateWrite(state_id="b", transition="update", data={"n": 2})],
                    reads={"a": 3})
    """

    manager = "state"
    writes: list[StateWrite]
    transaction_id: str = ""
    reads: dict[str, Offset] = dataclasses.field(default_factory=dict)


@message("state.expired", internal=True)
class StateExpired(Reply):
    """The states an expiry sweep removed (each also emitted ``expire``)."""

    state_ids: list[str]


@message("state.expire_due", internal=True)
class StateExpireDue(Request[StateExpired]):
    """Expire the states whose TTL has passed, now. The manager sends itself this every
    ``expiry_interval`` seconds; reads never see an expired state meanwhile."""

    manager = "state"


@message("state.machine_transition")
class StateMachineTransition(Reply):
    """One declared transition: from any of ``source`` (``["*"]``: from any state) to ``dest``."""

    name: str
    source: list[str]
    dest: str


@message("state.machine")
class StateMachine(Reply):
    """The state machine declared for one state type: its states (the statuses its states
    may have), the ``initial`` one (a created state's status) and its transitions. Besides
    them, ``update`` (data only), ``delete`` and ``expire`` run from any state::

        machine = machine_from_table("Order", {
            "states": ["created", "paid"], "initial": "created",
            "transitions": {"pay": {"source": ["created"], "dest": "paid"}}})
        machine.allowed_from("created")        # ['update', 'delete', 'pay']
    """

    state_type: str
    states: list[str]
    initial: str
    transitions: list[StateMachineTransition]

    def rules(self) -> dict[str, TransitionRule]:
        """Every transition a state of this type may run, as the backends check them."""
        rules = {name: TRANSITION_RULES[name] for name in MACHINE_STANDARD_TRANSITIONS}
        rules["update"] = TransitionRule(frozenset(), KEEP)
        for transition in self.transitions:
            sources = frozenset() if "*" in transition.source else frozenset(transition.source)
            rules[transition.name] = TransitionRule(sources, transition.dest)
        return rules

    def names(self) -> list[str]:
        """The transitions this machine allows (from some state): its ``allowed_transitions``."""
        return ["update", "delete", *(t.name for t in self.transitions)]

    def allowed_from(self, status: str) -> list[str]:
        """The transitions that may run from ``status``."""
        return [
            name
            for name, rule in self.rules().items()
            if name != "expire" and (not rule.sources or status in rule.sources)
        ]


MACHINE_STANDARD_TRANSITIONS = ("delete", "expire")
"""Standard transitions a declared machine keeps as they are (``update`` keeps the status)."""


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
        if not isinstance(rule, dict) or set(rule) != {"source", "dest"}:
            raise ValueError(f"{where}: a table with source and dest")
        source = [rule["source"]] if isinstance(rule["source"], str) else rule["source"]
        if not isinstance(source, list) or not source:
            raise ValueError(f"{where}.source: a state, a list of states, or '*'")
        for state in source:
            if state != "*" and state not in states:
                raise ValueError(f"{where}.source: {state!r:.70} is not one of {states}")
        if rule["dest"] not in states:
            raise ValueError(f"{where}.dest: {rule['dest']!r:.70} is not one of {states}")
        transitions.append(StateMachineTransition(name=name, source=source, dest=rule["dest"]))
    return StateMachine(
        state_type=state_type, states=list(states), initial=initial, transitions=transitions
    )


@message("state.get_machine", idempotent=True)
class StateGetMachine(Request[StateMachine]):
    """The state machine declared for ``state_type``; NotFound when it has none."""

    manager = "state"
    state_type: str


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
) -> StateInfo:
    """The state after ``write``, or NotFound / Conflict; the rules every backend follows.

    A state of a type with a declared machine in ``machines`` follows that machine's
    transitions; any other the standard ones. A removed state comes back with status
    ``deleted`` or ``expired``. The Redis backend's Lua script is generated from the
    same rules::

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
            version=1,
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
    return dataclasses.replace(
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


def _version_conflict(write: StateWrite, actual: int) -> Conflict:
    return Conflict(
        f"state {write.state_id!r} is at version {actual}, not {write.expected_version}",
        {"state_id": write.state_id, "expected_version": write.expected_version,
         "version": actual},
    )  # fmt: skip
