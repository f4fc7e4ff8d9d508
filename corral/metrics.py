"""The figures a manager exports on ``/metrics``: families declared next to it, values its
supervisor keeps.

A manager names its own families in ``metric_families`` and counts into
``self.corral_metrics``. That store belongs to the supervisor's record of the child, not
to the actor, so a restart never resets a counter. The daemon exports every declared
family of every manager it runs, each sample labelled with the manager's name first
(``manager`` is reserved), and the counts every manager gets from the base::

    REFUSED = Counter("corral_ratelimit_refused_total", "Calls refused", labels=("level",))
    OPEN = Gauge("corral_transactions_open", "Transactions open now")

    class Limiter(Manager):
        name = "limiter"
        metric_families = (REFUSED, OPEN)

        @handles(Check)
        def check(self, msg: Check) -> Decision:
            self.corral_metrics.add(REFUSED, "ip")
            ...

        def health(self) -> Health:
            self.corral_metrics.set(OPEN, len(self.open))   # set at every liveness probe
            ...

Label values must come from a bounded set (configured names, message types, a fixed
list of reasons): never ids, keys or addresses given by callers. Gauges describe one
actor: they are cleared when the supervisor starts its successor.
"""

from __future__ import annotations

import bisect
import re
import threading
from dataclasses import dataclass, field
from typing import ClassVar, Literal

__all__ = [
    "LATENCY_BUCKETS",
    "REQUEST_SECONDS",
    "Counter",
    "Family",
    "Gauge",
    "HandlerStats",
    "Histogram",
    "HistogramValue",
    "ManagerMetrics",
]

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
"""Upper bounds (seconds) of corral's latency histograms (+Inf follows)."""

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
RESERVED_LABELS = frozenset({"manager", "le", "quantile"})
"""Labels the daemon or Prometheus sets itself."""


@dataclass(frozen=True)
class Family:
    """One metric family: its name, help text and label names (``manager`` comes first,
    added by the daemon)."""

    kind: ClassVar[Literal["counter", "gauge", "histogram"]]
    name: str
    help: str
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"{self.name!r} is not a Prometheus metric name")
        for label in self.labels:
            if not _LABEL.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"{self.name}: {label!r} is not a label name")
            if label in RESERVED_LABELS:
                raise ValueError(f"{self.name}: the label {label!r} is set by the daemon")


@dataclass(frozen=True)
class Counter(Family):
    """A count that only goes up; its name ends with ``_total``."""

    kind: ClassVar[Literal["counter"]] = "counter"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.name.endswith("_total"):
            raise ValueError(f"{self.name}: a counter's name ends with _total")


@dataclass(frozen=True)
class Gauge(Family):
    """A value that goes up and down, as of the last time the manager set it."""

    kind: ClassVar[Literal["gauge"]] = "gauge"


@dataclass(frozen=True)
class Histogram(Family):
    """Observations counted into buckets (upper bounds, ``+Inf`` added)."""

    kind: ClassVar[Literal["histogram"]] = "histogram"
    buckets: tuple[float, ...] = field(default=LATENCY_BUCKETS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if list(self.buckets) != sorted(set(self.buckets)) or not self.buckets:
            raise ValueError(f"{self.name}: buckets must be given in increasing order")


REQUEST_SECONDS = Histogram(
    "corral_request_seconds",
    "Remote requests, from reading one off its stream to publishing its reply",
    labels=("type",),
)
"""Kept by the daemon's request server in each manager's store, by message type."""


class HistogramValue:
    """Counts per bucket (the last one is +Inf) and the sum of what was observed."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at most that)`` per bucket, ``inf`` last."""
        total, rows = 0, []
        for bound, count in zip((*self.buckets, float("inf")), list(self.counts), strict=True):
            total += count
            rows.append((bound, total))
        return rows


class HandlerStats:
    """What one message type's handler did: written by the actor's thread alone."""

    __slots__ = ("errors", "handled", "seconds")

    def __init__(self) -> None:
        self.handled = 0
        """Messages handled, batched ones (``take_queued``) included."""
        self.errors = 0
        """Of them, answered with an error."""
        self.seconds = HistogramValue(LATENCY_BUCKETS)
        """Time spent in the handler, per call."""


Labels = tuple[str, ...]


class ManagerMetrics:
    """The values one manager exports, kept by its supervisor across restarts.

    ``handlers`` (by message type name), ``overloaded`` and ``unhandled`` are kept by
    the base; ``add``, ``set`` and ``observe`` fill the manager's own families. Safe
    to use from any thread::

        metrics = ManagerMetrics()
        metrics.add(REFUSED, "ip")
        metrics.value(REFUSED, "ip")      # 1.0
    """

    def __init__(self) -> None:
        self.handlers: dict[str, HandlerStats] = {}
        self.overloaded = 0
        """Messages refused because the mailbox stayed full."""
        self.unhandled = 0
        """Messages no handler takes (answered with an error)."""
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = {}
        self._histograms: dict[str, dict[Labels, HistogramValue]] = {}

    def handler(self, type_name: str) -> HandlerStats:
        """The stats of one message type's handler, created on first use."""
        with self._lock:
            return self.handlers.setdefault(type_name, HandlerStats())

    def add(self, family: Counter, *labels: str, by: float = 1.0) -> None:
        """Count ``by`` more (never less) in the series of ``labels``."""
        _check(family, labels)
        if by < 0:
            raise ValueError(f"{family.name}: a counter never goes down (by={by})")
        with self._lock:
            series = self._values.setdefault(family.name, {})
            series[labels] = series.get(labels, 0.0) + by

    def set(self, family: Gauge, value: float, *labels: str) -> None:
        """Set a gauge's series of ``labels`` to ``value``."""
        _check(family, labels)
        with self._lock:
            self._values.setdefault(family.name, {})[labels] = float(value)

    def observe(self, family: Histogram, value: float, *labels: str) -> None:
        """Count one observation of ``value`` in the series of ``labels``."""
        _check(family, labels)
        with self._lock:
            series = self._histograms.setdefault(family.name, {})
            histogram = series.get(labels)
            if histogram is None:
                histogram = series[labels] = HistogramValue(family.buckets)
            histogram.observe(value)

    def value(self, family: Counter | Gauge, *labels: str) -> float:
        """A series' value now (0 when never counted or set)."""
        with self._lock:
            return self._values.get(family.name, {}).get(labels, 0.0)

    def total(self, family: Counter | Gauge) -> float:
        """The sum of every series of a family."""
        with self._lock:
            return sum(self._values.get(family.name, {}).values())

    def samples(self, family: Counter | Gauge) -> list[tuple[Labels, float]]:
        """Every series of a family: ``(label values, value)``."""
        with self._lock:
            return sorted(self._values.get(family.name, {}).items())

    def histograms(self, family: Histogram) -> list[tuple[Labels, list[tuple[float, int]], float]]:
        """Every series of a histogram: ``(label values, cumulative buckets, sum)``."""
        with self._lock:
            series = sorted(self._histograms.get(family.name, {}).items())
            return [(labels, value.cumulative(), value.sum) for labels, value in series]

    def clear_gauges(self, families: tuple[Family, ...]) -> None:
        """Forget the gauges of ``families``: they described an actor that is gone."""
        with self._lock:
            for family in families:
                if family.kind == "gauge":
                    self._values.pop(family.name, None)


def _check(family: Family, labels: Labels) -> None:
    if len(labels) != len(family.labels):
        raise ValueError(
            f"{family.name} takes {len(family.labels)} label values "
            f"({', '.join(family.labels) or 'none'}), got {len(labels)}"
        )
