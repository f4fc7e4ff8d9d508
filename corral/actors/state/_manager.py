"""The state actor: applies writes through its backend, then publishes the change.

Every change is published (through the system's bus) after Redis has applied
it; the event stream, written inside the same script, is the durable record.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Literal, TypeVar

import msgpack

from corral._statemachine import (
    apply_transition,
    check_state_id,
    check_write,
    compile_guard,
    guard_refused,
)
from corral._time import now_ms
from corral.actors.state._memory import Backend, memory_backend_for
from corral.actors.state._options import StateOptions
from corral.actors.state._redis import RedisBackend
from corral.actors.state._sessions import (
    SESSION_TYPE,
    USER_TYPE,
    check_user,
    envelope,
    generation_id,
    info_of,
    is_session_id,
    session_id,
    unknown,
)
from corral.errors import (
    BackendUnavailable,
    ConfigError,
    Conflict,
    CorralError,
    InvalidMessage,
    NotFound,
)
from corral.manager import Manager, handles
from corral.messages.session import (
    SessionCreate,
    SessionDestroy,
    SessionDestroyed,
    SessionDestroyUser,
    SessionGet,
    SessionInfo,
    SessionRotate,
    SessionSave,
    SessionsRevoked,
)
from corral.messages.state import (
    StateChanged,
    StateCommit,
    StateCommitted,
    StateDelete,
    StateExpired,
    StateExpireDue,
    StateGet,
    StateGetHistory,
    StateGetMachine,
    StateHistory,
    StateInfo,
    StateMachine,
    StateRegister,
    StateUpdate,
    StateWrite,
    changed_topic,
    entered_topic,
    exited_topic,
)
from corral.messages.system import Health
from corral.metrics import Counter

__all__ = ["StateManager"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_GUARD_ATTEMPTS = 3
"""Tries of a guarded write whose state changed between its guard's check and the write."""

_PUBLISH_DRAIN_TIMEOUT = 5.0


CHANGES = Counter("corral_state_changes_total", "State changes applied (creates, transitions, ...)")
PUBLISHED = Counter(
    "corral_state_events_published_total", "state.changed events published on the bus"
)
PUBLISH_ERRORS = Counter(
    "corral_state_publish_errors_total",
    "state.changed events the bus refused (the durable stream still has them)",
)


class StateManager(Manager[StateOptions]):
    """Handles ``state.*`` requests; publishes ``state.changed.<type>.<id>`` events."""

    name = "state"
    metric_families = (CHANGES, PUBLISHED, PUBLISH_ERRORS)

    def on_start(self) -> None:
        settings = self.options
        url = settings.redis_url or self.corral_context.redis_url
        kind = settings.backend
        if kind == "auto":
            kind = "redis" if url else "memory"
        self.backend: Backend
        self.machines = settings.state_machines()
        self.guards = {
            (state_type, transition.name): (transition.guard, compile_guard(transition.guard))
            for state_type, machine in self.machines.items()
            for transition in machine.transitions
            if transition.guard
        }
        """(state type, transition) -> its guard's text and the guard, for declared guards."""
        self.guarded = {transition for _type, transition in self.guards}
        if kind == "redis":
            if not url:
                raise ConfigError(
                    "managers.state.redis_url: the redis backend needs a URL "
                    "(set redis_url, or run the system's bus on Redis)"
                )
            self.backend = RedisBackend(
                url,
                namespace=self.corral_context.namespace,
                history_limit=settings.history_limit,
                stream_max_len=settings.stream_max_len,
                partitions=settings.partitions,
                wait_replicas=settings.wait_replicas,
                wait_timeout=settings.wait_timeout,
                signing_keys=self.corral_context.signing_keys,
                machines=self.machines,
                tombstone_ttl=settings.tombstone_ttl,
            )
            try:
                self.backend.record_partitions()
            except BackendUnavailable as exc:  # Redis away: recorded with the first write
                log.warning("state: %s", exc)
        else:  # the system's: a restarted actor finds its states again
            self.backend = memory_backend_for(
                self.router,
                self.corral_context.name,
                history_limit=settings.history_limit,
                machines=self.machines,
                tombstone_ttl=settings.tombstone_ttl,
            )
        # Publishing waits on the bus (a Redis round trip): a thread of its own does it,
        # in order, so the mailbox moves on as soon as the change is applied.
        self._outbox: queue.SimpleQueue[StateChanged | None] = queue.SimpleQueue()
        self._publisher = threading.Thread(
            target=self._publish_loop, name=f"corral-state-publish:{self.corral_context.name}",
            daemon=True,
        )  # fmt: skip
        self._publisher.start()
        self.last_backend_error = ""
        self.every(self.options.expiry_interval, self._expire_due)

    def on_stop(self) -> None:
        self._outbox.put(None)
        self._publisher.join(_PUBLISH_DRAIN_TIMEOUT)
        self.backend.close()

    def health(self) -> Health:
        details = {"backend": self.backend.name}
        counted = self.corral_metrics
        metrics = {
            "changes": int(counted.value(CHANGES)),
            "published": int(counted.value(PUBLISHED)),
            "publish_errors": int(counted.value(PUBLISH_ERRORS)),
        }
        if self.last_backend_error:
            details["last_backend_error"] = self.last_backend_error
        status: Literal["healthy", "degraded"] = (
            "degraded" if self.last_backend_error else "healthy"
        )
        return Health(status=status, details=details, metrics=metrics)

    # -- requests ---------------------------------------------------------------------

    @handles(StateRegister)
    def register(self, msg: StateRegister) -> StateInfo:
        return self._apply_one(
            StateWrite(
                state_id=msg.state_id,
                transition="create",
                state_type=msg.state_type,
                data=msg.data,
                ttl=msg.ttl,
                allowed_transitions=msg.allowed_transitions,
            )
        )

    @handles(StateUpdate)
    def update(self, msg: StateUpdate) -> StateInfo:
        if msg.transition == "create":
            raise InvalidMessage("create a state with state.register", path="transition")
        return self._apply_one(
            StateWrite(
                state_id=msg.state_id,
                transition=msg.transition,
                data=msg.data,
                expected_version=msg.expected_version,
                ttl=msg.ttl,
            )
        )

    @handles(StateDelete)
    def delete(self, msg: StateDelete) -> StateInfo:
        return self._apply_one(
            StateWrite(
                state_id=msg.state_id, transition="delete", expected_version=msg.expected_version
            )
        )

    @handles(StateGet)
    def get(self, msg: StateGet) -> StateInfo:
        return self._backend_call(lambda: self.backend.get(msg.state_id, now_ms()))

    @handles(StateGetHistory)
    def get_history(self, msg: StateGetHistory) -> StateHistory:
        if msg.limit < 1:
            raise InvalidMessage("limit must be >= 1", path="limit")
        limit = min(msg.limit, self.options.history_limit)
        entries = self._backend_call(lambda: self.backend.history(msg.state_id, limit))
        return StateHistory(state_id=msg.state_id, entries=entries)

    @handles(StateGetMachine)
    def get_machine(self, msg: StateGetMachine) -> StateMachine:
        machine = self.machines.get(msg.state_type)
        if machine is None:
            raise NotFound(
                f"no state machine is declared for {msg.state_type!r:.70}",
                {"state_type": msg.state_type},
            )
        return machine

    @handles(StateCommit)
    def commit(self, msg: StateCommit) -> StateCommitted:
        if not msg.writes and not msg.reads:
            return StateCommitted(states=[])
        if len(msg.writes) > self.options.max_writes:
            raise InvalidMessage(
                f"{len(msg.writes)} writes, over the limit of {self.options.max_writes}",
                path="writes",
            )
        for i, write in enumerate(msg.writes):
            self._check(write, f"writes[{i}].")
        if len(msg.reads) > self.options.max_writes:
            raise InvalidMessage(
                f"{len(msg.reads)} reads, over the limit of {self.options.max_writes}",
                path="reads",
            )
        for state_id in msg.reads:
            check_state_id(state_id, path=f"reads.{state_id:.70}")
        return StateCommitted(states=self._apply(msg.writes, msg.reads))

    @handles(StateExpireDue)
    def expire_due(self, _msg: StateExpireDue) -> StateExpired:
        return StateExpired(state_ids=[e.state_id for e in self._expire_due()])

    # -- sessions (corral.messages.session) -------------------------------------------

    @handles(SessionCreate)
    def session_create(self, msg: SessionCreate) -> SessionInfo:
        check_user(msg.user)
        generation = self._generation(msg.user)[0] if msg.user else 0
        created = self._apply_one(
            StateWrite(
                state_id=session_id(msg.user),
                transition="create",
                state_type=SESSION_TYPE,
                data=envelope(msg.user, generation, msg.ttl, msg.data),
                ttl=msg.ttl,
            )
        )
        return info_of(created)

    @handles(SessionGet)
    def session_get(self, msg: SessionGet) -> SessionInfo:
        state = self._session(msg.session_id)
        ttl = state.data["ttl"]
        if msg.touch and (state.expires_at or 0) - now_ms() < ttl * 500:  # half its ttl left
            state = self._apply_one(
                StateWrite(state_id=state.state_id, transition="update", ttl=ttl)
            )
        return info_of(state)

    @handles(SessionSave)
    def session_save(self, msg: SessionSave) -> SessionInfo:
        state = self._session(msg.session_id)
        held = state.data
        saved = self._apply_one(
            StateWrite(
                state_id=state.state_id,
                transition="update",
                data=envelope(held["user"], held["generation"], held["ttl"], msg.data),
                ttl=held["ttl"],
                expected_version=msg.expected_version,
            )
        )
        return info_of(saved)

    @handles(SessionRotate)
    def session_rotate(self, msg: SessionRotate) -> SessionInfo:
        state = self._session(msg.session_id)
        held = state.data
        user = held["user"] if msg.user is None else msg.user
        check_user(user)
        generation = held["generation"] if user == held["user"] else self._generation(user)[0]
        create = StateWrite(
            state_id=session_id(user),
            transition="create",
            state_type=SESSION_TYPE,
            data=envelope(user, generation, held["ttl"], held["data"]),
            ttl=held["ttl"],
        )
        delete = StateWrite(
            state_id=state.state_id, transition="delete", expected_version=state.version
        )
        if user and user == held["user"]:  # one partition (the user's): one commit
            return info_of(self._apply([create, delete])[0])
        created = self._apply_one(create)
        self._apply_one(delete)
        return info_of(created)

    @handles(SessionDestroy)
    def session_destroy(self, msg: SessionDestroy) -> SessionDestroyed:
        if not is_session_id(msg.session_id):
            return SessionDestroyed(destroyed=False)
        try:
            self._apply_one(StateWrite(state_id=msg.session_id, transition="delete"))
        except NotFound:
            return SessionDestroyed(destroyed=False)
        return SessionDestroyed(destroyed=True)

    @handles(SessionDestroyUser)
    def session_destroy_user(self, msg: SessionDestroyUser) -> SessionsRevoked:
        check_user(msg.user)
        for _attempt in range(_GUARD_ATTEMPTS):
            generation, version = self._generation(msg.user)
            write = StateWrite(
                state_id=generation_id(msg.user),
                transition="create" if version == 0 else "update",
                state_type=USER_TYPE,
                data={"user": msg.user, "generation": generation + 1},
                expected_version=version,
            )
            try:
                self._apply_one(write)
            except Conflict:  # another daemon ended them meanwhile: count on from there
                continue
            return SessionsRevoked(user=msg.user, generation=generation + 1)
        raise Conflict(
            f"the sessions of {msg.user!r:.80} are being ended elsewhere: try again",
            {"user": msg.user[:80]},
        )

    def _session(self, text: str) -> StateInfo:
        """The live session ``text`` names; NotFound when there is none, when it is not a
        session id, or when its user's sessions were ended since it began (it goes)."""
        if not is_session_id(text):
            raise unknown(text)
        try:
            state = self._backend_call(lambda: self.backend.get(text, now_ms()))
        except NotFound:
            raise unknown(text) from None
        if state.state_type != SESSION_TYPE:
            raise unknown(text)
        user = state.data["user"]
        if user and state.data["generation"] != self._generation(user)[0]:
            with contextlib.suppress(CorralError):
                self._apply_one(StateWrite(state_id=text, transition="delete"))
            raise unknown(text)
        return state

    def _generation(self, user: str) -> tuple[int, int]:
        """``user``'s session generation and the version of the state holding it (0, 0
        before the first time their sessions were all ended)."""
        try:
            state = self._backend_call(lambda: self.backend.get(generation_id(user), now_ms()))
        except NotFound:
            return 0, 0
        return int(state.data["generation"]), state.version

    # -- internals --------------------------------------------------------------------

    def _apply_one(self, write: StateWrite) -> StateInfo:
        self._check(write, "")
        for attempt in range(_GUARD_ATTEMPTS):
            try:
                return self._apply([write])[0]
            except Conflict as exc:
                # A guard was checked on data that changed before the write: check again.
                changed = "read_version" in exc.details and write.transition in self.guarded
                if not changed or attempt == _GUARD_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _apply(
        self, writes: list[StateWrite], reads: dict[str, int] | None = None
    ) -> list[StateInfo]:
        reads = dict(reads or {})
        if self.guarded.intersection(write.transition for write in writes):
            self._check_guards(writes, reads)
        events, states = self._backend_call(lambda: self.backend.apply(writes, now_ms(), reads))
        self._publish(events)
        return states

    def _check_guards(self, writes: list[StateWrite], reads: dict[str, int]) -> None:
        """Refuse a write whose transition's guard does not hold for the data it leaves (the
        writes before it in ``writes`` applied); the states checked join ``reads``, so that
        the backend refuses the change if one of them changed meanwhile."""
        now = now_ms()
        overlay: dict[str, StateInfo | None] = {}
        for write in writes:
            state_id = write.state_id
            current = overlay[state_id] if state_id in overlay else self._stored(state_id, now)
            if current is not None:
                found = self.guards.get((current.state_type, write.transition))
                if found is not None:
                    text, guard = found
                    data = current.data if write.data is None else write.data
                    if not guard(data, current.status):
                        machine = self.machines[current.state_type]
                        raise guard_refused(
                            state_id, write.transition, current.status, text, machine
                        )
                if state_id not in overlay:
                    reads.setdefault(state_id, current.version)
            try:
                after = apply_transition(current, write, now, self.machines)
            except CorralError:
                return  # the backend refuses it, with this error
            overlay[state_id] = None if after.status in ("deleted", "expired") else after

    def _stored(self, state_id: str, now: int) -> StateInfo | None:
        try:
            return self._backend_call(lambda: self.backend.get(state_id, now))
        except NotFound:
            return None

    def _check(self, write: StateWrite, path: str) -> None:
        try:
            check_write(write)
            if write.allowed_transitions is not None and write.state_type in self.machines:
                raise InvalidMessage(
                    f"{write.state_type} states follow their declared machine: its "
                    "transitions are theirs, not allowed_transitions",
                    path="allowed_transitions",
                )
            if write.data is not None:
                try:
                    size = len(msgpack.packb(write.data, use_bin_type=True))
                except (OverflowError, TypeError, ValueError) as exc:
                    raise InvalidMessage(f"data cannot be stored: {exc}", path="data") from None
                if size > self.options.max_data_bytes:
                    raise InvalidMessage(
                        f"data is {size} bytes packed, over the limit of "
                        f"{self.options.max_data_bytes}",
                        path="data",
                    )
        except InvalidMessage as exc:
            raise InvalidMessage(exc.message, path=path + exc.path) from None

    def _backend_call(self, action: Callable[[], T]) -> T:
        try:
            result = action()
        except BackendUnavailable as exc:
            self.last_backend_error = exc.message
            raise
        self.last_backend_error = ""
        return result

    def _publish(self, events: list[StateChanged]) -> None:
        self.corral_metrics.add(CHANGES, by=len(events))
        for event in events:
            self._outbox.put(event)

    def _publish_loop(self) -> None:
        while (event := self._outbox.get()) is not None:
            try:
                self.router.publish(changed_topic(event.state_type, event.state_id), event)
                self.corral_metrics.add(PUBLISHED)
                if event.state_type in self.machines and event.previous_status != event.status:
                    if event.previous_status:
                        self.router.publish(
                            exited_topic(event.state_type, event.previous_status), event
                        )
                    if event.status not in ("deleted", "expired"):
                        self.router.publish(entered_topic(event.state_type, event.status), event)
            except CorralError as exc:  # applied already; the event stream keeps it
                self.corral_metrics.add(PUBLISH_ERRORS)
                log.warning("state: could not publish %s of %s: %s", event.transition,
                            event.state_id, exc)  # fmt: skip

    def _expire_due(self) -> list[StateChanged]:
        events = self._backend_call(lambda: self.backend.expire_due(now_ms()))
        self._publish(events)
        return events
