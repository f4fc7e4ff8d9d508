"""``with transaction(system):`` — a transaction of the ``transaction`` manager as a block.

The outermost block begins a transaction and commits it when the block ends
(rolls it back when the block raises); a block nested inside it, in the same
thread or task, is a savepoint: rolled back alone when it raises, kept when it
ends normally. Events are published only after the outermost commit::

    with transaction(system) as tx:
        tx.update("u1", data={"n": 1})
        try:
            with transaction(system):
                tx.update("u2", transition="suspend")
                raise RuntimeError("undo just this part")
        except RuntimeError:
            pass
        tx.get("u1").data            # {"n": 1}: reads see the transaction's own writes
    tx.states                        # the committed states

``system`` is anything with ``ask``: a ``corral.System`` or ``corral.connect(...)``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, Protocol, TypeVar

from corral.messages.base import Reply, Request
from corral.messages.state import StateInfo, StateWrite
from corral.messages.transaction import (
    IsolationLevel,
    TransactionBegin,
    TransactionCommit,
    TransactionGet,
    TransactionReleaseSavepoint,
    TransactionRollback,
    TransactionRollbackToSavepoint,
    TransactionSavepoint,
    TransactionWrite,
)

__all__ = ["Asker", "Transaction", "transaction"]

R = TypeVar("R", bound=Reply)


class Asker(Protocol):
    def ask(self, message: Request[R], *, timeout: float | None = None) -> R: ...


_open: contextvars.ContextVar[dict[int, Transaction]] = contextvars.ContextVar(
    "corral_open_transactions"
)


class Transaction:
    """One open transaction: buffered writes, reads that see them, savepoints."""

    def __init__(self, system: Asker, transaction_id: str) -> None:
        self.system = system
        self.transaction_id = transaction_id
        self.states: list[StateInfo] = []
        """The committed states, once the outermost block has committed."""

    def __repr__(self) -> str:
        return f"<Transaction {self.transaction_id}>"

    def get(self, state_id: str) -> StateInfo:
        """The state as this transaction sees it: stored, with its buffered writes on top."""
        return self.system.ask(
            TransactionGet(transaction_id=self.transaction_id, state_id=state_id)
        )

    def write(self, write: StateWrite) -> StateInfo:
        """Buffer any write; answers the state as the transaction now sees it."""
        return self.system.ask(TransactionWrite(transaction_id=self.transaction_id, write=write))

    def register(self, state_id: str, state_type: str, **fields: Any) -> StateInfo:
        """Create a state (fields: data, allowed_transitions, ttl)."""
        fields.setdefault("data", {})
        return self.write(
            StateWrite(state_id=state_id, transition="create", state_type=state_type, **fields)
        )

    def update(self, state_id: str, *, transition: str = "update", **fields: Any) -> StateInfo:
        """Run a transition (fields: data, expected_version, ttl)."""
        return self.write(StateWrite(state_id=state_id, transition=transition, **fields))

    def delete(self, state_id: str, *, expected_version: int | None = None) -> StateInfo:
        """Delete a state (at ``expected_version``, when given)."""
        return self.write(
            StateWrite(state_id=state_id, transition="delete", expected_version=expected_version)
        )

    def savepoint(self, name: str = "") -> str:
        """Mark the writes so far; returns the savepoint's name (generated for "")::

        mark = tx.savepoint()          # "sp1"
        tx.delete("u1")
        tx.rollback_to_savepoint(mark) # the delete is undone
        """
        info = self.system.ask(
            TransactionSavepoint(transaction_id=self.transaction_id, savepoint=name)
        )
        return info.savepoint

    def rollback_to_savepoint(self, name: str) -> None:
        """Drop the writes made since ``name`` and the savepoints after it; ``name`` stays."""
        self.system.ask(
            TransactionRollbackToSavepoint(transaction_id=self.transaction_id, savepoint=name)
        )

    def release_savepoint(self, name: str) -> None:
        """Forget ``name`` and the savepoints after it, keeping their writes."""
        self.system.ask(
            TransactionReleaseSavepoint(transaction_id=self.transaction_id, savepoint=name)
        )


@contextlib.contextmanager
def transaction(
    system: Asker,
    *,
    idle_timeout: float | None = None,
    isolation_level: IsolationLevel = "serializable",
) -> Iterator[Transaction]:
    """A transaction block, or a savepoint when one is already open for ``system``
    (whose ``isolation_level`` then counts)."""
    open_now = _open.get({})
    outer = open_now.get(id(system))
    if outer is not None:
        name = outer.savepoint()
        try:
            yield outer
        except BaseException:
            outer.rollback_to_savepoint(name)
            raise
        outer.release_savepoint(name)
        return
    info = system.ask(TransactionBegin(idle_timeout=idle_timeout, isolation_level=isolation_level))
    tx = Transaction(system, info.transaction_id)
    token = _open.set({**open_now, id(system): tx})
    try:
        try:
            yield tx
        except BaseException:
            with contextlib.suppress(Exception):  # the block's own error matters more
                system.ask(TransactionRollback(transaction_id=tx.transaction_id))
            raise
        tx.states = system.ask(TransactionCommit(transaction_id=tx.transaction_id)).states
    finally:
        _open.reset(token)
