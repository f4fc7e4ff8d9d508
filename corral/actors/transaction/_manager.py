"""The ``transaction`` manager: buffered state writes with savepoints, committed all or nothing.

It holds open transactions in memory and talks to the ``state`` manager only by
messages: ``state.get`` for the stored form of a state a transaction touches, and
one ``state.commit`` with every buffered write at the end. Each buffered write is
sent with the version the transaction saw before it, so that a state changed by
anyone else meanwhile makes the whole commit fail with Conflict. Config::

    [managers.transaction]
    idle_timeout = 30.0      # seconds without a request before a rollback
    max_writes = 1000        # buffered writes per transaction
    sweep_interval = 1.0     # seconds between idle checks

Use it through ``corral.ext.transaction.transaction(system)`` (nested ``with``
blocks are savepoints), or with the ``transaction.*`` messages directly.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from corral.actors.base import Manager, handles
from corral.config import Section
from corral.errors import InvalidMessage, NotFound
from corral.messages.base import MAX_TIMEOUT
from corral.messages.state import (
    StateCommit,
    StateGet,
    StateInfo,
    StateWrite,
    apply_transition,
    check_write,
)
from corral.messages.system import Health
from corral.messages.transaction import (
    TransactionBegin,
    TransactionCommit,
    TransactionCommitted,
    TransactionExpired,
    TransactionExpireIdle,
    TransactionGet,
    TransactionInfo,
    TransactionReleaseSavepoint,
    TransactionRollback,
    TransactionRollbackToSavepoint,
    TransactionSavepoint,
    TransactionWrite,
)

__all__ = ["TransactionManager", "TransactionOptions"]

_REMEMBERED_EXPIRED = 1_000


@dataclass(frozen=True, kw_only=True)
class TransactionOptions(Section):
    """``[managers.transaction]``: see the module docstring."""

    idle_timeout: float = field(default=30.0, metadata={"gt": 0, "le": MAX_TIMEOUT})
    max_writes: int = field(default=1_000, metadata={"ge": 1})
    sweep_interval: float = field(default=1.0, metadata={"gt": 0})


@dataclass
class _Transaction:
    idle_timeout: float
    last_used: float
    writes: list[StateWrite] = field(default_factory=list)
    savepoints: list[tuple[str, int]] = field(default_factory=list)
    stored: dict[str, StateInfo | None] = field(default_factory=dict)
    """The stored form of every state touched, as first read (None: absent)."""


def _now_ms() -> int:
    return int(time.time() * 1000)


class TransactionManager(Manager):
    """Handles ``transaction.*``; see the module docstring."""

    name = "transaction"
    Options = TransactionOptions

    def on_start(self) -> None:
        self.open: dict[str, _Transaction] = {}
        self.expired: OrderedDict[str, None] = OrderedDict()
        self.committed = 0
        self.rolled_back = 0
        self._sweep_due = threading.Event()
        self._stopping = threading.Event()
        self._savepoint_names = itertools.count(1)
        threading.Thread(
            target=self._tick, name=f"corral-transaction-sweep:{self.context.name}", daemon=True
        ).start()

    def on_stop(self) -> None:
        self._stopping.set()

    def health(self) -> Health:
        return Health(
            status="healthy",
            metrics={
                "open": len(self.open),
                "committed": self.committed,
                "rolled_back": self.rolled_back,
            },
        )

    # -- requests ---------------------------------------------------------------------

    @handles(TransactionBegin)
    def begin(self, msg: TransactionBegin) -> TransactionInfo:
        timeout = self.settings.idle_timeout if msg.idle_timeout is None else msg.idle_timeout
        if not 0 < timeout <= MAX_TIMEOUT:  # as the codec checks
            raise InvalidMessage(
                f"idle_timeout must be > 0 and <= {MAX_TIMEOUT} s", path="idle_timeout"
            )
        transaction_id = uuid.uuid4().hex
        self.open[transaction_id] = _Transaction(timeout, time.monotonic())
        return TransactionInfo(transaction_id=transaction_id, writes=0)

    @handles(TransactionWrite)
    def write(self, msg: TransactionWrite) -> StateInfo:
        tx = self._find(msg.transaction_id)
        write = msg.write
        try:
            check_write(write)
        except InvalidMessage as exc:
            raise InvalidMessage(exc.message, path="write." + exc.path) from None
        if len(tx.writes) >= self.settings.max_writes:
            raise InvalidMessage(
                f"the transaction holds {len(tx.writes)} writes, the limit", path="write"
            )
        after = apply_transition(self._view(tx, write.state_id), write, _now_ms())
        tx.writes.append(write)
        return after

    @handles(TransactionGet)
    def get(self, msg: TransactionGet) -> StateInfo:
        state = self._view(self._find(msg.transaction_id), msg.state_id)
        if state is None:
            raise NotFound(f"no state {msg.state_id!r}", {"state_id": msg.state_id})
        return state

    @handles(TransactionSavepoint)
    def savepoint(self, msg: TransactionSavepoint) -> TransactionInfo:
        tx = self._find(msg.transaction_id)
        name = msg.savepoint or f"sp{next(self._savepoint_names)}"
        if any(existing == name for existing, _ in tx.savepoints):
            raise InvalidMessage(f"savepoint {name!r} exists", path="savepoint")
        tx.savepoints.append((name, len(tx.writes)))
        return self._info(msg.transaction_id, tx, savepoint=name)

    @handles(TransactionRollbackToSavepoint)
    def rollback_to_savepoint(self, msg: TransactionRollbackToSavepoint) -> TransactionInfo:
        tx = self._find(msg.transaction_id)
        index = self._savepoint_index(tx, msg.savepoint)
        del tx.writes[tx.savepoints[index][1] :]
        del tx.savepoints[index + 1 :]
        return self._info(msg.transaction_id, tx)

    @handles(TransactionReleaseSavepoint)
    def release_savepoint(self, msg: TransactionReleaseSavepoint) -> TransactionInfo:
        tx = self._find(msg.transaction_id)
        del tx.savepoints[self._savepoint_index(tx, msg.savepoint) :]
        return self._info(msg.transaction_id, tx)

    @handles(TransactionCommit)
    def commit(self, msg: TransactionCommit) -> TransactionCommitted:
        tx = self._find(msg.transaction_id)
        del self.open[msg.transaction_id]
        writes = self._versioned(tx)
        states = (
            self.router.ask(StateCommit(writes=writes, transaction_id=msg.transaction_id)).states
            if writes
            else []
        )
        self.committed += 1
        return TransactionCommitted(transaction_id=msg.transaction_id, states=states)

    @handles(TransactionRollback)
    def rollback(self, msg: TransactionRollback) -> TransactionInfo:
        tx = self._find(msg.transaction_id)
        del self.open[msg.transaction_id]
        self.rolled_back += 1
        return TransactionInfo(transaction_id=msg.transaction_id, writes=len(tx.writes))

    @handles(TransactionExpireIdle)
    def expire_idle(self, _msg: TransactionExpireIdle) -> TransactionExpired:
        self._sweep_due.clear()
        now = time.monotonic()
        idle = [tid for tid, tx in self.open.items() if now - tx.last_used > tx.idle_timeout]
        for transaction_id in idle:
            del self.open[transaction_id]
            self.expired[transaction_id] = None
            self.rolled_back += 1
        while len(self.expired) > _REMEMBERED_EXPIRED:
            self.expired.popitem(last=False)
        return TransactionExpired(transaction_ids=idle)

    # -- internals --------------------------------------------------------------------

    def _find(self, transaction_id: str) -> _Transaction:
        tx = self.open.get(transaction_id)
        if tx is None:
            why = "rolled back after its idle timeout" if transaction_id in self.expired else ""
            raise NotFound(
                f"no open transaction {transaction_id!r}{' (' + why + ')' if why else ''}",
                {"transaction_id": transaction_id},
            )
        tx.last_used = time.monotonic()
        return tx

    def _stored(self, tx: _Transaction, state_id: str) -> StateInfo | None:
        if state_id not in tx.stored:
            try:
                tx.stored[state_id] = self.router.ask(StateGet(state_id=state_id))
            except NotFound:
                tx.stored[state_id] = None
        return tx.stored[state_id]

    def _view(self, tx: _Transaction, state_id: str) -> StateInfo | None:
        """The stored state with the transaction's writes to it replayed on top."""
        state = self._stored(tx, state_id)
        now = _now_ms()
        for write in tx.writes:
            if write.state_id == state_id:
                state = apply_transition(state, write, now)
                if state.status in ("deleted", "expired"):
                    state = None
        return state

    def _versioned(self, tx: _Transaction) -> list[StateWrite]:
        """The writes, each expecting the version the transaction saw before it."""
        versions = {
            state_id: 0 if state is None else state.version for state_id, state in tx.stored.items()
        }
        versioned = []
        for write in tx.writes:
            expected = versions[write.state_id]
            versioned.append(dataclasses.replace(write, expected_version=expected))
            versions[write.state_id] = (
                0 if write.transition in ("delete", "expire") else expected + 1
            )
        return versioned

    def _savepoint_index(self, tx: _Transaction, name: str) -> int:
        for index, (existing, _) in enumerate(tx.savepoints):
            if existing == name:
                return index
        raise NotFound(f"no savepoint {name!r}", {"savepoint": name})

    def _info(self, transaction_id: str, tx: _Transaction, savepoint: str = "") -> TransactionInfo:
        return TransactionInfo(
            transaction_id=transaction_id,
            writes=len(tx.writes),
            savepoints=[name for name, _ in tx.savepoints],
            savepoint=savepoint,
        )

    def _tick(self) -> None:
        interval = self.settings.sweep_interval
        while not self._stopping.wait(interval):
            if self._sweep_due.is_set():
                continue  # the last sweep is still queued
            self._sweep_due.set()
            try:
                self.actor_ref.tell(TransactionExpireIdle())
            except Exception:  # stopping, or a full mailbox: try again next tick
                self._sweep_due.clear()
