"""The ratelimit actor: decides checks against the memory or Redis limiter, keeps bans.

Checks that queue up in the mailbox while one waits on Redis are decided
together, in order, in the next round trip (a pipeline of scripts), so many
callers cost about as many round trips as the actor can make, not one each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from corral._redis import REDIS_ERRORS, connect, describe
from corral.actors.ratelimit._memory import (
    BanPolicy,
    MemoryLimiter,
    RuleResult,
    Subject,
    SubjectResult,
)
from corral.actors.ratelimit._options import RatelimitOptions, Rule, compile_rules, parse_limit
from corral.actors.ratelimit._redis import Call, RedisLimiter
from corral.errors import (
    BackendUnavailable,
    ConfigError,
    CorralError,
    InvalidMessage,
    ManagerUnavailable,
    NotFound,
)
from corral.manager import DeferredReply, Manager, handles
from corral.messages.base import MAX_TTL
from corral.messages.ratelimit import (
    RatelimitBan,
    RatelimitBanned,
    RatelimitCheck,
    RatelimitCleared,
    RatelimitDecision,
    RatelimitInfo,
    RatelimitReset,
    RatelimitRuleState,
    RatelimitUnban,
)
from corral.messages.system import Health
from corral.metrics import Counter, Gauge

__all__ = ["RatelimitManager"]

log = logging.getLogger(__name__)

_BATCH_SIZE = 64
"""At most this many checks share one round trip."""

_CACHE_SWEEP_SIZE = 10_000
"""Past this many entries, the local cache drops what has expired."""

_ENDLESS_BAN_RETRY = 86_400.0
"""Retry-After for a ban without end: a day, rather than a promise."""


@dataclass(frozen=True)
class _Cached:
    """A local cache entry: trusted until ``deadline`` (monotonic); refuses until ``retry_at``."""

    deadline: float
    retry_at: float
    verdict: RuleResult | None = None
    ban_until: float | None = None


CHECKS = Counter("corral_ratelimit_checks_total", "Calls checked (and charged when allowed)")
ALLOWED = Counter("corral_ratelimit_allowed_total", "Calls allowed")
REFUSED = Counter("corral_ratelimit_refused_total", "Calls refused, by a rule or a ban")
EXCEEDED = Counter(
    "corral_ratelimit_exceeded_total", "Refusals by the rule that refused", labels=("rule",)
)
CACHED_REFUSALS = Counter(
    "corral_ratelimit_cached_refusals_total",
    "Refusals answered from this daemon's cache of keys over their limit, without Redis",
)
FALLBACK_DECISIONS = Counter(
    "corral_ratelimit_fallback_decisions_total",
    "Calls decided by their rules' on_backend_error because Redis failed",
)
BACKEND_ERRORS = Counter("corral_ratelimit_backend_errors_total", "Redis calls that failed")
BATCHES = Counter(
    "corral_ratelimit_batches_total", "Round trips deciding checks that queued up together"
)
BATCHED_CHECKS = Counter("corral_ratelimit_batched_checks_total", "Checks decided in those")
CACHED_KEYS = Gauge(
    "corral_ratelimit_cached_keys", "Keys over their limit, and bans, cached by this daemon"
)
HEALTH_COUNTS = {
    "checks": CHECKS,
    "allowed": ALLOWED,
    "refused": REFUSED,
    "backend_errors": BACKEND_ERRORS,
    "fallback": FALLBACK_DECISIONS,
    "cached_refusals": CACHED_REFUSALS,
    "batches": BATCHES,
    "batched_checks": BATCHED_CHECKS,
}
"""The counters in ``Health.metrics``, by key."""


class RatelimitManager(Manager[RatelimitOptions]):
    """Decides calls against the configured rules; see the module docstring."""

    name = "ratelimit"
    metric_families = (
        CHECKS,
        ALLOWED,
        REFUSED,
        EXCEEDED,
        CACHED_REFUSALS,
        FALLBACK_DECISIONS,
        BACKEND_ERRORS,
        BATCHES,
        BATCHED_CHECKS,
        CACHED_KEYS,
    )

    def on_start(self) -> None:
        settings = self.options
        self._take_rules(settings)
        self.clock = self.corral_context.clock
        self.local = MemoryLimiter(self.clock.time)
        self.redis: RedisLimiter | None = None
        self.down_until = 0.0
        self.last_error = ""
        self.over_limit: dict[str, _Cached] = {}
        """The local cache: rule keys over their limit and ban keys, with their verdicts."""
        self.pending_refusals: dict[str, int] = {}
        self.batch: list[tuple[RatelimitCheck, DeferredReply]] = []
        """Checks waiting for one shared round trip (see ``check``)."""
        url = settings.redis_url or self.corral_context.redis_url
        backend = settings.backend
        if backend == "auto":
            backend = "redis" if url else "memory"
        if backend == "redis":
            if not url:
                raise ConfigError("managers.ratelimit: backend 'redis' needs redis_url or bus.url")
            client = connect(
                url,
                setting="managers.ratelimit.redis_url",
                socket_timeout=settings.redis_timeout,
                connect_timeout=settings.redis_timeout,
                retries=0,
            )
            self.redis = RedisLimiter(client, per_identity=settings.cluster)
            try:
                self.redis.load()
            except REDIS_ERRORS as exc:
                self._backend_failed(exc)

    def reconfigure(self, options: RatelimitOptions) -> bool:
        """New rules and ban policy take effect at once; anything else needs a restart."""
        runtime = ("rules", "ban_after", "ban_window", "ban_duration")
        kept = {name: getattr(self.options, name) for name in runtime}
        if dataclasses.replace(options, **kept) != self.options:
            return False
        self._take_rules(options)
        self.over_limit.clear()  # verdicts of the old rules
        return True

    def _take_rules(self, settings: RatelimitOptions) -> None:
        self.rules = compile_rules(settings.rules)
        self.rules_by_level: dict[str, tuple[Rule, ...]] = {}
        for rule in self.rules:
            self.rules_by_level[rule.level] = (*self.rules_by_level.get(rule.level, ()), rule)
        self.policy = BanPolicy(settings.ban_after, settings.ban_window, settings.ban_duration)

    def on_stop(self) -> None:
        self._flush()
        if self.redis is not None:
            self.redis.client.close()

    # -- requests ------------------------------------------------------------------------

    @handles(RatelimitCheck)
    def check(self, msg: RatelimitCheck) -> RatelimitDecision | None:
        """Decide now, or, when more checks wait in the mailbox, with them in one round trip.

        Batched checks are decided in arrival order, each as if alone; any other
        request first flushes the batch, so that nothing overtakes a check.
        """
        if self.redis is None or (not self.batch and self.corral_mailbox.qsize() == 0):
            return self._decide(msg, consume=True)
        reply = self.defer_reply()
        if not reply.pending:  # a tell: nobody waits for the decision, decide it in turn
            self._flush()
            return self._decide(msg, consume=True)
        self.batch.append((msg, reply))
        if self.corral_mailbox.qsize() == 0 or len(self.batch) >= _BATCH_SIZE:
            self._flush()
        return None

    @handles(RatelimitInfo)
    def info(self, msg: RatelimitInfo) -> RatelimitDecision:
        self._flush()
        return self._decide(msg, consume=False)

    @handles(RatelimitBan)
    def ban(self, msg: RatelimitBan) -> RatelimitBanned:
        self._flush()
        if not 0 <= msg.duration <= MAX_TTL:  # checked by the codec; kept for validate = false
            raise InvalidMessage(
                f"must be >= 0 (0: until unbanned) and <= {MAX_TTL} s", path="duration"
            )
        subject = self._subject(msg.level, msg.identifier, "")
        until = self.clock.time() + msg.duration if msg.duration > 0 else None
        self.local.ban(subject, until)  # honoured here even while Redis is away
        self._forget_cached(subject)
        if self.redis is not None:
            self._on_redis(lambda r: r.ban(subject, msg.duration))
        return RatelimitBanned(level=msg.level, identifier=msg.identifier, until=until)

    @handles(RatelimitUnban)
    def unban(self, msg: RatelimitUnban) -> RatelimitCleared:
        self._flush()
        subject = self._subject(msg.level, msg.identifier, "")
        removed = self.local.unban(subject)
        self._forget_cached(subject)
        if self.redis is not None:
            removed = self._on_redis(lambda r: r.unban(subject))
        return RatelimitCleared(removed=removed)

    @handles(RatelimitReset)
    def reset(self, msg: RatelimitReset) -> RatelimitCleared:
        self._flush()
        rules = self.rules_by_level.get(msg.level, ())
        if msg.rule is not None:
            rules = tuple(r for r in rules if r.name == msg.rule)
            if not rules:
                raise NotFound(f"no rule {msg.rule!r} on level {msg.level!r}", {"rule": msg.rule})
        subject = self._subject(msg.level, msg.identifier, msg.endpoint, rules)
        self._forget_cached(subject)
        removed = self.local.reset(subject.rule_keys)
        if self.redis is not None:
            removed = self._on_redis(lambda r: r.reset(subject.rule_keys))
        return RatelimitCleared(removed=removed)

    # -- health ----------------------------------------------------------------------------

    def health(self) -> Health:
        self._flush()
        counted = self.corral_metrics
        counted.set(CACHED_KEYS, len(self.over_limit))
        metrics = {key: int(counted.value(family)) for key, family in HEALTH_COUNTS.items()}
        metrics["local_cache_size"] = len(self.over_limit)
        if self.redis is None:
            return Health(status="healthy", details={"backend": "memory"}, metrics=metrics)
        try:
            self.redis.client.ping()
            self.down_until = 0.0
        except REDIS_ERRORS as exc:
            self._backend_failed(exc)
        if self.down_until:
            modes = sorted({r.on_backend_error for r in self.rules})
            return Health(
                status="degraded",
                details={"backend": "redis", "error": self.last_error, "on_backend_error": modes},
                metrics=metrics,
                dependencies={"redis": "down"},
            )
        return Health(
            status="healthy", details={"backend": "redis"}, metrics=metrics,
            dependencies={"redis": "up"},
        )  # fmt: skip

    # -- deciding ------------------------------------------------------------------------

    def _decide(self, msg: RatelimitCheck | RatelimitInfo, *, consume: bool) -> RatelimitDecision:
        (decision,) = self._decide_all([msg], consume=consume)
        if isinstance(decision, CorralError):
            raise decision
        return decision

    def _flush(self) -> None:
        """Decide the batched checks (one round trip) and answer their callers."""
        if not self.batch:
            return
        batch, self.batch = self.batch, []
        self.corral_metrics.add(BATCHES)
        self.corral_metrics.add(BATCHED_CHECKS, by=len(batch))
        try:
            decisions = self._decide_all([msg for msg, _ in batch], consume=True)
        except BaseException as exc:  # a crash is coming: its callers must not hang meanwhile
            gone = ManagerUnavailable(f"the rate limiter failed deciding a batch: {exc!r}")
            for _, reply in batch:
                reply.fail(gone)
            raise
        for (_, reply), decision in zip(batch, decisions, strict=True):
            if isinstance(decision, CorralError):
                self.corral_handler_stats[RatelimitCheck].errors += 1
                reply.fail(decision)
            else:
                reply.resolve(decision)

    def _decide_all(
        self, messages: Sequence[RatelimitCheck | RatelimitInfo], *, consume: bool
    ) -> list[RatelimitDecision | CorralError]:
        """Every call's decision (or error), in order; the Redis ones in one round trip."""
        answers: list[RatelimitDecision | CorralError | None] = []
        calls: list[tuple[int, list[Subject], int]] = []
        for index, msg in enumerate(messages):
            if msg.cost < 0 or (consume and msg.cost == 0):
                answers.append(InvalidMessage("must be >= 1 (>= 0 for info)", path="cost"))
                continue
            ids = {"ip": msg.ip, "user": msg.user, "api_key": msg.api_key, **msg.identifiers}
            subjects = [
                self._subject(level, identifier, msg.endpoint)
                for level, identifier in ids.items()
                if identifier
            ]
            if msg.route_limits and msg.route_key:
                try:
                    rules = tuple(self._route_rule(limit) for limit in msg.route_limits)
                except ValueError as exc:
                    answers.append(InvalidMessage(str(exc), path="route_limits"))
                    continue
                subjects.append(self._subject("route", msg.route_key, msg.endpoint, rules))
            if consume:
                self.corral_metrics.add(CHECKS)
            cached = None
            if consume and self.redis is not None and self.options.local_cache:
                cached = self._cached_refusal(subjects)
            answers.append(cached)
            if cached is None:
                calls.append((index, subjects, msg.cost))
        for (index, _, cost), (results, degraded) in zip(
            calls, self._results(calls, consume), strict=True
        ):
            decision = self._decision(results, degraded, cost)
            if consume:
                self._count(decision)
            answers[index] = decision
        return [answer for answer in answers if answer is not None]

    def _results(
        self, calls: list[tuple[int, list[Subject], int]], consume: bool
    ) -> list[tuple[list[SubjectResult], bool]]:
        """(results, degraded) of each call: from Redis, else by on_backend_error."""
        if self.redis is None:
            policy = self.policy
            return [
                (self.local.decide(subjects, cost=cost, consume=consume, policy=policy), False)
                for _, subjects, cost in calls
            ]
        if self.clock.monotonic() >= self.down_until and calls:
            owed = [
                Call(subjects, cost, {s.key: self.pending_refusals.pop(s.key, 0) for s in subjects})
                for _, subjects, cost in calls
            ]
            try:
                decided = self.redis.decide_many(owed, consume=consume, policy=self.policy)
            except REDIS_ERRORS as exc:
                self._backend_failed(exc)
                for call in owed:  # still owed to the next round trip
                    for key, count in call.pending_refusals.items():
                        if count:
                            self.pending_refusals[key] = self.pending_refusals.get(key, 0) + count
            else:
                self.down_until = 0.0
                for results, (_, _, cost) in zip(decided, calls, strict=True):
                    if consume and not all(r.allowed for r in results):
                        self._refund(results, cost)
                    if consume and cost == 1:
                        self._remember_refusals(results)
                return [(results, False) for results in decided]
        if calls:
            self.corral_metrics.add(FALLBACK_DECISIONS, by=len(calls))
        return [(self._fallback(subjects, cost, consume), True) for _, subjects, cost in calls]

    def _refund(self, results: list[SubjectResult], cost: int) -> None:
        assert self.redis is not None
        refunded = [r for r in results if r.charged and r.rules]
        try:
            self.redis.refund(refunded, cost=cost)
        except REDIS_ERRORS as exc:
            self._backend_failed(exc)  # the call is refused anyway; its charge stays

    def _fallback(self, subjects: list[Subject], cost: int, consume: bool) -> list[SubjectResult]:
        """Redis is away: each rule's ``on_backend_error`` decides; ``local`` rules count here."""
        now = self.clock.time()
        wait = self.options.retry_interval
        fixed: dict[tuple[str, str], RuleResult] = {}
        local_subjects = []
        for subject in subjects:
            kept = [(rule, key) for rule, key in zip(subject.rules, subject.rule_keys, strict=True)
                    if rule.on_backend_error == "local"]  # fmt: skip
            for rule in subject.rules:
                if rule.on_backend_error == "open":
                    fixed[subject.key, rule.name] = RuleResult(rule, rule.capacity, now)
                elif rule.on_backend_error == "closed":
                    fixed[subject.key, rule.name] = RuleResult(rule, 0, now + wait, wait, True)
            local_subjects.append(
                replace(
                    subject,
                    rules=tuple(rule for rule, _ in kept),
                    rule_keys=tuple(key for _, key in kept),
                )
            )
        closed = any(verdict.exceeded for verdict in fixed.values())
        local = self.local.decide(
            local_subjects, cost=cost, consume=consume and not closed, policy=self.policy
        )
        results = []
        for subject, partial in zip(subjects, local, strict=True):
            counted = {verdict.rule.name: verdict for verdict in partial.rules}
            verdicts = [] if partial.banned else [
                fixed.get((subject.key, rule.name)) or counted[rule.name]
                for rule in subject.rules
            ]  # fmt: skip
            results.append(
                SubjectResult(subject, verdicts, partial.banned, partial.ban_until, partial.charged)
            )
        return results

    def _decision(
        self, results: Sequence[SubjectResult], degraded: bool, cost: int = 0
    ) -> RatelimitDecision:
        """The reply; an uncharged rule that allowed reports what is left before this call."""
        now = self.clock.time()
        states = []
        exceeded = []
        banned = []
        retry_after = 0.0
        for result in results:
            subject = result.subject
            if result.banned:
                banned.append(subject.level)
                wait = _ENDLESS_BAN_RETRY if result.ban_until is None else result.ban_until - now
                retry_after = max(retry_after, wait)
            for verdict in result.rules:
                remaining = verdict.remaining
                if verdict.exceeded:
                    exceeded.append(verdict.rule.name)
                    retry_after = max(retry_after, verdict.retry_after)
                elif not result.charged:
                    remaining = min(verdict.rule.capacity, remaining + cost)
                states.append(
                    RatelimitRuleState(
                        rule=verdict.rule.name,
                        level=subject.level,
                        identifier=subject.identifier,
                        limit=verdict.rule.capacity,
                        remaining=max(0, remaining),
                        reset=verdict.reset,
                        retry_after=verdict.retry_after,
                        exceeded=verdict.exceeded,
                    )
                )
        return RatelimitDecision(
            allowed=not exceeded and not banned,
            rules=states,
            exceeded=exceeded,
            banned=banned,
            retry_after=max(0.0, retry_after),
            degraded=degraded,
        )

    # -- the local cache of refusals (Envoy's) -------------------------------------------

    def _remember_refusals(self, results: list[SubjectResult]) -> None:
        if not self.options.local_cache:
            return
        now, wall = self.clock.monotonic(), self.clock.time()
        ttl = self.options.local_cache_ttl
        if len(self.over_limit) > _CACHE_SWEEP_SIZE:
            self.over_limit = {k: e for k, e in self.over_limit.items() if e.deadline > now}
        if len(self.pending_refusals) > _CACHE_SWEEP_SIZE:
            self.pending_refusals.clear()  # a bound on memory; those refusals go uncounted
        for result in results:
            if result.banned:
                until = result.ban_until
                left = ttl if until is None else until - wall
                retry_at = wall + _ENDLESS_BAN_RETRY if until is None else until
                self.over_limit[result.subject.ban_key] = _Cached(
                    now + min(ttl, left), retry_at, ban_until=until
                )
            for verdict, key in zip(result.rules, result.subject.rule_keys, strict=False):
                # Only a rule with nothing left refuses every call until retry_after.
                if verdict.exceeded and verdict.remaining == 0 and verdict.retry_after > 0:
                    self.over_limit[key] = _Cached(
                        now + min(ttl, verdict.retry_after), wall + verdict.retry_after, verdict
                    )

    def _cached_refusal(self, subjects: list[Subject]) -> RatelimitDecision | None:
        """A refusal decided from the cache alone, or None when Redis must be asked.

        Refusals decided here are counted and added to the subject's refusal
        count on its next round trip, so auto-bans still see them.
        """
        if not self.over_limit:
            return None
        now, wall = self.clock.monotonic(), self.clock.time()
        results = []
        for subject in subjects:
            result = SubjectResult(subject)
            ban = self._cached(subject.ban_key, now)
            if ban is not None:
                result.banned, result.ban_until = True, ban.ban_until
            for key in subject.rule_keys:
                hit = self._cached(key, now)
                if hit is not None and hit.verdict is not None:
                    wait = max(0.0, hit.retry_at - wall)
                    result.rules.append(replace(hit.verdict, retry_after=wait))
            results.append(result)
        if all(r.allowed for r in results):
            return None
        for result in results:
            if any(v.exceeded for v in result.rules):
                key = result.subject.key
                self.pending_refusals[key] = self.pending_refusals.get(key, 0) + 1
        self.corral_metrics.add(CACHED_REFUSALS)
        decision = self._decision(results, False)  # every verdict here refused: no cost to add
        self._count(decision)
        return decision

    def _count(self, decision: RatelimitDecision) -> None:
        counted = self.corral_metrics
        counted.add(ALLOWED if decision.allowed else REFUSED)
        for rule in decision.exceeded:
            counted.add(EXCEEDED, rule)

    def _cached(self, key: str, now: float) -> _Cached | None:
        entry = self.over_limit.get(key)
        if entry is None:
            return None
        if entry.deadline <= now:
            del self.over_limit[key]
            return None
        return entry

    def _forget_cached(self, subject: Subject) -> None:
        for key in [k for k in self.over_limit if k.startswith(subject.key + ":")]:
            del self.over_limit[key]

    # -- helpers -------------------------------------------------------------------------

    def _route_rule(self, limit: str) -> Rule:
        """The rule of a per-route limit string, counted per endpoint (ValueError if bad)."""
        count, period = parse_limit(limit)
        return Rule(
            name=f"route:{count}/{period:g}s",
            level="route",
            limit=count,
            period=period,
            per_endpoint=True,
        )

    def _subject(
        self, level: str, identifier: str, endpoint: str, rules: Sequence[Rule] | None = None
    ) -> Subject:
        if rules is None:
            rules = tuple(r for r in self.rules_by_level.get(level, ()) if r.applies(endpoint))
        key = f"{self.corral_context.namespace}:{{rl:{level}:{_key_safe(level, identifier)}}}"
        return Subject(
            level=level,
            identifier=identifier if level != "api_key" else _key_safe(level, identifier),
            key=key,
            rules=tuple(rules),
            rule_keys=tuple(
                f"{key}:{rule.name}:{endpoint}" if rule.per_endpoint else f"{key}:{rule.name}"
                for rule in rules
            ),
        )

    def _on_redis(self, action: Callable[[RedisLimiter], int | None]) -> int:
        assert self.redis is not None
        try:
            return int(action(self.redis) or 0)
        except REDIS_ERRORS as exc:
            self._backend_failed(exc)
            raise BackendUnavailable(
                f"ratelimit: {describe(exc)}", {"manager": self.corral_context.name}
            ) from None

    def _backend_failed(self, exc: Exception) -> None:
        if not self.down_until:
            log.warning("ratelimit: redis failed (%s); rules decide by on_backend_error", exc)
        self.corral_metrics.add(BACKEND_ERRORS)
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.down_until = self.clock.monotonic() + self.options.retry_interval


def _key_safe(level: str, identifier: str) -> str:
    """The identifier as it appears in keys: API keys (secrets) and odd ones hashed."""
    if level == "api_key" or len(identifier) > 128 or "{" in identifier or "}" in identifier:
        return hashlib.blake2b(identifier.encode(), digest_size=16).hexdigest()
    return identifier
