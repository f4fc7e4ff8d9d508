"""The state backends' common interface, and the in-process memory backend.

::

    backend = MemoryBackend(history_limit=100)
    events, states = backend.apply([StateWrite(state_id="a", transition="create",
                                               state_type="User")], now_ms=now())

A state manager's memory backend belongs to its system, not to its actor: a restarted
actor gets the states back from :func:`memory_backend_for`.
"""

from __future__ import annotations

import collections
import threading
import uuid
import weakref
from typing import Protocol

from corral._statemachine import apply_transition, check_reads
from corral.errors import NotFound
from corral.messages.state import StateChanged, StateInfo, StateMachine, StateWrite

__all__ = ["Backend", "MemoryBackend", "memory_backend_for", "new_epoch"]


def new_epoch() -> str:
    """A fresh epoch: names one life of an event stream (offsets restart with it)."""
    return uuid.uuid4().hex[:12]


class Backend(Protocol):
    """Where states live. Every method raises NotFound / Conflict / BackendUnavailable."""

    name: str

    def apply(
        self, writes: list[StateWrite], now_ms: int, reads: dict[str, int] | None = None
    ) -> tuple[list[StateChanged], list[StateInfo]]:
        """Check every read (state id: version read, 0 for absent) and every write, then
        apply them all; the events (in order) and each write's resulting state. States
        past their expiry are expired first."""
        ...

    def get(self, state_id: str, now_ms: int) -> StateInfo: ...

    def history(self, state_id: str, limit: int) -> list[StateChanged]: ...

    def expire_due(self, now_ms: int) -> list[StateChanged]:
        """Expire the states whose TTL has passed; their ``expire`` events."""
        ...

    def close(self) -> None: ...


_BACKENDS: weakref.WeakKeyDictionary[object, dict[str, MemoryBackend]] = weakref.WeakKeyDictionary()
_BACKENDS_LOCK = threading.Lock()


def memory_backend_for(
    system: object,
    manager: str,
    *,
    history_limit: int,
    machines: dict[str, StateMachine] | None = None,
    tombstone_ttl: float = 30 * 86_400.0,
) -> MemoryBackend:
    """The memory backend of the state manager named ``manager`` in ``system`` (its
    router): made by the first actor, found again by each one restarted after it, gone
    with the system::

        backend = memory_backend_for(self.router, self.corral_context.name, history_limit=100)
    """
    with _BACKENDS_LOCK:
        backends = _BACKENDS.setdefault(system, {})
        backend = backends.get(manager)
        if backend is None:
            backend = backends[manager] = MemoryBackend(history_limit=history_limit)
        backend.machines = machines or {}
        backend.tombstone_ms = int(tombstone_ttl * 1000)
        return backend


class MemoryBackend:
    """States in a dict of this process; events get offsets of a per-process epoch.

    A deleted or expired state takes its history with it, as on Redis, and leaves its last
    version for ``tombstone_ms``: a state created again under the same id starts a new
    history, at the version after it. Each call holds a lock:
    an actor replaced while it hung may still be in one when its successor starts.
    """

    name = "memory"

    def __init__(self, *, history_limit: int) -> None:
        self.history_limit = history_limit
        self.states: dict[str, StateInfo] = {}
        self.histories: dict[str, collections.deque[StateChanged]] = {}
        self.epoch = new_epoch()
        self.offset = 0
        self.lock = threading.Lock()
        self.machines: dict[str, StateMachine] = {}
        """Declared state machines by state type: set by the state manager."""
        self.tombstone_ms = 30 * 86_400_000
        self.tombstones: dict[str, tuple[int, int]] = {}
        """A removed state's id -> (its last version, until when it is kept, unix ms)."""

    def apply(
        self, writes: list[StateWrite], now_ms: int, reads: dict[str, int] | None = None
    ) -> tuple[list[StateChanged], list[StateInfo]]:
        with self.lock:
            return self._apply(writes, now_ms, reads or {})

    def _apply(
        self, writes: list[StateWrite], now_ms: int, reads: dict[str, int]
    ) -> tuple[list[StateChanged], list[StateInfo]]:
        check_reads(reads, lambda state_id: self._live(state_id, now_ms))
        events = self._expire([w.state_id for w in writes], now_ms)
        overlay: dict[str, StateInfo | None] = {}
        changes: list[tuple[StateInfo | None, StateWrite, StateInfo]] = []
        removed: dict[str, int] = {}  # removed in this batch: id -> last version
        for write in writes:
            current = overlay.get(write.state_id, self.states.get(write.state_id))
            last = removed.get(write.state_id) or self._last(write, now_ms)
            after = apply_transition(current, write, now_ms, self.machines, last_version=last)
            gone = write.transition in ("delete", "expire")
            if gone:
                removed[write.state_id] = after.version
            overlay[write.state_id] = None if gone else after
            changes.append((current, write, after))
        for current, write, after in changes:
            events.append(self._record(current, write.transition, after, now_ms))
        return events, [after for _, _, after in changes]

    def _last(self, write: StateWrite, now_ms: int) -> int:
        """The version a removed state of ``write``'s id had, for a create; else 0."""
        if write.transition != "create":
            return 0
        version, until = self.tombstones.get(write.state_id, (0, 0))
        return version if until > now_ms else 0

    def get(self, state_id: str, now_ms: int) -> StateInfo:
        with self.lock:
            state = self._live(state_id, now_ms)
        if state is None:
            raise NotFound(f"no state {state_id!r}", {"state_id": state_id})
        return state

    def _live(self, state_id: str, now_ms: int) -> StateInfo | None:
        """The state, unless absent or past its expiry."""
        state = self.states.get(state_id)
        if state is None or (state.expires_at is not None and state.expires_at <= now_ms):
            return None
        return state

    def history(self, state_id: str, limit: int) -> list[StateChanged]:
        with self.lock:
            entries = list(self.histories.get(state_id, ()))
        if not entries:
            raise NotFound(f"no history of state {state_id!r}", {"state_id": state_id})
        return entries[-limit:]

    def expire_due(self, now_ms: int) -> list[StateChanged]:
        with self.lock:
            for state_id, (_version, until) in list(self.tombstones.items()):
                if until <= now_ms:
                    del self.tombstones[state_id]
            return self._expire(list(self.states), now_ms)

    def close(self) -> None:
        """Nothing to release: the states outlive the actor, and go with the system."""

    def _expire(self, state_ids: list[str], now_ms: int) -> list[StateChanged]:
        events = []
        for state_id in dict.fromkeys(state_ids):
            state = self.states.get(state_id)
            if state is not None and state.expires_at is not None and state.expires_at <= now_ms:
                write = StateWrite(state_id=state_id, transition="expire")
                after = apply_transition(state, write, now_ms)
                events.append(self._record(state, "expire", after, now_ms))
        return events

    def _record(
        self, before: StateInfo | None, transition: str, after: StateInfo, now_ms: int
    ) -> StateChanged:
        removed = after.status in ("deleted", "expired")
        if removed:
            self.states.pop(after.state_id, None)
            self.histories.pop(after.state_id, None)
            self.tombstones[after.state_id] = (after.version, now_ms + self.tombstone_ms)
        else:
            self.states[after.state_id] = after
        self.offset += 1
        event = StateChanged(
            state_id=after.state_id,
            state_type=after.state_type,
            transition=transition,
            old=None if before is None else before.data,
            new=None if removed else after.data,
            version=after.version,
            offset=self.offset,
            epoch=self.epoch,
            ts=now_ms,
            status=after.status,
            previous_status="" if before is None else before.status,
        )
        if not removed:
            history = self.histories.get(after.state_id)
            if history is None:
                history = self.histories[after.state_id] = collections.deque(
                    maxlen=self.history_limit
                )
            history.append(event)
        return event
