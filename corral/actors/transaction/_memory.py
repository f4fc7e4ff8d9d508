"""Open transactions in this process's memory: for a system without Redis.

::

    store = MemoryStore(on_expired=lambda: print("rolled back after its idle timeout"))
    store.begin("t1", TransactionRecord(idle_timeout=30.0))
    record, version = store.load("t1")
    store.save("t1", record, version)    # True
    store.expire_idle()                  # [] until t1 has been idle for 30 s
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from corral.actors.transaction._store import TransactionRecord, not_open

__all__ = ["MemoryStore"]

REMEMBERED_EXPIRED = 1_000
"""How many idle-expired transaction ids are remembered, to say why they are gone."""


@dataclass(frozen=True)
class _Entry:
    record: TransactionRecord
    version: int
    deadline: float


class MemoryStore:
    """Records by transaction id, each with its version and idle deadline (monotonic)."""

    kind = "memory"
    sweeps_idle = True

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_expired: Callable[[], None] = lambda: None,
    ) -> None:
        self._clock = clock
        self._on_expired = on_expired
        self._open: dict[str, _Entry] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()

    def begin(self, transaction_id: str, record: TransactionRecord) -> None:
        self._put(transaction_id, record, 1)

    def load(self, transaction_id: str) -> tuple[TransactionRecord, int]:
        entry = self._live(transaction_id)
        return entry.record.copy(), entry.version

    def save(self, transaction_id: str, record: TransactionRecord, version: int) -> bool:
        if self._live(transaction_id).version != version:
            return False
        self._put(transaction_id, record, version + 1)
        return True

    def take(self, transaction_id: str) -> TransactionRecord:
        record = self._live(transaction_id).record
        del self._open[transaction_id]
        return record

    def expire_idle(self) -> list[str]:
        now = self._clock()
        idle = [tid for tid, entry in self._open.items() if entry.deadline <= now]
        for transaction_id in idle:
            self._expire(transaction_id)
        return idle

    def open_count(self) -> int:
        return len(self._open)

    def close(self) -> None:
        self._open.clear()

    def _put(self, transaction_id: str, record: TransactionRecord, version: int) -> None:
        deadline = self._clock() + record.idle_timeout
        self._open[transaction_id] = _Entry(record, version, deadline)

    def _live(self, transaction_id: str) -> _Entry:
        entry = self._open.get(transaction_id)
        if entry is not None and entry.deadline <= self._clock():
            self._expire(transaction_id)
            entry = None
        if entry is None:
            raise not_open(transaction_id, expired=transaction_id in self._expired)
        return entry

    def _expire(self, transaction_id: str) -> None:
        del self._open[transaction_id]
        self._on_expired()
        self._expired[transaction_id] = None
        while len(self._expired) > REMEMBERED_EXPIRED:
            self._expired.popitem(last=False)
