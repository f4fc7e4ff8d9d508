"""Each manager's own figures, as the dashboard shows them, read from its Health.

A built-in manager gets the few figures an operator looks for (a cache's hit rate, a
rate limiter's refusals, a pool's breakers, a websocket manager's open sockets, a
transaction manager's open transactions); any other manager the numbers of its own
that its Health reports::

    figures("cache", {}, {"cache_hits": 90, "cache_misses": 10, "cache_size": 7})
    # [{"label": "hit rate", "value": "90.0%", "tone": ""}, {"label": "size", ...}, ...]

A figure a manager does not report is left out, so a manager of an older or newer
version shows what it has.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, TypedDict

__all__ = ["STANDARD_METRICS", "Figure", "figures"]

Tone = Literal["", "warn", "bad"]


class Figure(TypedDict):
    """One figure: what it is, its value as shown, and whether it needs attention."""

    label: str
    value: str
    tone: Tone


STANDARD_METRICS = frozenset(
    {
        "handled",
        "errors",
        "handler_seconds",
        "latency_counts",
        "mailbox_depth",
        "mailbox_capacity",
        "overloaded",
        "uptime_s",
    }
)
"""The counters every manager keeps (:meth:`corral.Manager.corral_stats`), shown
in columns of their own or not at all, never as a manager's own figures."""

OWN_FIGURES_SHOWN = 6
"""How many of its own numbers a manager without a table below shows."""


def figures(kind: str, details: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[Figure]:
    """The figures of a manager of ``kind`` (its class's ``name``), from its Health."""
    read = _READERS.get(kind, _own_numbers)
    return read(details, metrics)


def _figure(label: str, value: str, tone: Tone = "") -> Figure:
    return {"label": label, "value": value, "tone": tone}


def _number(metrics: Mapping[str, Any], *keys: str) -> float | None:
    """The first of ``keys`` that ``metrics`` holds as a number."""
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    return None


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _counts(
    metrics: Mapping[str, Any], labels: Mapping[str, str], *, bad: str = ""
) -> list[Figure]:
    """A figure per key of ``labels`` that ``metrics`` holds; the key ``bad`` is red above 0."""
    found = []
    for key, label in labels.items():
        value = _number(metrics, key)
        if value is not None:
            found.append(_figure(label, _count(value), "bad" if key == bad and value else ""))
    return found


def _share(part: float | None, whole: float | None) -> str | None:
    """``part`` of ``whole`` as a percentage; None when either is unknown or ``whole`` is 0."""
    if part is None or not whole:
        return None
    return f"{part / whole:.1%}"


def _cache(_details: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[Figure]:
    hits = _number(metrics, "cache_hits", "hits")
    misses = _number(metrics, "cache_misses", "misses")
    found = []
    if hits is not None and misses is not None:
        found.append(_figure("hit rate", _share(hits, hits + misses) or "no lookups yet"))
    labels = {"cache_size": "size", "cache_evictions": "evictions", "cache_errors": "errors"}
    return found + _counts(metrics, labels, bad="cache_errors")


def _ratelimit(_details: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[Figure]:
    refused = _number(metrics, "refused")
    found = []
    if refused is not None:
        share = _share(refused, _number(metrics, "checks"))
        found.append(_figure("refusals", _count(refused) + (f" ({share})" if share else "")))
    labels = {"checks": "checks", "backend_errors": "backend errors"}
    return found + _counts(metrics, labels, bad="backend_errors")


def _pool(details: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[Figure]:
    """One figure per service: its breakers (open ones in red, half-open in amber)."""
    found = []
    for service, about in sorted(details.items()):
        urls = about.get("urls") if isinstance(about, Mapping) else None
        if not isinstance(urls, Mapping):
            continue
        states = [str(u.get("breaker", "?")) for u in urls.values() if isinstance(u, Mapping)]
        opened = states.count("open")
        half = states.count("half_open")
        value: str
        tone: Tone
        if opened:
            value, tone = f"{opened} of {len(states)} open", "bad"
        elif half:
            value, tone = f"{half} of {len(states)} half-open", "warn"
        else:
            value, tone = f"{len(states)} closed", ""
        found.append(_figure(f"{service} breakers", value, tone))
        in_flight = _number(metrics, f"{service}.in_flight")
        if in_flight:
            found.append(_figure(f"{service} in flight", _count(in_flight)))
    return found


def _websocket(_details: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[Figure]:
    labels = {"connections": "open sockets", "rooms": "rooms", "sent": "sent", "refused": "refused"}
    return _counts(metrics, labels)


def _transaction(_details: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[Figure]:
    labels = {
        "open": "open",
        "committed": "committed",
        "rolled_back": "rolled back",
        "expired": "expired",
    }
    return _counts(metrics, labels)


def _state(_details: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[Figure]:
    return _counts(
        metrics,
        {"published": "published", "publish_errors": "publish errors"},
        bad="publish_errors",
    )


def _auth(_details: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[Figure]:
    return _counts(metrics, {"issued": "issued", "validated": "validated", "revoked": "revoked"})


def _own_numbers(_details: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[Figure]:
    own = [
        (key, value)
        for key, value in metrics.items()
        if key not in STANDARD_METRICS
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    ]
    return [
        _figure(key, _count(value) if float(value).is_integer() else f"{value:.3g}")
        for key, value in own[:OWN_FIGURES_SHOWN]
    ]


_READERS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], list[Figure]]] = {
    "cache": _cache,
    "ratelimit": _ratelimit,
    "pool": _pool,
    "websocket": _websocket,
    "transaction": _transaction,
    "state": _state,
    "auth": _auth,
}
