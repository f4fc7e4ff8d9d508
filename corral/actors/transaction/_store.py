"""What the transaction manager keeps of an open transaction, and the interface of
the stores that keep it (:mod:`._memory` in this process, :mod:`._redis` shared by
every daemon of a namespace).

A :class:`TransactionRecord` holds everything a later request needs, so whichever
daemon holds the request can serve it. Every change is a compare-and-set on the
record's version, so that two requests of one transaction served at once by two
daemons never lose a write::

    store.begin("t1", TransactionRecord(idle_timeout=30.0))
    record, version = store.load("t1")
    record.writes.append(write)
    if not store.save("t1", record, version):
        ...                              # another request stored first: load again
    store.take("t1")                     # commit or rollback: removed, for one caller only

Each ``begin`` or successful ``save`` restarts the record's idle timeout; past it,
the record is gone and requests for it raise NotFound saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from corral.errors import NotFound
from corral.messages.state import StateInfo, StateWrite
from corral.messages.transaction import IsolationLevel

__all__ = ["TransactionRecord", "TransactionStore", "not_open"]


@dataclass
class TransactionRecord:
    """One open transaction::

    TransactionRecord(idle_timeout=30.0, writes=[StateWrite(state_id="a", transition="update")])
    """

    idle_timeout: float
    """Seconds without a request before the transaction is rolled back."""
    writes: list[StateWrite] = field(default_factory=list)
    """The buffered writes, in order."""
    savepoints: list[tuple[str, int]] = field(default_factory=list)
    """Each savepoint's name and how many writes there were when it was made; innermost last."""
    savepoints_named: int = 0
    """How many savepoint names were generated: the next is ``sp<n + 1>`` (or later, if taken)."""
    stored: dict[str, StateInfo | None] = field(default_factory=dict)
    """The read set: every state touched, as first read from the state manager (None: absent)."""
    isolation_level: IsolationLevel = "serializable"
    """What the commit checks: ``serializable``, every state in ``stored``;
    ``read_committed``, only the written ones."""

    def copy(self) -> TransactionRecord:
        """A record whose lists a change may alter without altering this one."""
        return TransactionRecord(
            idle_timeout=self.idle_timeout,
            writes=list(self.writes),
            savepoints=list(self.savepoints),
            savepoints_named=self.savepoints_named,
            stored=dict(self.stored),
            isolation_level=self.isolation_level,
        )


class TransactionStore(Protocol):
    """Where open transactions live. Every method may raise BackendUnavailable; those
    that name a transaction raise :func:`not_open` when it is not open."""

    kind: str
    """``memory`` or ``redis``."""
    sweeps_idle: bool
    """Whether :meth:`expire_idle` must be called now and then to end idle transactions."""

    def begin(self, transaction_id: str, record: TransactionRecord) -> None:
        """Store a new transaction's record, at version 1."""
        ...

    def load(self, transaction_id: str) -> tuple[TransactionRecord, int]:
        """The record and its version (a copy: changing it changes nothing stored)."""
        ...

    def save(self, transaction_id: str, record: TransactionRecord, version: int) -> bool:
        """Store ``record`` if the stored one is still at ``version``; False if not."""
        ...

    def take(self, transaction_id: str) -> TransactionRecord:
        """Remove the record and return it: of concurrent callers, exactly one gets it."""
        ...

    def expire_idle(self) -> list[str]:
        """Roll back the transactions idle past their timeout; their ids."""
        ...

    def open_count(self) -> int | None:
        """How many transactions are open, where the store knows (None: it does not)."""
        ...

    def close(self) -> None: ...


def not_open(transaction_id: str, *, expired: bool) -> NotFound:
    """The error for a request naming a transaction that is not open."""
    why = " (rolled back after its idle timeout)" if expired else ""
    return NotFound(
        f"no open transaction {transaction_id!r}{why}", {"transaction_id": transaction_id}
    )
