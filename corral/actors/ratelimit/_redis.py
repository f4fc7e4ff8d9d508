"""The Redis limiter: one Lua script decides a call, in one round trip.

Each subject (one identifier at one level) owns its keys under one hash tag,
``<namespace>:{rl:<level>:<identifier>}:...``: its ban, its refusal count and one
key per rule. On a single Redis (or Sentinel) one script decides all the
subjects of a call and charges all or none of them. On Redis Cluster
(``per_identity``) a script may only touch one slot, so each subject gets its
own script, all pipelined in the same round trip; when one subject refuses, the
others' charges are given back by a second round trip (refused calls only)::

    limiter = RedisLimiter(corral._redis.connect(url))
    results = limiter.decide(subjects, cost=1, consume=True, policy=BanPolicy())
    limiter.refund(results, cost=1)        # a no-op unless a refused call was charged

Times come from the Redis server (``TIME``), in microseconds, so that processes
with skewed clocks share one timeline.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

from corral._redis import SyncRedis
from corral.actors.ratelimit._memory import BanPolicy, RuleResult, Subject, SubjectResult
from corral.actors.ratelimit._options import Rule

__all__ = ["Call", "RedisLimiter"]

_MICRO = 1_000_000

# One call decides one or more subjects; it charges them all or none.
# KEYS: per subject: ban, refusals, one key per rule.
# ARGV: consume, cost, ban_after, ban_window_ms, ban_duration_ms, then per subject:
#       rule count, pending refusals, then per rule: kind (1 sliding window,
#       2 token bucket), limit, period_us, burst.
# Returns one string of integers separated by spaces (cheaper to parse than an array):
#   now_us, then per subject: banned before (0/1), ban PTTL (-2: none, -1: no end),
#   then per rule: exceeded, remaining, reset_us, retry_us, marker.
CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local consume = ARGV[1] == '1'
local cost = tonumber(ARGV[2])
local out = {now}
local allowed = true
local staged = {}
local subjects = {}
local k, a = 0, 5
while a < #ARGV do
  local nrules, pending = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local subject = {ban = KEYS[k + 1], refusals = KEYS[k + 2], pending = pending,
                   slot = #out + 1, exceeded = false}
  subjects[#subjects + 1] = subject
  local ban = redis.call('PTTL', subject.ban)
  out[#out + 1] = ban ~= -2 and 1 or 0
  out[#out + 1] = ban
  if ban ~= -2 then allowed = false end
  for i = 1, nrules do
    local key = KEYS[k + 2 + i]
    local r = a + 2 + (i - 1) * 4
    local kind, limit = tonumber(ARGV[r + 1]), tonumber(ARGV[r + 2])
    local period, burst = tonumber(ARGV[r + 3]), tonumber(ARGV[r + 4])
    local exceeded, remaining, reset, retry, marker = 0, 0, 0, 0, 0
    if ban ~= -2 then
      -- banned: the rules are neither read nor charged
    elseif kind == 1 then
      local index = math.floor(now / period)
      local s = redis.call('HMGET', key, 'w', 'c', 'p')
      local w = tonumber(s[1])
      local current, previous = 0, 0
      if w == index then
        current, previous = tonumber(s[2]), tonumber(s[3])
      elseif w == index - 1 then
        previous = tonumber(s[2])
      end
      local start = index * period
      local count = previous * (1 - (now - start) / period) + current
      if count + cost <= limit + 1e-9 then
        remaining = math.floor(limit - count - cost + 1e-9)
        reset = start + 2 * period
        marker = index
        staged[#staged + 1] = {1, key, index, current + cost, previous, reset - now}
      else
        exceeded = 1
        local need = limit - cost - current
        local retry_at = now + period
        if need >= 0 and previous > 0 then
          retry_at = start + period * (1 - need / previous)
        elseif cost <= limit and current > 0 then
          retry_at = start + period + period * (1 - (limit - cost) / current)
        end
        retry = math.max(0, math.ceil(retry_at - now))
        remaining = math.max(0, math.floor(limit - count + 1e-9))
        reset = start + period
        if current > 0 then reset = reset + period end
      end
    else
      local interval = period / limit
      local tolerance = burst * interval
      local start = now
      local tat = tonumber(redis.call('GET', key))
      if tat and tat > now then start = tat end
      local new_tat = start + cost * interval
      local allow_at = new_tat - tolerance
      if allow_at <= now + 1e-3 then
        remaining = math.floor((now - allow_at) / interval + 1e-9)
        reset = new_tat
        staged[#staged + 1] = {2, key, new_tat}
      else
        exceeded = 1
        retry = math.ceil(allow_at - now)
        remaining = math.max(0, math.floor((now - start + tolerance) / interval + 1e-9))
        reset = start
      end
    end
    if exceeded == 1 then
      allowed = false
      subject.exceeded = true
    end
    out[#out + 1] = exceeded
    out[#out + 1] = remaining
    out[#out + 1] = reset
    out[#out + 1] = retry
    out[#out + 1] = marker
  end
  k = k + 2 + nrules
  a = a + 2 + nrules * 4
end
if consume and allowed then
  for _, s in ipairs(staged) do
    if s[1] == 1 then
      redis.call('HSET', s[2], 'w', s[3], 'c', s[4], 'p', s[5])
      redis.call('PEXPIRE', s[2], math.ceil(s[6] / 1000) + 1000)
    else
      redis.call('SET', s[2], string.format('%.0f', s[3]),
                 'PX', math.ceil((s[3] - now) / 1000) + 1000)
    end
  end
end
local ban_after = tonumber(ARGV[3])
if consume and ban_after > 0 then
  for _, subject in ipairs(subjects) do
    local refused = subject.pending
    if subject.exceeded then refused = refused + 1 end
    if refused > 0 then
      local n = redis.call('INCRBY', subject.refusals, refused)
      if n == refused then redis.call('PEXPIRE', subject.refusals, ARGV[4]) end
      if n >= ban_after then
        redis.call('DEL', subject.refusals)
        local duration = tonumber(ARGV[5])
        if duration > 0 then
          redis.call('SET', subject.ban, 'auto', 'PX', duration)
          out[subject.slot + 1] = duration
        else
          redis.call('SET', subject.ban, 'auto')
          out[subject.slot + 1] = -1
        end
      end
    end
  end
end
for i = 1, #out do out[i] = string.format('%.0f', out[i]) end
return table.concat(out, ' ')
"""

# KEYS: the rule keys a check charged. ARGV: cost, then per rule: kind, marker, interval_us.
REFUND = """
local cost = tonumber(ARGV[1])
for i = 1, #KEYS do
  local a = 1 + (i - 1) * 3
  local kind, marker = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if kind == 1 then
    local w = tonumber(redis.call('HGET', KEYS[i], 'w'))
    if w == marker then
      redis.call('HINCRBY', KEYS[i], 'c', -cost)
    elseif w == marker + 1 then
      redis.call('HINCRBY', KEYS[i], 'p', -cost)
    end
  else
    local tat = tonumber(redis.call('GET', KEYS[i]))
    if tat then
      local back = tat - cost * tonumber(ARGV[a + 3])
      redis.call('SET', KEYS[i], string.format('%.0f', back), 'KEEPTTL')
    end
  end
end
return 1
"""


class RedisLimiter:
    """Decides with the scripts above; raises redis errors for the manager to handle.

    ``per_identity`` (always on a Redis Cluster): one script per subject, pipelined
    in one round trip per node, and a second round trip to refund the subjects a
    refused call charged. Otherwise one script decides every subject of a call
    atomically.
    """

    def __init__(self, client: SyncRedis, *, per_identity: bool = False) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        self.per_identity = per_identity or self.cluster
        self.check_sha = ""
        self.refund_sha = ""

    def load(self) -> None:
        self.check_sha = str(self.client.script_load(CHECK))
        self.refund_sha = str(self.client.script_load(REFUND))

    def decide(
        self,
        subjects: Sequence[Subject],
        *,
        cost: int,
        consume: bool,
        policy: BanPolicy,
        pending_refusals: Mapping[str, int] | None = None,
    ) -> list[SubjectResult]:
        """Decide one call; see :meth:`decide_many`."""
        call = Call(subjects, cost, pending_refusals or {})
        return self.decide_many([call], consume=consume, policy=policy)[0]

    def decide_many(
        self, calls: Sequence[Call], *, consume: bool, policy: BanPolicy
    ) -> list[list[SubjectResult]]:
        """Decide several calls in one round trip, in order, each as if on its own."""
        commands: list[_Command] = []
        groups: list[tuple[int, list[Subject]]] = []  # (index of the call, its subjects)
        for index, call in enumerate(calls):
            head = _bulks(
                "1" if consume else "0",
                call.cost,
                policy.after,
                max(1, math.ceil(policy.window * 1000)),
                math.ceil(policy.duration * 1000),
            )
            if not call.subjects:
                continue
            subjects = list(call.subjects)
            for group in [[s] for s in subjects] if self.per_identity else [subjects]:
                keys = [key for s in group for key in (s.ban_key, s.refusals_key, *s.rule_keys)]
                args = [head]
                for s in group:
                    args.append(_bulks(len(s.rules), call.pending_refusals.get(s.key, 0)))
                    args += [_rule_bulks(rule) for rule in s.rules]
                count = len(keys) + 5 + sum(2 + 4 * len(s.rules) for s in group)
                commands.append(_Command(len(keys), count, _bulks(*keys) + b"".join(args), keys[0]))
                groups.append((index, group))
        replies = self._run(self.check_sha, CHECK, commands) if commands else []
        results: list[list[SubjectResult]] = [[] for _ in calls]
        for (index, group), reply in zip(groups, replies, strict=True):
            results[index] += _results(group, [int(v) for v in reply.split()], consume)
        return results

    def refund(self, results: Sequence[SubjectResult], *, cost: int) -> None:
        """Give back what ``decide`` charged to the subjects of a call that was refused."""
        commands = []
        for result in results:
            if not result.charged or not result.rules:
                continue
            args: list[Any] = [cost]
            for verdict in result.rules:
                rule = verdict.rule
                kind = 2 if rule.algorithm == "token_bucket" else 1
                args += [kind, verdict.marker, repr(rule.period * _MICRO / rule.limit)]
            keys = result.subject.rule_keys
            commands.append(
                _Command(len(keys), len(keys) + len(args), _bulks(*keys, *args), keys[0])
            )
            result.charged = False
        if commands:
            self._run(self.refund_sha, REFUND, commands)

    def ban(self, subject: Subject, duration: float) -> None:
        if duration > 0:
            self.client.set(subject.ban_key, "manual", px=max(1, math.ceil(duration * 1000)))
        else:
            self.client.set(subject.ban_key, "manual")

    def unban(self, subject: Subject) -> int:
        return int(self.client.delete(subject.ban_key, subject.refusals_key))

    def reset(self, keys: Sequence[str]) -> int:
        # One DEL per key: each key may hash to its own slot.
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.delete(key)
        return sum(int(n) for n in pipe.execute())

    def _run(self, sha: str, source: str, commands: list[_Command]) -> list[Any]:
        """EVALSHA each command, pipelined; reload the scripts once if Redis forgot them."""
        try:
            return self._evalsha(sha, commands)
        except NoScriptError:
            self.load()
            return self._evalsha(self.check_sha if source is CHECK else self.refund_sha, commands)

    def _evalsha(self, sha: str, commands: list[_Command]) -> list[Any]:
        if not isinstance(self.client, RedisCluster):
            return _evalsha_on(self.client.connection_pool, sha, commands)
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for index, command in enumerate(commands):
            node = self.client.get_node_from_key(command.slot_key)  # type: ignore[no-untyped-call]
            by_node.setdefault(node.name, (node, []))[1].append(index)
        replies: list[Any] = [None] * len(commands)
        for node, indexes in by_node.values():
            pool = self.client.get_redis_connection(node).connection_pool
            for index, reply in zip(
                indexes, _evalsha_on(pool, sha, [commands[i] for i in indexes]), strict=True
            ):
                replies[index] = reply
        return replies


def _evalsha_on(pool: redis.ConnectionPool, sha: str, commands: list[_Command]) -> list[Any]:
    # Packed here and sent straight on one connection: redis-py's packing and its
    # Pipeline cost more Python than the Redis work, and this is every check's path.
    evalsha = b"$7\r\nEVALSHA\r\n" + _bulks(sha)
    packed = b"".join(
        b"*%d\r\n%s%s%s" % (3 + c.count, evalsha, _bulks(c.keys), c.body) for c in commands
    )
    connection = pool.get_connection()
    try:
        connection.send_packed_command([packed])  # type: ignore[no-untyped-call]
        replies: list[Any] = []
        failure: redis.ResponseError | None = None
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except redis.ResponseError as exc:  # read every reply before raising
                failure = failure or exc
        if failure is not None:
            raise failure
        return replies
    except (redis.ConnectionError, redis.TimeoutError):
        connection.disconnect()  # type: ignore[no-untyped-call]  # replies may be in flight
        raise
    finally:
        pool.release(connection)


@dataclass(frozen=True)
class Call:
    """One call to decide: its subjects, its cost, refusals owed by its subjects."""

    subjects: Sequence[Subject]
    cost: int
    pending_refusals: Mapping[str, int]


@dataclass(frozen=True)
class _Command:
    """One EVALSHA: its number of keys, of arguments after that number, and those packed;
    ``slot_key`` is one of its keys (they share a cluster slot)."""

    keys: int
    count: int
    body: bytes
    slot_key: str


def _bulks(*values: str | int) -> bytes:
    """Values as RESP bulk strings."""
    out = []
    for value in values:
        data = value.encode() if isinstance(value, str) else b"%d" % value
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


@functools.lru_cache(maxsize=1024)
def _rule_bulks(rule: Rule) -> bytes:
    """A rule's script arguments, packed once: kind, limit, period_us, burst."""
    kind = 2 if rule.algorithm == "token_bucket" else 1
    return _bulks(kind, rule.limit, round(rule.period * _MICRO), rule.burst)


def _results(group: list[Subject], reply: list[Any], consume: bool) -> list[SubjectResult]:
    """Parse one script's reply; it charged its subjects when none was banned or exceeded."""
    now_us = int(reply[0])
    at = 1
    results = []
    for subject in group:
        banned_before, ban = int(reply[at]), int(reply[at + 1])
        at += 2
        result = SubjectResult(subject)
        if ban != -2:
            result.banned = True
            result.ban_until = None if ban == -1 else (now_us / _MICRO + ban / 1000)
        for rule in subject.rules:
            exceeded, remaining, reset, retry, marker = (int(v) for v in reply[at : at + 5])
            at += 5
            if not banned_before:
                result.rules.append(
                    RuleResult(
                        rule,
                        remaining=remaining,
                        reset=reset / _MICRO,
                        retry_after=retry / _MICRO,
                        exceeded=bool(exceeded),
                        marker=marker,
                    )
                )
        results.append((result, banned_before))
    # An auto-ban set by this very call does not undo its charge (the manager refunds).
    charged = consume and not any(
        before or any(r.exceeded for r in result.rules) for result, before in results
    )
    for result, _ in results:
        result.charged = charged
    return [result for result, _ in results]
