"""The Redis state backend: one Lua script call per change (or per commit).

The script checks every write's transition and expected version first, then
applies them all: writes the state hashes, appends to each capped history,
bumps the versions, and appends each event to the capped event stream under
the next offset. Atomic, one round trip, no WATCH retries.

States are spread over ``partitions`` partitions (``partition_of``: by the hash of
the id's hash tag, else of the id). The keys of partition ``p`` share the hash tag
``{state:p}``, so one script may touch several states of a partition and its ordered
event stream, and on Redis Cluster the partitions spread over the masters::

    <ns>:{state:p}:s:<id>     hash: type status data version allowed created updated [expires]
    <ns>:{state:p}:h:<id>     list: the state's latest events (msgpack StateChanged bodies)
    <ns>:{state:p}:events     a durable stream (corral.streams) with the partition's changes
    <ns>:{state:p}:events:meta  hash: offset (the last one given), epoch
    <ns>:{state:p}:expiry     sorted set: state id by expiry time (unix ms)

With signing keys, every stream entry carries its signature (see :mod:`corral.streams`).
Redis cannot sign (the key never goes to Redis), so a change takes two script calls:
the first checks the writes and answers the events it would append, the second
applies them with their signatures if they are still those events, else answers the
new ones to sign (another write of the partition came between)::

    backend = RedisBackend("redis://localhost:6379/0", namespace="corral",
                           history_limit=100, stream_max_len=100_000, partitions=16,
                           signing_keys=[b"secret"])
"""

from __future__ import annotations

import functools
import hashlib
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar, cast

import msgpack
from redis.cluster import RedisCluster

from corral._redis import REDIS_ERRORS, connect, glob_escape
from corral._statemachine import read_conflict, status_conflict, undeclared_transition
from corral.errors import BackendUnavailable, ConfigError, Conflict, InvalidMessage, NotFound
from corral.messages.signing import Signer
from corral.messages.state import (
    KEEP,
    REMOVE,
    TRANSITION_RULES,
    StateChanged,
    StateInfo,
    StateMachine,
    StateWrite,
    TransitionRule,
)
from corral.streams import (
    events_stream_key,
    meta_key,
    partition_of,
    partition_prefix,
    partitions_key,
    signed_parts,
)

__all__ = ["RedisBackend", "decode_event"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_CONNECT_TIMEOUT = 2.0
_SOCKET_TIMEOUT = 5.0
_EXPIRE_BATCH = 100
_NONE = "~"  # "not given" in the script's arguments (every given value is non-empty or "\x80")
_APPLIED, _TO_SIGN = 1, 2  # the script's answers besides a refusal (0)
_SIGN_ATTEMPTS = 10  # commits of a signed change, each after another write came between


def _lua_rules(rules: dict[str, TransitionRule]) -> str:
    entries = []
    for name, rule in rules.items():
        sources = "," + ",".join(sorted(rule.sources)) + "," if rule.sources else ""
        entries.append(f'["{name}"] = {{"{sources}", "{rule.target}"}}')
    return "{" + ", ".join(entries) + "}"


def _lua_machines(machines: dict[str, StateMachine]) -> str:
    """The declared machines as a Lua table: initial status, allowed list, rules (the names
    are checked snake_case and the types [A-Za-z0-9_-], so they need no escaping)."""
    entries = [
        f'["{state_type}"] = {{initial = "{machine.initial}", '
        f'allowed = "{",".join(machine.names())}", rules = {_lua_rules(machine.rules())}}}'
        for state_type, machine in machines.items()
    ]
    return "{" + ", ".join(entries) + "}"


# ARGV: now_ms, epoch_candidate, history_limit, stream_max_len, n, partition, then 7 per write:
# state_id, transition, state_type, data, expected_version, ttl_ms, allowed (or "~"), then r,
# the number of reads, and per read its state_id and the version it was read at (0: absent),
# then the mode: "" (apply), "prepare" (apply nothing: answer the events' bodies, topics,
# first offset and epoch, for signing) or "commit" followed by a SHA-1 (hex) and a signature
# per event (apply, the signatures in the stream entries, if the events are still those; else
# answer as "prepare" does).
# A write whose transition is "" only expires its state if due (the TTL sweep).
# KEYS: meta, stream, expiry, then per write: state hash, history list, then per read: its hash.
# Answers {0, code, write (or read) index, a, b} for a refusal, {1, events, states, reset} when
# applied (reset = 1: the stream held an entry at or past the next offset, which this script did not
# write, and a new epoch began), {2, events, topics, offset before the first, epoch} to sign.
_APPLY = """
local RULES = __RULES__
local MACHINES = __MACHINES__
local KEEP, REMOVE = "__KEEP__", "__REMOVE__"
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[5])
local current = {}   -- state id -> state table, or false when absent
local last = {}      -- state id -> the version a removed state had (its tombstone)
local changes = {}   -- {id, key index, transition, before, after}
local results = {}

local function load(id, k)
  if current[id] ~= nil then return current[id] end
  local h = redis.call("HGETALL", KEYS[k])
  local s = false
  if #h > 0 then
    s = {}
    for j = 1, #h, 2 do s[h[j]] = h[j + 1] end
    s.version = tonumber(s.version)
    if s.tombstone then
      -- A removed state's last version: one created again under its id goes on from it.
      last[id] = s.version
      s = false
      current[id] = s
      return s
    end
    if s.expires and tonumber(s.expires) <= now then
      local after = {}
      for f, v in pairs(s) do after[f] = v end
      after.version = s.version + 1
      after.status = "expired"
      after.removed = true
      changes[#changes + 1] = {id, k, "expire", s, after}
      last[id] = after.version
      s = false
    end
  end
  current[id] = s
  return s
end

local r = tonumber(ARGV[7 + 7 * n])
for j = 1, r do
  local read = 7 + 7 * n + 2 * j
  local found = redis.call("HMGET", KEYS[3 + 2 * n + j], "version", "expires", "tombstone")
  local actual = 0
  if found[1] and not found[3] and not (found[2] and tonumber(found[2]) <= now) then
    actual = tonumber(found[1])
  end
  if actual ~= tonumber(ARGV[read]) then return {0, "read", j, ARGV[read], tostring(actual)} end
end

for i = 1, n do
  local a = 6 + (i - 1) * 7
  local id, tr, stype, data = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local expected, ttl, allowed = ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
  local k = 3 + 2 * i - 1
  local s = load(id, k)
  if tr ~= "" then
    local after
    if not s then
      if tr ~= "create" then return {0, "not_found", i, "", ""} end
      if expected ~= "~" and tonumber(expected) ~= 0 then
        return {0, "version", i, expected, "0"}
      end
      if allowed == "~" then allowed = "__STANDARD__" end
      if data == "~" then data = "\\128" end
      local status = RULES["create"][2]
      local m = MACHINES[stype]
      if m then status, allowed = m.initial, m.allowed end
      after = {type = stype, status = status, data = data, version = (last[id] or 0) + 1,
               allowed = allowed, created = tostring(now)}
    else
      if tr == "create" then return {0, "exists", i, "", ""} end
      if expected ~= "~" and tonumber(expected) ~= s.version then
        return {0, "version", i, expected, tostring(s.version)}
      end
      local m = MACHINES[s.type]
      local rule
      if m then
        rule = m.rules[tr]
        if not rule then return {0, "undeclared", i, s.status, s.type} end
      else
        local listed = string.find("," .. s.allowed .. ",", "," .. tr .. ",", 1, true)
        if tr ~= "expire" and not listed then
          return {0, "not_allowed", i, s.allowed, ""}
        end
        rule = RULES[tr] or {"", KEEP}
      end
      if rule[1] ~= "" and not string.find(rule[1], "," .. s.status .. ",", 1, true) then
        return {0, "status", i, s.status, rule[1]}
      end
      after = {}
      for f, v in pairs(s) do after[f] = v end
      after.version = s.version + 1
      if rule[2] == REMOVE then
        after.removed = true
        after.status = (tr == "expire") and "expired" or "deleted"
      elseif rule[2] ~= KEEP then
        after.status = rule[2]
      end
      if data ~= "~" then after.data = data end
    end
    after.updated = tostring(now)
    if ttl ~= "~" then after.expires = tostring(now + tonumber(ttl)) end
    changes[#changes + 1] = {id, k, tr, s, after}
    current[id] = (not after.removed) and after or false
    if after.removed then last[id] = after.version end
    results[#results + 1] = {after.status, after.type, after.data, after.version, after.allowed,
                             after.created, after.updated, after.expires or ""}
  end
end

if #changes == 0 then return {1, {}, results, 0} end
local epoch = redis.call("HGET", KEYS[1], "epoch")
local base = tonumber(redis.call("HGET", KEYS[1], "offset") or "0")
local reset = 0
if epoch then
  local top = redis.call("XREVRANGE", KEYS[2], "+", "-", "COUNT", 1)[1]
  if top and tonumber(string.match(top[1], "^%d+")) > base then reset = 1 end
end
local renew = (not epoch) or reset == 1
if renew then
  -- A new epoch: offsets start again at 1, so a stream left from the old one goes.
  epoch = ARGV[2]
  base = 0
end
local events, topics = {}, {}
for c = 1, #changes do
  local id, k, tr, before, after = unpack(changes[c])
  local new = after.removed and "\\192" or after.data
  local old = before and before.data or "\\192"
  events[c] = "\\140" .. cmsgpack.pack("state_id", id, "state_type", after.type,
      "transition", tr, "old") .. old .. cmsgpack.pack("new") .. new ..
      cmsgpack.pack("version", after.version, "offset", base + c, "epoch", epoch, "ts", now,
                    "status", after.status, "partition", tonumber(ARGV[6]),
                    "previous_status", before and before.status or "")
  topics[c] = "state.changed." .. after.type .. "." .. id
end
local mode = ARGV[8 + 7 * n + 2 * r] or ""
local proofs = 9 + 7 * n + 2 * r
if mode == "prepare" then return {2, events, topics, base, epoch} end
if mode == "commit" then
  for c = 1, #changes do
    if redis.sha1hex(events[c]) ~= ARGV[proofs + 2 * (c - 1)] then
      return {2, events, topics, base, epoch}
    end
  end
end
if renew then
  redis.call("DEL", KEYS[2])
  redis.call("HSET", KEYS[1], "epoch", epoch)
end
redis.call("HSET", KEYS[1], "offset", base + #changes)
local limit, maxlen = tonumber(ARGV[3]), ARGV[4]
for c = 1, #changes do
  local id, k, tr, before, after = unpack(changes[c])
  local body = events[c]
  if mode == "commit" then
    redis.call("XADD", KEYS[2], "MAXLEN", maxlen, (base + c) .. "-0", "topic", topics[c],
               "type", "state.changed", "v", "1", "epoch", epoch, "body", body,
               "s", ARGV[proofs + 2 * c - 1])
  else
    redis.call("XADD", KEYS[2], "MAXLEN", maxlen, (base + c) .. "-0", "topic", topics[c],
               "type", "state.changed", "v", "1", "epoch", epoch, "body", body)
  end
  if after.removed then
    redis.call("DEL", KEYS[k], KEYS[k + 1])
    redis.call("HSET", KEYS[k], "version", after.version, "tombstone", "1")
    redis.call("PEXPIRE", KEYS[k], __TOMBSTONE_MS__)
    redis.call("ZREM", KEYS[3], id)
    last[id] = after.version
  else
    if not before then redis.call("DEL", KEYS[k]) end  -- created: over a tombstone, maybe
    redis.call("RPUSH", KEYS[k + 1], body)
    redis.call("LTRIM", KEYS[k + 1], -limit, -1)
    redis.call("HSET", KEYS[k], "type", after.type, "status", after.status, "data", after.data,
               "version", after.version, "allowed", after.allowed, "created", after.created,
               "updated", after.updated)
    if after.expires then
      redis.call("HSET", KEYS[k], "expires", after.expires)
      redis.call("ZADD", KEYS[3], after.expires, id)
    end
  end
end
return {1, events, results, reset}
"""


def _apply_script(machines: dict[str, StateMachine], tombstone_ttl: float) -> str:
    standard = ",".join(TRANSITION_RULES)
    return (
        _APPLY.replace("__RULES__", _lua_rules(TRANSITION_RULES))
        .replace("__TOMBSTONE_MS__", str(max(1, int(tombstone_ttl * 1000))))
        .replace("__MACHINES__", _lua_machines(machines))
        .replace("__KEEP__", KEEP)
        .replace("__REMOVE__", REMOVE)
        .replace("__STANDARD__", standard)
    )


def _unpack(blob: bytes) -> Any:
    return msgpack.unpackb(blob, raw=False)


def decode_event(body: bytes) -> StateChanged:
    """A StateChanged from the msgpack body the script stored (history, stream)."""
    return StateChanged(**_unpack(body))


class RedisBackend:
    """States in Redis; see the module docstring for the keys."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        namespace: str,
        history_limit: int,
        stream_max_len: int,
        partitions: int = 1,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        signing_keys: tuple[bytes, ...] = (),
        machines: dict[str, StateMachine] | None = None,
        tombstone_ttl: float,
    ) -> None:
        self.url = url
        self.machines = machines or {}
        self.signer = Signer(signing_keys)
        self.history_limit = history_limit
        self.stream_max_len = stream_max_len
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = max(1, round(wait_timeout * 1000))
        self.namespace = namespace
        self.partitions = partitions
        self._recorded = False
        options: dict[str, Any] = {
            "setting": "managers.state.redis_url",
            "connect_timeout": _CONNECT_TIMEOUT,
            "socket_timeout": _SOCKET_TIMEOUT,
        }
        # A write is never retried: a reply lost after Redis applied it must not apply
        # twice. Reads are retried once, which replaces a connection Redis closed.
        self._writer = connect(url, retries=0, **options)
        self._reader = connect(url, retries=1, **options)
        self._script = self._writer.register_script(_apply_script(self.machines, tombstone_ttl))

    def _key(self, kind: str, state_id: str) -> str:
        return partition_prefix(self.namespace, self._partition(state_id)) + kind + state_id

    def _partition(self, state_id: str) -> int:
        return partition_of(state_id, self.partitions)

    def _fixed_keys(self, partition: int) -> list[str]:
        stream = events_stream_key(self.namespace, partition)
        return [meta_key(stream), stream, partition_prefix(self.namespace, partition) + "expiry"]

    def apply(
        self, writes: list[StateWrite], now_ms: int, reads: dict[str, int] | None = None
    ) -> tuple[list[StateChanged], list[StateInfo]]:
        reads = reads or {}
        touched = [w.state_id for w in writes] + list(reads)
        partition = self._partition(touched[0])
        for state_id in touched[1:]:
            if self._partition(state_id) != partition:
                raise InvalidMessage(
                    f"states {touched[0]!r} (partition {partition}) and "
                    f"{state_id!r} (partition {self._partition(state_id)}) "
                    "cannot be in one commit (written, or read by a serializable "
                    "transaction): a commit spans one partition; give states that change "
                    "together the same hash tag, e.g. 'order:{42}:items' and "
                    "'order:{42}:total'",
                    {"partitions": [partition, self._partition(state_id)]},
                    path="reads" if state_id in reads else "writes",
                )
        if not self._recorded:
            self.record_partitions()
        keys = self._fixed_keys(partition)
        args: list[Any] = [now_ms, uuid.uuid4().hex[:12], self.history_limit]
        args += [self.stream_max_len, len(writes), partition]
        for write in writes:
            keys += [self._key("s:", write.state_id), self._key("h:", write.state_id)]
            args += [
                write.state_id,
                write.transition,
                write.state_type,
                _NONE if write.data is None else _pack(write.data),
                _NONE if write.expected_version is None else write.expected_version,
                _NONE if write.ttl is None else int(write.ttl * 1000),
                _NONE if write.allowed_transitions is None else ",".join(
                    write.allowed_transitions
                ),
            ]  # fmt: skip
        read_ids = list(reads)
        args.append(len(read_ids))
        for state_id in read_ids:
            keys.append(self._key("s:", state_id))
            args += [state_id, reads[state_id]]
        answer, acknowledged = self._call(lambda: self._run(keys, args), "apply a state change")
        if answer[0] == 0:
            _, code, index, a, b = answer
            if code == b"read":
                raise read_conflict(read_ids[index - 1], int(a), int(b))
            write = writes[index - 1]
            if code == b"undeclared":
                machine = self.machines[b.decode()]
                raise undeclared_transition(write.state_id, write.transition, a.decode(), machine)
            raise _refusal(code.decode(), write, a.decode(), b.decode())
        if answer[3]:
            log.warning(
                "state partition %d: its event stream held an entry at or past the next "
                "offset that corral did not write; its events start again in a new epoch",
                partition,
            )
        try:
            _, bodies, results, _reset = answer
            events = [decode_event(body) for body in bodies]
            states = [
                _state_info(write.state_id, result)
                for write, result in zip([w for w in writes if w.transition], results, strict=True)
            ]
        except Exception as exc:  # the change is stored: say so, never crash the actor
            raise BackendUnavailable(
                f"the change was applied but its answer could not be read: {exc!r}"
            ) from None
        if self.wait_replicas and events and acknowledged < self.wait_replicas:
            raise BackendUnavailable(
                f"the change was applied on the master, but only {acknowledged} of "
                f"{self.wait_replicas} replicas acknowledged it within "
                f"{self.wait_timeout_ms} ms: it may not survive a failover",
                {"applied": True, "replicas": acknowledged, "wait_replicas": self.wait_replicas},
            )
        return events, states

    def _run(self, keys: list[str], args: list[Any]) -> tuple[Any, int]:
        """The script's answer to a change, and how many replicas have it (when waited
        for). Signed in two calls or more when there are keys: see the module docstring."""
        if not self.signer.signing:
            return self._commit(keys, args)
        answer, acknowledged = self._script(keys, [*args, "prepare"]), 0
        attempts = 0
        while answer[0] == _TO_SIGN:
            if attempts == _SIGN_ATTEMPTS:
                raise BackendUnavailable(
                    f"other writes to the partition came between each of {attempts} "
                    "attempts to sign this change's events: not applied",
                    {"backend": "redis", "stream": keys[1]},
                )
            attempts += 1
            proofs = self._proofs(keys[1], answer)
            answer, acknowledged = self._commit(keys, [*args, "commit", *proofs])
        return answer, acknowledged

    def _commit(self, keys: list[str], args: list[Any]) -> tuple[Any, int]:
        if self.wait_replicas:
            return self._apply_and_wait(keys, args)
        return self._script(keys, args), 0

    def _proofs(self, stream: str, prepared: list[Any]) -> list[Any]:
        """A SHA-1 (hex) and a signature for each event of a prepared change."""
        _, bodies, topics, base, epoch = prepared
        proofs: list[Any] = []
        for offset, (body, topic) in enumerate(zip(bodies, topics, strict=True), base + 1):
            fields = {
                b"epoch": epoch, b"topic": topic, b"type": b"state.changed", b"v": b"1",
                b"body": body,
            }  # fmt: skip
            signature = self.signer.sign(*signed_parts(stream, offset, fields))
            proofs += [hashlib.sha1(body, usedforsecurity=False).hexdigest(), signature]
        return proofs

    def _apply_and_wait(self, keys: list[str], args: list[Any]) -> tuple[Any, int]:
        """The script, then WAIT, on one connection: WAIT counts the replicas that have
        the writes of the connection it is sent on. On a cluster, that of the master
        owning the state slot."""
        client: Any = self._writer
        if isinstance(client, RedisCluster):
            node = client.get_node_from_key(keys[0])  # type: ignore[no-untyped-call]
            client = client.get_redis_connection(node)
        with client.pipeline(transaction=False) as pipe:
            self._script(keys, args, client=pipe)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            answer, acknowledged = pipe.execute()
        return answer, int(acknowledged)

    def get(self, state_id: str, now_ms: int) -> StateInfo:
        fields = self._call(lambda: self._reader.hgetall(self._key("s:", state_id)), "read a state")
        expires = fields.get(b"expires")
        gone = not fields or b"tombstone" in fields
        if gone or (expires is not None and int(expires) <= now_ms):
            raise NotFound(f"no state {state_id!r}", {"state_id": state_id})
        return _state_info(
            state_id,
            [fields[f] for f in (b"status", b"type", b"data", b"version", b"allowed")]
            + [fields[b"created"], fields[b"updated"], expires or b""],
        )

    def history(self, state_id: str, limit: int) -> list[StateChanged]:
        bodies: list[bytes] = self._call(
            lambda: cast(
                "list[bytes]",
                self._reader.lrange(self._key("h:", state_id), -limit, -1),
            ),
            "read a state's history",
        )
        if not bodies:
            raise NotFound(f"no history of state {state_id!r}", {"state_id": state_id})
        return [decode_event(body) for body in bodies]

    def expire_due(self, now_ms: int) -> list[StateChanged]:
        events: list[StateChanged] = []
        for partition in range(self.partitions):
            due = self._call(
                functools.partial(self._due, self._fixed_keys(partition)[2], now_ms),
                "find expired states",
            )
            if due:
                sweeps = [StateWrite(state_id=item.decode(), transition="") for item in due]
                events += self.apply(sweeps, now_ms)[0]
        return events

    def _due(self, expiry: str, now_ms: int) -> list[bytes]:
        return cast(
            "list[bytes]",
            self._reader.zrangebyscore(expiry, "-inf", now_ms, start=0, num=_EXPIRE_BATCH),
        )

    def state_ids(self, state_type: str) -> list[str]:
        def walk() -> list[str]:
            found = []
            for partition in range(self.partitions):
                prefix = partition_prefix(self.namespace, partition) + "s:"
                keys = list(self._reader.scan_iter(match=glob_escape(prefix) + "*", count=1000))
                if not keys:
                    continue
                with self._reader.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.hget(key, "type")
                    types = pipe.execute()
                found += [
                    key.decode()[len(prefix) :]
                    for key, found_type in zip(keys, types, strict=True)
                    if found_type == state_type.encode()
                ]
            return found

        return self._call(walk, "list states")

    def record_partitions(self) -> None:
        """Record the partition count for subscribers; ConfigError if another one is."""
        key = partitions_key(self.namespace)
        recorded = self._call(
            lambda: self._writer.set(key, self.partitions, nx=True, get=True),
            "record the partition count",
        )
        if recorded is not None and int(recorded) != self.partitions:
            raise ConfigError(
                f"managers.state.partitions: {self.partitions}, but the states of namespace "
                f"{self.namespace!r} are in {int(recorded)} partitions already (a state "
                "would be looked for in the wrong one): use that count",
                {"recorded": int(recorded)},
            )
        self._recorded = True

    def close(self) -> None:
        self._writer.close()
        self._reader.close()

    def _call(self, action: Callable[[], T], what: str) -> T:
        try:
            return action()
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(
                f"cannot {what}: Redis at {self.url.rpartition('@')[2]} is unavailable ({exc})",
                {"backend": "redis"},
            ) from exc


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _state_info(state_id: str, fields: list[Any]) -> StateInfo:
    status, state_type, data, version, allowed, created, updated, expires = fields
    allowed_text = allowed.decode()
    return StateInfo(
        state_id=state_id,
        state_type=state_type.decode(),
        status=status.decode(),
        data=_unpack(data),
        version=int(version),
        allowed_transitions=allowed_text.split(",") if allowed_text else [],
        created_at=int(created),
        updated_at=int(updated),
        expires_at=int(expires) if expires else None,
    )


def _refusal(code: str, write: StateWrite, a: str, b: str) -> Exception:
    """The same errors as :func:`corral._statemachine.apply_transition` raises."""
    state_id = write.state_id
    if code == "not_found":
        return NotFound(f"no state {state_id!r}", {"state_id": state_id})
    if code == "exists":
        return Conflict(f"state {state_id!r} exists", {"state_id": state_id})
    if code == "version":
        return Conflict(
            f"state {state_id!r} is at version {b}, not {a}",
            {"state_id": state_id, "expected_version": int(a), "version": int(b)},
        )
    if code == "not_allowed":
        return Conflict(
            f"transition {write.transition!r} is not allowed for state {state_id!r}",
            {"state_id": state_id, "transition": write.transition,
             "allowed": a.split(",") if a else []},
        )  # fmt: skip
    return status_conflict(state_id, write.transition, a, b.strip(",").split(","))
