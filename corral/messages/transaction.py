"""Messages of the ``transaction`` manager: buffered state writes, savepoints, commit.

A transaction buffers state writes; reads through it see its own writes; commit
applies them all or none (one ``state.commit``), and only then are events published::

    tx = system.ask(TransactionBegin()).transaction_id
    system.ask(TransactionWrite(transaction_id=tx, write=StateWrite(
        state_id="u1", transition="update", data={"n": 2})))
    system.ask(TransactionGet(transaction_id=tx, state_id="u1")).data   # {"n": 2}
    sp = system.ask(TransactionSavepoint(transaction_id=tx)).savepoint
    system.ask(TransactionRollbackToSavepoint(transaction_id=tx, savepoint=sp))
    system.ask(TransactionCommit(transaction_id=tx))

``corral.ext.transaction.transaction(system)`` wraps this in nested ``with`` blocks.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from corral.messages.base import Count, Reply, Request, TimeLimit, message
from corral.messages.state import StateInfo, StateWrite

__all__ = [
    "ISOLATION_LEVELS",
    "IsolationLevel",
    "TransactionBegin",
    "TransactionCommit",
    "TransactionCommitted",
    "TransactionExpireIdle",
    "TransactionExpired",
    "TransactionGet",
    "TransactionInfo",
    "TransactionReleaseSavepoint",
    "TransactionRollback",
    "TransactionRollbackToSavepoint",
    "TransactionSavepoint",
    "TransactionWrite",
]


IsolationLevel = Literal["serializable", "read_committed"]
"""What a commit checks: every state read and written, or the written ones only."""
ISOLATION_LEVELS: tuple[IsolationLevel, ...] = ("serializable", "read_committed")


@message("transaction.info")
class TransactionInfo(Reply):
    """An open transaction: its buffered writes and savepoints (innermost last).
    ``savepoint`` names the savepoint a TransactionSavepoint just made."""

    transaction_id: str
    writes: Count
    savepoints: list[str] = msgspec.field(default_factory=list)
    savepoint: str = ""


@message("transaction.begin")
class TransactionBegin(Request[TransactionInfo]):
    """Open a transaction; rolled back after ``idle_timeout`` seconds without a request
    (default: the manager's ``idle_timeout``; at most a day).

    ``isolation_level``: ``"serializable"`` (the default) makes the commit check every
    state the transaction read, not only those it wrote, so write skew is refused with
    Conflict; ``"read_committed"`` checks only the written states::

        TransactionBegin(isolation_level="read_committed")
    """

    manager = "transaction"
    idle_timeout: TimeLimit | None = None
    isolation_level: IsolationLevel = "serializable"


@message("transaction.write")
class TransactionWrite(Request[StateInfo]):
    """Buffer one state write; checked now against the transaction's view (NotFound,
    Conflict), applied at commit. Answers the state as the transaction now sees it."""

    manager = "transaction"
    transaction_id: str
    write: StateWrite


@message("transaction.get", idempotent=True)
class TransactionGet(Request[StateInfo]):
    """A state as the transaction sees it: stored, with its buffered writes on top."""

    manager = "transaction"
    transaction_id: str
    state_id: str


@message("transaction.savepoint")
class TransactionSavepoint(Request[TransactionInfo]):
    """Mark the buffer; ``savepoint`` names it (default: generated, answered back)."""

    manager = "transaction"
    transaction_id: str
    savepoint: str = ""


@message("transaction.rollback_to_savepoint")
class TransactionRollbackToSavepoint(Request[TransactionInfo]):
    """Drop the writes made since ``savepoint`` (which stays, as in SQL) and later savepoints."""

    manager = "transaction"
    transaction_id: str
    savepoint: str


@message("transaction.release_savepoint")
class TransactionReleaseSavepoint(Request[TransactionInfo]):
    """Forget ``savepoint`` and later ones, keeping their writes (an inner block's success)."""

    manager = "transaction"
    transaction_id: str
    savepoint: str


@message("transaction.committed")
class TransactionCommitted(Reply):
    """The states after the commit, one per buffered write, in order."""

    transaction_id: str
    states: list[StateInfo]


@message("transaction.commit")
class TransactionCommit(Request[TransactionCommitted]):
    """Apply every buffered write, all or nothing. A state changed by someone else since
    the transaction first touched it makes the commit fail with Conflict, applying nothing.
    The transaction is over either way."""

    manager = "transaction"
    transaction_id: str


@message("transaction.rollback")
class TransactionRollback(Request[TransactionInfo]):
    """Drop the transaction and every buffered write."""

    manager = "transaction"
    transaction_id: str


@message("transaction.expired", internal=True)
class TransactionExpired(Reply):
    """The transactions an idle sweep rolled back."""

    transaction_ids: list[str]


@message("transaction.expire_idle", internal=True)
class TransactionExpireIdle(Request[TransactionExpired]):
    """Roll back the transactions idle past their timeout, now (the manager sends itself
    this every ``sweep_interval`` seconds)."""

    manager = "transaction"
