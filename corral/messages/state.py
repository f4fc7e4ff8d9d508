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

The rules live here, as data (:data:`TRANSITION_RULES`, :class:`StateMachine`), so
that every backend (the memory backend, the Redis Lua script generated from them, a
transaction's read-your-writes overlay) applies the same ones, through
``corral._statemachine.apply_transition``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Annotated, Any

import msgspec

from corral.messages.base import Event, Offset, Range, Reply, Request, Ttl, message

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
    "StateFind",
    "StateFound",
    "StateGet",
    "StateGetHistory",
    "StateGetMachine",
    "StateHistory",
    "StateInfo",
    "StateMachine",
    "StateMachineTransition",
    "StateReencrypt",
    "StateReencrypted",
    "StateRegister",
    "StateTransition",
    "StateType",
    "StateUpdate",
    "StateWrite",
    "TransitionRule",
    "changed_topic",
    "entered_topic",
    "exited_topic",
]


class StateType(enum.StrEnum):
    """The standard state types; their values are the ``state_type`` strings (the
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
"""The standard state types; any other name matching ``[A-Za-z][A-Za-z0-9_-]*`` is a custom
type."""

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

MAX_PARTITIONS = 1024
"""The most partitions the states of a namespace can be spread over."""
DEFAULT_PARTITIONS = 16
"""How many partitions, unless ``[managers.state] partitions`` says otherwise."""

Partition = Annotated[int, Range(ge=0, le=MAX_PARTITIONS - 1)]


def entered_topic(state_type: str = "*", status: str = "*") -> str:
    """Where a state of a declared machine's type is announced as it enters ``status``
    (the :class:`StateChanged` of the transition)."""
    return f"state.entered.{state_type}.{status}"


def exited_topic(state_type: str = "*", status: str = "*") -> str:
    """Where a state of a declared machine's type is announced as it leaves ``status``."""
    return f"state.exited.{state_type}.{status}"


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
    previous_status: str = ""
    """The status before the change ("" for a create)."""


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
    data: dict[str, Any] = msgspec.field(default_factory=dict)
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
    reads: dict[str, Offset] = msgspec.field(default_factory=dict)


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
    """One declared transition: from any of ``source`` (``["*"]``: from any state) to
    ``dest``, when its ``guard`` (an expression over the state's data, empty: none) holds."""

    name: str
    source: list[str]
    dest: str
    guard: str = ""


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


@message("state.get_machine", idempotent=True)
class StateGetMachine(Request[StateMachine]):
    """The state machine declared for ``state_type``; NotFound when it has none."""

    manager = "state"
    state_type: str


@message("state.found")
class StateFound(Reply):
    states: list[StateInfo]


@message("state.find", idempotent=True)
class StateFind(Request[StateFound]):
    """The states of ``state_type`` whose searchable encrypted ``field`` holds ``value``
    (``[managers.state] searchable_fields``), found by search token, without plaintext."""

    manager = "state"
    state_type: str
    field: str
    value: Any


@message("state.reencrypted")
class StateReencrypted(Reply):
    written: Offset


@message("state.reencrypt")
class StateReencrypt(Request[StateReencrypted]):
    """Write again, under the first encryption key, the encrypted fields of the states of
    ``state_type`` held under an older one (after a new key was put first)."""

    manager = "state"
    state_type: str
