"""The transaction manager: buffered state writes with savepoints, committed all or nothing.

It talks to the ``state`` manager only by messages: ``state.get`` for the stored
form of a state a transaction touches, and one ``state.commit`` with every buffered
write at the end. Each buffered write is sent with the version the transaction saw
before it, so that a state changed by anyone else meanwhile makes the whole commit
fail with Conflict::

    with System(managers=[StateManager, TransactionManager]) as system:
        tid = system.ask(TransactionBegin()).transaction_id
        system.ask(TransactionWrite(transaction_id=tid, write=StateWrite(
            state_id="a", transition="create", state_type="User")))
        system.ask(TransactionCommit(transaction_id=tid)).states

Open transactions live in a store (:mod:`._store`): Redis when the system has it, so
that each request may be served by any daemon, else this process's memory.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import msgspec

from corral._backoff import Backoff
from corral._statemachine import apply_transition, check_write
from corral._time import now_ms
from corral.actors.transaction._memory import MemoryStore
from corral.actors.transaction._options import TransactionOptions
from corral.actors.transaction._redis import RedisStore
from corral.actors.transaction._store import TransactionRecord, TransactionStore
from corral.errors import (
    BackendUnavailable,
    ConfigError,
    Conflict,
    CorralError,
    InvalidMessage,
    NotFound,
)
from corral.manager import Manager, handles
from corral.messages.base import MAX_TIMEOUT
from corral.messages.state import (
    StateCommit,
    StateGet,
    StateGetMachine,
    StateInfo,
    StateMachine,
    StateWrite,
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
from corral.metrics import Counter, Gauge

__all__ = ["TransactionManager"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANGE_ATTEMPTS = 20
"""How many times a request re-reads its transaction after losing a compare-and-set to
another request of the same transaction, before it gives up with Conflict."""

_CHANGE_BACKOFF = Backoff(initial=0.001, cap=0.05, jitter=1.0)
"""The pause between two attempts of one change: at random, up to 1 ms, then 2, 4, ...
50 ms at most, so that racing writers stop colliding."""


BEGUN = Counter("corral_transactions_begun_total", "Transactions begun")
COMMITTED = Counter("corral_transactions_committed_total", "Transactions committed")
ROLLED_BACK = Counter("corral_transactions_rolled_back_total", "Transactions rolled back")
RETRIED = Counter(
    "corral_transaction_retries_total",
    "Requests run again after losing a compare-and-set to another request of their transaction",
)
EXPIRED = Counter(
    "corral_transactions_expired_total",
    "Transactions rolled back after their idle timeout (memory store only)",
)
OPEN = Gauge("corral_transactions_open", "Transactions open now (memory store only)")
HEALTH_COUNTS = {
    "begun": BEGUN,
    "committed": COMMITTED,
    "rolled_back": ROLLED_BACK,
    "retried": RETRIED,
}
"""The counters in ``Health.metrics``, by key."""


class TransactionManager(Manager[TransactionOptions]):
    """Handles ``transaction.*``; see the module docstring.

    Health metrics count what this manager (this daemon) served: ``begun``,
    ``committed``, ``rolled_back``, and ``retried`` (requests that lost a
    compare-and-set to another request of their transaction and ran again); the memory
    store adds ``open`` and ``expired``. On Redis, no daemon counts the open ones: any
    daemon serves any step, and Redis expires idle ones by itself.
    """

    name = "transaction"
    metric_families = (BEGUN, COMMITTED, ROLLED_BACK, RETRIED, EXPIRED, OPEN)
    settings: TransactionOptions

    def on_start(self) -> None:
        self.store = self._open_store()
        self._machine_of: dict[str, StateMachine | None] = {}
        self.last_backend_error = ""
        if self.store.sweeps_idle:
            self.every(self.options.sweep_interval, self.store.expire_idle)

    def on_stop(self) -> None:
        self.store.close()

    def _open_store(self) -> TransactionStore:
        url = self.options.redis_url or self.corral_context.redis_url
        backend = self.options.backend
        if backend == "auto":
            backend = "redis" if url else "memory"
        if backend == "memory":
            if self.corral_context.redis_url:
                log.warning(
                    "%s: backend = memory on a Redis bus: a transaction is served only by "
                    "the daemon that began it, so corral.connect() clients cannot use it",
                    self.corral_context.name,
                )
            return MemoryStore(
                self.corral_context.clock.monotonic,
                on_expired=lambda: self.corral_metrics.add(EXPIRED),
            )
        setting = f"managers.{self.corral_context.name}.redis_url"
        if not url:
            raise ConfigError(
                f"{setting}: the redis backend needs a URL "
                "(set redis_url, or run the system's bus on Redis)"
            )
        return RedisStore(url, namespace=self.corral_context.namespace, setting=setting)

    def health(self) -> Health:
        details = {"backend": self.store.kind}
        if self.last_backend_error:
            details["last_backend_error"] = self.last_backend_error
        status: Literal["healthy", "degraded"] = (
            "degraded" if self.last_backend_error else "healthy"
        )
        counted = self.corral_metrics
        metrics = {key: int(counted.value(family)) for key, family in HEALTH_COUNTS.items()}
        open_count = self.store.open_count()
        if open_count is not None:
            counted.set(OPEN, open_count)
            metrics["open"] = open_count
            metrics["expired"] = int(counted.value(EXPIRED))
        return Health(status=status, details=details, metrics=metrics)

    # -- requests ---------------------------------------------------------------------

    @handles(TransactionBegin)
    def begin(self, msg: TransactionBegin) -> TransactionInfo:
        timeout = self.options.idle_timeout if msg.idle_timeout is None else msg.idle_timeout
        if not 0 < timeout <= MAX_TIMEOUT:  # as the codec checks
            raise InvalidMessage(
                f"idle_timeout must be > 0 and <= {MAX_TIMEOUT} s", path="idle_timeout"
            )
        transaction_id = uuid.uuid4().hex
        record = TransactionRecord(idle_timeout=timeout, isolation_level=msg.isolation_level)
        self._stored_call(self.store.begin, transaction_id, record)
        self.corral_metrics.add(BEGUN)
        return TransactionInfo(transaction_id=transaction_id, writes=0)

    @handles(TransactionWrite)
    def write(self, msg: TransactionWrite) -> StateInfo:
        write = msg.write
        try:
            check_write(write)
        except InvalidMessage as exc:
            raise InvalidMessage(exc.message, path="write." + exc.path) from None

        def buffer(tx: TransactionRecord) -> StateInfo:
            if len(tx.writes) >= self.options.max_writes:
                raise InvalidMessage(
                    f"the transaction holds {len(tx.writes)} writes, the limit", path="write"
                )
            view = self._view(tx, write.state_id)
            state_type = write.state_type if view is None else view.state_type
            after = apply_transition(view, write, now_ms(), self._machines(state_type))
            tx.writes.append(write)
            return after

        return self._change(msg.transaction_id, buffer)

    @handles(TransactionGet)
    def get(self, msg: TransactionGet) -> StateInfo:
        def read(tx: TransactionRecord) -> StateInfo:
            state = self._view(tx, msg.state_id)
            if state is None:
                raise NotFound(f"no state {msg.state_id!r}", {"state_id": msg.state_id})
            return state

        return self._change(msg.transaction_id, read)

    @handles(TransactionSavepoint)
    def savepoint(self, msg: TransactionSavepoint) -> TransactionInfo:
        def mark(tx: TransactionRecord) -> TransactionInfo:
            names = {existing for existing, _ in tx.savepoints}
            name = msg.savepoint
            if name in names:
                raise InvalidMessage(f"savepoint {name!r} exists", path="savepoint")
            while not name or name in names:
                tx.savepoints_named += 1
                name = f"sp{tx.savepoints_named}"
            tx.savepoints.append((name, len(tx.writes)))
            return self._info(msg.transaction_id, tx, savepoint=name)

        return self._change(msg.transaction_id, mark)

    @handles(TransactionRollbackToSavepoint)
    def rollback_to_savepoint(self, msg: TransactionRollbackToSavepoint) -> TransactionInfo:
        def undo(tx: TransactionRecord) -> TransactionInfo:
            index = self._savepoint_index(tx, msg.savepoint)
            del tx.writes[tx.savepoints[index][1] :]
            del tx.savepoints[index + 1 :]
            return self._info(msg.transaction_id, tx)

        return self._change(msg.transaction_id, undo)

    @handles(TransactionReleaseSavepoint)
    def release_savepoint(self, msg: TransactionReleaseSavepoint) -> TransactionInfo:
        def release(tx: TransactionRecord) -> TransactionInfo:
            del tx.savepoints[self._savepoint_index(tx, msg.savepoint) :]
            return self._info(msg.transaction_id, tx)

        return self._change(msg.transaction_id, release)

    @handles(TransactionCommit)
    def commit(self, msg: TransactionCommit) -> TransactionCommitted:
        tx = self._stored_call(self.store.take, msg.transaction_id)
        writes = self._versioned(tx)
        reads = self._read_only_versions(tx) if tx.isolation_level == "serializable" else {}
        states = (
            self.router.ask(
                StateCommit(writes=writes, reads=reads, transaction_id=msg.transaction_id)
            ).states
            if writes or reads
            else []
        )
        self.corral_metrics.add(COMMITTED)
        return TransactionCommitted(transaction_id=msg.transaction_id, states=states)

    @handles(TransactionRollback)
    def rollback(self, msg: TransactionRollback) -> TransactionInfo:
        tx = self._stored_call(self.store.take, msg.transaction_id)
        self.corral_metrics.add(ROLLED_BACK)
        return TransactionInfo(transaction_id=msg.transaction_id, writes=len(tx.writes))

    @handles(TransactionExpireIdle)
    def expire_idle(self, _msg: TransactionExpireIdle) -> TransactionExpired:
        return TransactionExpired(transaction_ids=self.store.expire_idle())

    # -- internals --------------------------------------------------------------------

    def _change(self, transaction_id: str, change: Callable[[TransactionRecord], T]) -> T:
        """Apply ``change`` to the transaction's record and store it; again, on the record
        as it is then, if another request of the transaction stored first. A change that
        raises still keeps what it read and restarts the idle timeout."""
        for attempt in range(CHANGE_ATTEMPTS):
            tx, version = self._stored_call(self.store.load, transaction_id)
            try:
                result = change(tx)
            except CorralError:
                with contextlib.suppress(CorralError):  # the caller hears the first error
                    self._stored_call(self.store.save, transaction_id, tx, version)
                raise
            if self._stored_call(self.store.save, transaction_id, tx, version):
                return result
            self.corral_metrics.add(RETRIED)
            # Back off a little, at random, so that racing writers stop colliding.
            time.sleep(_CHANGE_BACKOFF.delay(attempt + 1))
        raise Conflict(
            f"transaction {transaction_id!r} was changed by {CHANGE_ATTEMPTS} other requests "
            "while this one ran; try again",
            {"transaction_id": transaction_id},
        )

    def _stored_call(self, action: Callable[..., T], *args: Any) -> T:
        """``action(*args)`` on the store, noting whether the store answered."""
        try:
            result = action(*args)
        except BackendUnavailable as exc:
            self.last_backend_error = exc.message
            raise
        self.last_backend_error = ""
        return result

    def _stored(self, tx: TransactionRecord, state_id: str) -> StateInfo | None:
        if state_id not in tx.stored:
            try:
                tx.stored[state_id] = self.router.ask(StateGet(state_id=state_id))
            except NotFound:
                tx.stored[state_id] = None
        return tx.stored[state_id]

    def _view(self, tx: TransactionRecord, state_id: str) -> StateInfo | None:
        """The stored state with the transaction's writes to it replayed on top."""
        state = self._stored(tx, state_id)
        now = now_ms()
        for write in tx.writes:
            if write.state_id == state_id:
                state_type = write.state_type if state is None else state.state_type
                state = apply_transition(state, write, now, self._machines(state_type))
                if state.status in ("deleted", "expired"):
                    state = None
        return state

    def _versioned(self, tx: TransactionRecord) -> list[StateWrite]:
        """The writes, each expecting the version the transaction saw before it."""
        versions = {
            state_id: 0 if state is None else state.version for state_id, state in tx.stored.items()
        }
        versioned = []
        for write in tx.writes:
            expected = versions[write.state_id]
            versioned.append(msgspec.structs.replace(write, expected_version=expected))
            versions[write.state_id] = (
                0 if write.transition in ("delete", "expire") else expected + 1
            )
        return versioned

    def _machines(self, state_type: str) -> dict[str, StateMachine]:
        """The machine the state manager declares for ``state_type``, if any, by type (asked
        once per type: machines change with the state manager's config, at a restart)."""
        if state_type not in self._machine_of:
            try:
                self._machine_of[state_type] = self.router.ask(
                    StateGetMachine(state_type=state_type)
                )
            except NotFound:
                self._machine_of[state_type] = None
        machine = self._machine_of[state_type]
        return {} if machine is None else {state_type: machine}

    def _read_only_versions(self, tx: TransactionRecord) -> dict[str, int]:
        """The states the transaction read but does not write, each at the version it
        read (0: absent): a serializable commit needs them unchanged."""
        written = {write.state_id for write in tx.writes}
        return {
            state_id: 0 if state is None else state.version
            for state_id, state in tx.stored.items()
            if state_id not in written
        }

    def _savepoint_index(self, tx: TransactionRecord, name: str) -> int:
        for index, (existing, _) in enumerate(tx.savepoints):
            if existing == name:
                return index
        raise NotFound(f"no savepoint {name!r}", {"savepoint": name})

    def _info(
        self, transaction_id: str, tx: TransactionRecord, savepoint: str = ""
    ) -> TransactionInfo:
        return TransactionInfo(
            transaction_id=transaction_id,
            writes=len(tx.writes),
            savepoints=[name for name, _ in tx.savepoints],
            savepoint=savepoint,
        )
