"""Rules and options of the ratelimit manager: ``"100/minute"`` strings and rule tables.

::

    rules = compile_rules({
        "ip": "100/minute",                                   # level "ip", sliding window
        "user_burst": {"level": "user", "limit": "10/second",
                       "algorithm": "token_bucket", "burst": 20},
    })
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from corral.config import REDIS_URL, Section
from corral.errors import ConfigError
from corral.messages.base import MAX_TTL

__all__ = [
    "Algorithm",
    "BackendErrorMode",
    "RatelimitOptions",
    "Rule",
    "compile_rules",
    "parse_limit",
]

Algorithm = Literal["sliding_window", "token_bucket"]
BackendErrorMode = Literal["open", "closed", "local"]

_LIMIT = re.compile(
    r"^\s*(\d+)\s*(?:/|per)\s*(\d+(?:\.\d+)?)?\s*"
    r"(s|sec|second|m|min|minute|h|hour|d|day)s?\s*$",
    re.IGNORECASE,
)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RULE_KEYS = frozenset(
    {"level", "limit", "algorithm", "burst", "on_backend_error", "endpoints", "per_endpoint"}
)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_limit(text: str) -> tuple[int, float]:
    """``"100/minute"`` -> ``(100, 60.0)``; also ``"5/10 seconds"``, ``"3 per hour"``."""
    match = _LIMIT.match(text)
    if match is None:
        raise ValueError(f"expected a limit like '100/minute' or '5/10 seconds', got {text!r}")
    count, multiple, unit = match.groups()
    period = float(multiple or 1) * _UNIT_SECONDS[unit[0].lower()]
    if int(count) < 1 or period <= 0:
        raise ValueError(f"a limit needs a count >= 1 and a period > 0, got {text!r}")
    return int(count), period


@dataclass(frozen=True)
class Rule:
    """One named limit on one level: ``limit`` calls per ``period`` seconds.

    For the token bucket (GCRA), ``burst`` calls may come at once and the bucket
    refills at ``limit / period`` per second; the sliding window ignores it.
    """

    name: str
    level: str
    limit: int
    period: float
    algorithm: Algorithm = "sliding_window"
    burst: int = 0
    on_backend_error: BackendErrorMode = "local"
    endpoints: tuple[str, ...] = ()
    per_endpoint: bool = False

    @property
    def capacity(self) -> int:
        """The most calls allowed at once: the burst of a bucket, the limit of a window."""
        return self.burst if self.algorithm == "token_bucket" else self.limit

    def applies(self, endpoint: str) -> bool:
        """Whether the rule counts calls to ``endpoint`` (glob patterns; none: every call)."""
        return not self.endpoints or any(fnmatch.fnmatchcase(endpoint, p) for p in self.endpoints)


def compile_rules(table: Mapping[str, Any]) -> tuple[Rule, ...]:
    """The ``rules`` option as Rules; raises ConfigError naming ``rules.<name>.<key>``."""
    return tuple(_compile_rule(name, spec) for name, spec in table.items())


def _compile_rule(name: str, spec: Any) -> Rule:
    where = f"rules.{name}"
    if not _NAME.match(name):
        _fail(where, "rule names are letters, digits, '_', '.', '-'")
    if isinstance(spec, str):
        spec = {"limit": spec}
    if not isinstance(spec, Mapping):
        _fail(where, f"expected a limit string or a table, got {type(spec).__name__}")
    unknown = sorted(set(spec) - _RULE_KEYS)
    if unknown:
        _fail(f"{where}.{unknown[0]}", f"unknown rule key (keys: {', '.join(sorted(_RULE_KEYS))})")
    level = _typed(spec, where, "level", str, name)
    if not _NAME.match(level):
        _fail(f"{where}.level", "levels are letters, digits, '_', '.', '-'")
    try:
        limit, period = parse_limit(_typed(spec, where, "limit", str, ""))
    except ValueError as exc:
        _fail(f"{where}.limit", str(exc))
    algorithm = _choice(spec, where, "algorithm", Algorithm, "sliding_window")
    burst = _typed(spec, where, "burst", int, limit)
    if burst < 1:
        _fail(f"{where}.burst", f"must be >= 1, got {burst}")
    endpoints = _typed(spec, where, "endpoints", list, [])
    if not all(isinstance(pattern, str) for pattern in endpoints):
        _fail(f"{where}.endpoints", "expected a list of endpoint patterns (str)")
    return Rule(
        name=name,
        level=level,
        limit=limit,
        period=period,
        algorithm=algorithm,
        burst=burst if algorithm == "token_bucket" else limit,
        on_backend_error=_choice(spec, where, "on_backend_error", BackendErrorMode, "local"),
        endpoints=tuple(endpoints),
        per_endpoint=_typed(spec, where, "per_endpoint", bool, False),
    )


def _typed(spec: Mapping[str, Any], where: str, key: str, kind: type, default: Any) -> Any:
    value = spec.get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _fail(f"{where}.{key}", f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _choice(spec: Mapping[str, Any], where: str, key: str, options: Any, default: str) -> Any:
    value = spec.get(key, default)
    if value not in get_args(options):
        allowed = ", ".join(repr(o) for o in get_args(options))
        _fail(f"{where}.{key}", f"expected one of {allowed}, got {value!r}")
    return value


def _fail(key: str, problem: str) -> Any:
    raise ConfigError(f"{key}: {problem}", {"field": "rules", "problem": problem})


@dataclass(frozen=True, kw_only=True, repr=False)
class RatelimitOptions(Section):
    """``[managers.ratelimit]``.

    ``backend``: ``auto`` uses Redis when the system has one (``bus.url``) or
    ``redis_url`` is set, else memory. ``ban_after`` refusals of one identifier
    within ``ban_window`` seconds ban it for ``ban_duration`` seconds (0: off).
    After a Redis failure the rules' ``on_backend_error`` decide for
    ``retry_interval`` seconds before Redis is tried again. ``local_cache`` keeps
    identifiers known to be over a limit (or banned) in memory for at most
    ``local_cache_ttl`` seconds, so their refused calls cost no round trip.
    ``cluster``: decide each identifier by its own script (all in one round trip)
    and give back what the others charged when one refuses, instead of one atomic
    script. Always so on a Redis Cluster, where a script may touch one slot only.
    """

    backend: Literal["auto", "memory", "redis"] = "auto"
    redis_url: str = field(default="", metadata=REDIS_URL)
    rules: dict[str, Any] = field(default_factory=dict)
    ban_after: int = field(default=0, metadata={"ge": 0})
    ban_window: float = field(default=60.0, metadata={"gt": 0, "le": MAX_TTL})
    ban_duration: float = field(default=300.0, metadata={"ge": 0, "le": MAX_TTL})
    redis_timeout: float = field(default=0.5, metadata={"gt": 0})
    retry_interval: float = field(default=1.0, metadata={"gt": 0})
    local_cache: bool = True
    local_cache_ttl: float = field(default=1.0, metadata={"gt": 0})
    cluster: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        compile_rules(self.rules)  # fail at System construction, not in a restart loop
