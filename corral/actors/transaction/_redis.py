"""Open transactions in Redis, shared by every daemon of a namespace.

Two keys per transaction, in the slot of its own hash tag (so every script below
touches one slot, on a Cluster too)::

    <ns>:{tx:<id>}         hash: version (a counter), record (msgpack, see encode_record);
                           expires after the transaction's idle timeout
    <ns>:{tx:<id>}:idle    "1", kept EXPIRED_REMEMBERED seconds longer: a request after
                           the idle timeout hears why the transaction is gone

Each change is one Lua call that stores the record only if its version is still the
one read (compare-and-set), and restarts both TTLs; ``take`` reads and deletes in one
call, so of two concurrent commits only one gets the writes::

    store = RedisStore("redis://127.0.0.1:6379/0", namespace="corral")
    store.begin("t1", TransactionRecord(idle_timeout=30.0))
    record, version = store.load("t1")
    store.save("t1", record, version)    # False when another daemon saved first
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar, cast

import msgpack

from corral._redis import REDIS_ERRORS, connect, describe, redact
from corral.actors.transaction._store import TransactionRecord, not_open
from corral.errors import BackendUnavailable
from corral.messages.state import StateInfo, StateWrite
from corral.messages.transaction import ISOLATION_LEVELS, IsolationLevel

__all__ = ["EXPIRED_REMEMBERED", "RedisStore", "decode_record", "encode_record"]

T = TypeVar("T")

EXPIRED_REMEMBERED = 3_600.0
"""Seconds an idle-expired transaction is remembered after its timeout."""

RECORD_FORMAT = 1
"""The layout of a stored record; a reader refuses a record of another format."""

# KEYS: record, tombstone. ARGV: record, idle ms, remembered ms.
_BEGIN = """
redis.call('HSET', KEYS[1], 'version', 1, 'record', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', tonumber(ARGV[2]) + tonumber(ARGV[3]))
return 1
"""

# KEYS: record, tombstone. Answers {version, record}, or {0, 1 if expired else 0}.
_LOAD = """
local found = redis.call('HMGET', KEYS[1], 'version', 'record')
if found[1] then return {tonumber(found[1]), found[2]} end
return {0, redis.call('EXISTS', KEYS[2])}
"""

# KEYS: record, tombstone. ARGV: expected version, record, idle ms, remembered ms.
# Answers 1 (saved), 0 (the version moved on), -1 (not open), -2 (expired).
_SAVE = """
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return -1 - redis.call('EXISTS', KEYS[2]) end
if version ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'version', tonumber(version) + 1, 'record', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[4]))
return 1
"""

# KEYS: record, tombstone. Answers {1, record} having deleted both, or {0, expired}.
_TAKE = """
local record = redis.call('HGET', KEYS[1], 'record')
if not record then return {0, redis.call('EXISTS', KEYS[2])} end
redis.call('DEL', KEYS[1], KEYS[2])
return {1, record}
"""


def encode_record(record: TransactionRecord) -> bytes:
    """The record as one msgpack map (messages in their wire form)."""
    fields = {
        "format": RECORD_FORMAT,
        "idle_timeout": record.idle_timeout,
        "writes": [write.to_wire() for write in record.writes],
        "savepoints": [[name, writes] for name, writes in record.savepoints],
        "savepoints_named": record.savepoints_named,
        "stored": {
            state_id: None if state is None else state.to_wire()
            for state_id, state in record.stored.items()
        },
        "isolation_level": record.isolation_level,
    }
    data: bytes = msgpack.packb(fields, use_bin_type=True)
    return data


def decode_record(data: bytes) -> TransactionRecord:
    """The record :func:`encode_record` stored; BackendUnavailable if it is not one."""
    try:
        fields = msgpack.unpackb(data, raw=False)
        if fields["format"] != RECORD_FORMAT:
            raise ValueError(f"format {fields['format']!r}, this reader's is {RECORD_FORMAT}")
        return TransactionRecord(
            idle_timeout=float(fields["idle_timeout"]),
            writes=[
                cast("StateWrite", StateWrite._from_wire(write, f"writes[{i}]"))
                for i, write in enumerate(fields["writes"])
            ],
            savepoints=[(str(name), int(writes)) for name, writes in fields["savepoints"]],
            savepoints_named=int(fields["savepoints_named"]),
            stored={
                str(state_id): None
                if state is None
                else cast("StateInfo", StateInfo._from_wire(state, f"stored.{state_id}"))
                for state_id, state in fields["stored"].items()
            },
            isolation_level=_isolation_level(fields.get("isolation_level", "serializable")),
        )
    except Exception as exc:  # whatever is in Redis, the actor carries on
        raise BackendUnavailable(
            f"a stored transaction cannot be read: {exc}", {"backend": "redis"}
        ) from None


def _isolation_level(value: object) -> IsolationLevel:
    for level in ISOLATION_LEVELS:
        if value == level:
            return level
    raise ValueError(f"isolation_level {value!r} is none of {ISOLATION_LEVELS}")


class RedisStore:
    """Transaction records in Redis; see the module docstring for the keys."""

    kind = "redis"
    sweeps_idle = False

    def __init__(
        self, url: str, *, namespace: str, setting: str = "managers.transaction.redis_url"
    ) -> None:
        self.url = url
        self.namespace = namespace
        # A write is never sent twice (a commit's take must not run again after Redis
        # applied it); a read is retried once, which replaces a connection Redis closed.
        self._writer = connect(url, setting=setting, retries=0)
        self._reader = connect(url, setting=setting, retries=1)
        self._begin = self._writer.register_script(_BEGIN)
        self._save = self._writer.register_script(_SAVE)
        self._take = self._writer.register_script(_TAKE)
        self._load = self._reader.register_script(_LOAD)

    def keys(self, transaction_id: str) -> list[str]:
        """The record's key and its tombstone's."""
        record = f"{self.namespace}:{{tx:{transaction_id}}}"
        return [record, record + ":idle"]

    def begin(self, transaction_id: str, record: TransactionRecord) -> None:
        args: list[bytes | int] = [encode_record(record), *self._ttls(record)]
        self._call(lambda: self._begin(self.keys(transaction_id), args), "begin a transaction")

    def load(self, transaction_id: str) -> tuple[TransactionRecord, int]:
        version, found = self._call(
            lambda: self._load(self.keys(transaction_id)), "read a transaction"
        )
        if not version:
            raise not_open(transaction_id, expired=bool(found))
        return decode_record(found), int(version)

    def save(self, transaction_id: str, record: TransactionRecord, version: int) -> bool:
        args: list[bytes | str | int] = [str(version), encode_record(record), *self._ttls(record)]
        outcome = self._call(
            lambda: self._save(self.keys(transaction_id), args), "store a transaction"
        )
        if outcome < 0:
            raise not_open(transaction_id, expired=outcome == -2)
        return bool(outcome)

    def take(self, transaction_id: str) -> TransactionRecord:
        taken, found = self._call(
            lambda: self._take(self.keys(transaction_id)), "end a transaction"
        )
        if not taken:
            raise not_open(transaction_id, expired=bool(found))
        return decode_record(found)

    def expire_idle(self) -> list[str]:
        """Nothing to do: Redis expires an idle transaction's record by itself."""
        return []

    def open_count(self) -> None:
        """Not counted: every daemon serves the namespace's transactions, and Redis expires
        idle ones by itself."""
        return None

    def close(self) -> None:
        self._writer.close()
        self._reader.close()

    @staticmethod
    def _ttls(record: TransactionRecord) -> list[int]:
        """The record's TTL (its idle timeout) and how much longer its tombstone lives, in ms."""
        return [max(1, math.ceil(record.idle_timeout * 1000)), round(EXPIRED_REMEMBERED * 1000)]

    def _call(self, action: Callable[[], T], what: str) -> T:
        try:
            return action()
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(
                f"cannot {what}: {describe(exc, redact(self.url))}", {"backend": "redis"}
            ) from exc
