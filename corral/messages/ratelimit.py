"""Messages of the ``ratelimit`` manager: check a call against every level's limits, bans.

One :class:`RatelimitCheck` carries all the identifiers of one call; the reply
says whether the call may proceed and how each configured rule stands::

    decision = system.ask(RatelimitCheck(ip="10.0.0.7", user="ada", endpoint="/search"))
    if not decision.allowed:
        return 429, decision.headers()      # Retry-After, X-RateLimit-*
    system.ask(RatelimitBan(level="ip", identifier="10.0.0.7", duration=600))
"""

from __future__ import annotations

import math

import msgspec

from corral.messages.base import Cost, Count, Duration, Reply, Request, message

__all__ = [
    "RatelimitBan",
    "RatelimitBanned",
    "RatelimitCheck",
    "RatelimitCleared",
    "RatelimitDecision",
    "RatelimitInfo",
    "RatelimitReset",
    "RatelimitRuleState",
    "RatelimitUnban",
]


@message("ratelimit.rule_state")
class RatelimitRuleState(Reply):
    """Where one rule stands for one identifier after (or, for ``info``, without) this call.

    ``reset`` is the unix time (seconds) at which the rule is back to its full
    allowance; ``retry_after`` is 0 when the rule allowed the call, else the seconds
    to wait before the same call would be allowed by this rule.
    """

    rule: str
    level: str
    identifier: str
    limit: Count
    remaining: int
    reset: float
    retry_after: float = 0.0
    exceeded: bool = False


@message("ratelimit.decision")
class RatelimitDecision(Reply):
    """The answer to a check: allowed, which rules refused, every rule's state.

    ``exceeded`` names the refusing rules; ``banned`` names the levels whose
    identifier is banned (a ban refuses the call without charging any rule).
    ``degraded`` is true when Redis could not be reached and the rules'
    ``on_backend_error`` decided instead.
    """

    allowed: bool
    rules: list[RatelimitRuleState] = msgspec.field(default_factory=list)
    exceeded: list[str] = msgspec.field(default_factory=list)
    banned: list[str] = msgspec.field(default_factory=list)
    retry_after: float = 0.0
    degraded: bool = False

    def headers(self) -> dict[str, str]:
        """``X-RateLimit-Limit/-Remaining/-Reset`` of the tightest rule, and ``Retry-After``.

        The tightest rule is the one with the fewest remaining calls (a refusing
        rule first). ``X-RateLimit-Reset`` is a unix time in whole seconds;
        ``Retry-After`` (whole seconds, rounded up) is only set on a refusal.
        """
        headers: dict[str, str] = {}
        if self.rules:
            tightest = min(self.rules, key=lambda s: (not s.exceeded, s.remaining, -s.reset))
            headers["X-RateLimit-Limit"] = str(tightest.limit)
            headers["X-RateLimit-Remaining"] = str(max(0, tightest.remaining))
            headers["X-RateLimit-Reset"] = str(math.ceil(tightest.reset))
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


@message("ratelimit.check")
class RatelimitCheck(Request[RatelimitDecision]):
    """Check one call against every rule whose level it names, and charge it if all allow.

    ``identifiers`` carries custom levels (``{"tenant": "acme"}``); ``endpoint`` names
    the route called, for rules limited to some endpoints or counted per endpoint.
    A refused call charges no rule. ``cost`` is at most a billion.

    ``route_limits`` adds limits of this call's route on top of the configured rules
    (``"10/minute"`` strings, sliding windows counted per ``route_key`` and
    ``endpoint``; reported as rules ``route:<limit>``), as a web framework's per-view
    limits::

        RatelimitCheck(ip="10.0.0.7", endpoint="/search", route_limits=["10/minute"],
                       route_key="10.0.0.7")
    """

    manager = "ratelimit"
    ip: str | None = None
    user: str | None = None
    api_key: str | None = None
    endpoint: str = ""
    identifiers: dict[str, str] = msgspec.field(default_factory=dict)
    cost: Cost = 1
    route_limits: list[str] = msgspec.field(default_factory=list)
    route_key: str | None = None


@message("ratelimit.info", idempotent=True)
class RatelimitInfo(Request[RatelimitDecision]):
    """Where every rule stands, charging nothing
    (``route_limits`` and ``route_key`` as in :class:`RatelimitCheck`)."""

    manager = "ratelimit"
    ip: str | None = None
    user: str | None = None
    api_key: str | None = None
    endpoint: str = ""
    identifiers: dict[str, str] = msgspec.field(default_factory=dict)
    cost: Cost = 1
    route_limits: list[str] = msgspec.field(default_factory=list)
    route_key: str | None = None


@message("ratelimit.cleared")
class RatelimitCleared(Reply):
    """How many stored counters or bans a reset or unban removed."""

    removed: Count


@message("ratelimit.reset")
class RatelimitReset(Request[RatelimitCleared]):
    """Forget the counters of ``identifier`` at ``level`` (all its rules, or ``rule``).

    Counters of ``per_endpoint`` rules are those of ``endpoint``.
    """

    manager = "ratelimit"
    level: str
    identifier: str
    rule: str | None = None
    endpoint: str = ""


@message("ratelimit.banned")
class RatelimitBanned(Reply):
    """A ban in force: ``until`` is a unix time, or None for a ban without end."""

    level: str
    identifier: str
    until: float | None


@message("ratelimit.ban")
class RatelimitBan(Request[RatelimitBanned]):
    """Ban ``identifier`` at ``level`` for ``duration`` seconds (0: until unbanned; at most
    ten years)."""

    manager = "ratelimit"
    level: str
    identifier: str
    duration: Duration = 0.0


@message("ratelimit.unban")
class RatelimitUnban(Request[RatelimitCleared]):
    """Lift a ban (manual or automatic) and forget the identifier's refusal count."""

    manager = "ratelimit"
    level: str
    identifier: str
