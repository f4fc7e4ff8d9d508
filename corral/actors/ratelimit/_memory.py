"""The in-memory limiter: the embedded default, and the local fallback when Redis is down.

It decides exactly like the Redis scripts (same sliding window counter, same
GCRA), but only for this process::

    limiter = MemoryLimiter()
    [result] = limiter.decide([subject], cost=1, consume=True, policy=BanPolicy())
    result.allowed, result.rules[0].remaining
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from corral.actors.ratelimit._options import Rule

__all__ = ["BanPolicy", "MemoryLimiter", "RuleResult", "Subject", "SubjectResult"]

_EPSILON = 1e-9
_SWEEP_EVERY = 10_000


@dataclass(frozen=True)
class BanPolicy:
    """Auto-ban: ``after`` refusals within ``window`` seconds ban for ``duration`` (0: no end)."""

    after: int = 0
    window: float = 60.0
    duration: float = 300.0


@dataclass(frozen=True)
class Subject:
    """One identifier of a call at one level, with the rules that apply to it and their keys.

    ``key`` is the identifier's key prefix; every key of the subject starts with it
    and so shares its hash tag (``corral:{rl:ip:10.0.0.7}``).
    """

    level: str
    identifier: str
    key: str
    rules: tuple[Rule, ...]
    rule_keys: tuple[str, ...]

    @property
    def ban_key(self) -> str:
        return f"{self.key}:ban"

    @property
    def refusals_key(self) -> str:
        return f"{self.key}:refusals"


@dataclass
class RuleResult:
    """One rule's verdict; ``reset`` is a unix time; ``marker`` says what a refund undoes."""

    rule: Rule
    remaining: int
    reset: float
    retry_after: float = 0.0
    exceeded: bool = False
    marker: int = 0


@dataclass
class SubjectResult:
    """A subject's verdict. ``ban_until`` is a unix time, or None for a ban without end."""

    subject: Subject
    rules: list[RuleResult] = field(default_factory=list)
    banned: bool = False
    ban_until: float | None = None
    charged: bool = False

    @property
    def allowed(self) -> bool:
        return not self.banned and not any(r.exceeded for r in self.rules)


WindowState = tuple[int, int, int]
"""A sliding window counter: (window index, count in that window, count in the one before)."""


def sliding_window(
    rule: Rule, state: WindowState | None, now: float, cost: int
) -> tuple[RuleResult, WindowState]:
    """Weighted count of the previous window plus the current one; the state if charged."""
    period = rule.period
    index = math.floor(now / period)
    current = previous = 0
    if state is not None:
        if state[0] == index:
            current, previous = state[1], state[2]
        elif state[0] == index - 1:
            previous = state[1]
    start = index * period
    weight = 1.0 - (now - start) / period
    count = previous * weight + current
    limit = rule.limit
    if count + cost <= limit + _EPSILON:
        reset = start + 2 * period
        result = RuleResult(rule, math.floor(limit - count - cost + _EPSILON), reset, marker=index)
        return result, (index, current + cost, previous)
    need = limit - cost - current
    if need >= 0 and previous > 0:
        retry_at = start + period * (1.0 - need / previous)
    elif cost <= limit and current > 0:
        retry_at = start + period + period * (1.0 - (limit - cost) / current)
    else:
        retry_at = now + period  # more than the whole limit: never, say one period
    reset = start + (2 if current else 1) * period
    remaining = max(0, math.floor(limit - count + _EPSILON))
    refused = RuleResult(rule, remaining, reset, max(0.0, retry_at - now), exceeded=True)
    return refused, (index, current, previous)


def token_bucket(rule: Rule, tat: float | None, now: float, cost: int) -> tuple[RuleResult, float]:
    """GCRA: the theoretical arrival time ``tat``; a call fits when ``tat`` is within the burst."""
    interval = rule.period / rule.limit
    tolerance = rule.burst * interval
    start = now if tat is None or tat < now else tat
    new_tat = start + cost * interval
    allow_at = new_tat - tolerance
    if allow_at <= now + _EPSILON:
        remaining = math.floor((now - allow_at) / interval + _EPSILON)
        return RuleResult(rule, remaining, new_tat), new_tat
    available = max(0, math.floor((now - (start - tolerance)) / interval + _EPSILON))
    return RuleResult(rule, available, start, allow_at - now, exceeded=True), start


class MemoryLimiter:
    """Counters, bucket times, bans and refusal counts in dicts; one actor owns it (no lock)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.windows: dict[str, tuple[WindowState, float]] = {}
        """Sliding window states with the time they expire (two windows after their own)."""
        self.tats: dict[str, float] = {}
        self.bans: dict[str, float | None] = {}
        self.refusals: dict[str, tuple[int, float]] = {}
        self._calls = 0

    def decide(
        self,
        subjects: Iterable[Subject],
        *,
        cost: int,
        consume: bool,
        policy: BanPolicy,
        pending_refusals: Mapping[str, int] | None = None,
    ) -> list[SubjectResult]:
        """Every subject's verdict; charge every rule only when all subjects allow."""
        now = self.clock()
        self._calls += 1
        if self._calls % _SWEEP_EVERY == 0:
            self.sweep(now)
        results: list[SubjectResult] = []
        staged: list[tuple[str, Rule, WindowState | float]] = []
        for subject in subjects:
            result = SubjectResult(subject)
            results.append(result)
            if self._banned(subject.ban_key, now, result):
                continue
            for rule, key in zip(subject.rules, subject.rule_keys, strict=True):
                if rule.algorithm == "token_bucket":
                    verdict, tat = token_bucket(rule, self.tats.get(key), now, cost)
                    staged.append((key, rule, tat))
                else:
                    stored = self.windows.get(key)
                    state = stored[0] if stored is not None else None
                    verdict, window = sliding_window(rule, state, now, cost)
                    staged.append((key, rule, window))
                result.rules.append(verdict)
        allowed = all(r.allowed for r in results)
        if consume and allowed:
            for key, rule, charged in staged:
                if isinstance(charged, tuple):
                    self.windows[key] = (charged, (charged[0] + 2) * rule.period)
                else:
                    self.tats[key] = charged
            for result in results:
                result.charged = True
        if consume:
            pending = pending_refusals or {}
            for result in results:
                refused = 1 if any(r.exceeded for r in result.rules) else 0
                extra = pending.get(result.subject.key, 0)
                if refused + extra:
                    self._count_refusals(result, refused + extra, now, policy)
        return results

    def _banned(self, ban_key: str, now: float, result: SubjectResult) -> bool:
        if ban_key not in self.bans:
            return False
        until = self.bans[ban_key]
        if until is not None and until <= now:
            del self.bans[ban_key]
            return False
        result.banned, result.ban_until = True, until
        return True

    def _count_refusals(
        self, result: SubjectResult, refused: int, now: float, policy: BanPolicy
    ) -> None:
        if policy.after <= 0:
            return
        key = result.subject.refusals_key
        count, until = self.refusals.get(key, (0, now + policy.window))
        if until <= now:
            count, until = 0, now + policy.window
        count += refused
        if count < policy.after:
            self.refusals[key] = (count, until)
            return
        self.refusals.pop(key, None)
        ban_until = now + policy.duration if policy.duration > 0 else None
        self.bans[result.subject.ban_key] = ban_until
        result.banned, result.ban_until = True, ban_until

    def ban(self, subject: Subject, until: float | None) -> None:
        self.bans[subject.ban_key] = until

    def unban(self, subject: Subject) -> int:
        removed = int(self.bans.pop(subject.ban_key, False) is not False)
        return removed + int(self.refusals.pop(subject.refusals_key, None) is not None)

    def reset(self, keys: Iterable[str]) -> int:
        removed = 0
        for key in keys:
            removed += int(self.windows.pop(key, None) is not None)
            removed += int(self.tats.pop(key, None) is not None)
        return removed

    def sweep(self, now: float) -> None:
        """Forget what has expired, so that memory follows the active identifiers only."""
        for key in [k for k, tat in self.tats.items() if tat < now]:
            del self.tats[key]
        for key in [k for k, (_, expires) in self.windows.items() if expires <= now]:
            del self.windows[key]
        for key in [k for k, until in self.bans.items() if until is not None and until <= now]:
            del self.bans[key]
        for key in [k for k, (_, until) in self.refusals.items() if until <= now]:
            del self.refusals[key]
