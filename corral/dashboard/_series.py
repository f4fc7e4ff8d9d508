"""Per-manager request rate and mailbox depth over the last 15 minutes, kept in the daemon.

One sample every ``step`` seconds in a ring buffer of ``window / step`` samples (180 by
default), taken from the supervisor's latest probes, so Prometheus is not needed to see
the last quarter of an hour::

    series = Series()
    series.sample(time.time(), system.supervisor.snapshot())
    series.document()   # {"step": 5.0, "t": [...], "managers": {"cache": {"rate": [...], ...}}}

The rate is the growth of the manager's ``handled`` counter since the previous sample,
per second; a counter that went down (the manager restarted) counts from 0. A manager
that appears later has no values (``None``) before it did.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from corral.messages.system import SystemHealth

__all__ = ["SAMPLE_STEP", "WINDOW", "Series"]

WINDOW = 900.0
"""Seconds of history kept: the plots' width."""

SAMPLE_STEP = 5.0
"""Seconds between two samples."""


class Series:
    """A ring buffer of samples: per manager, messages handled per second and mailbox depth."""

    def __init__(self, *, window: float = WINDOW, step: float = SAMPLE_STEP) -> None:
        self.step = step
        self.size = max(2, round(window / step))
        self.times: deque[float] = deque(maxlen=self.size)
        self.rates: dict[str, deque[float | None]] = {}
        self.depths: dict[str, deque[int | None]] = {}
        self._handled: dict[str, float] = {}

    def sample(self, now: float, health: SystemHealth) -> None:
        """Add one sample taken at ``now`` (unix seconds) from ``health``."""
        elapsed = now - self.times[-1] if self.times else 0.0
        for name in health.managers:
            if name not in self.rates:
                self.rates[name] = deque([None] * len(self.times), maxlen=self.size)
                self.depths[name] = deque([None] * len(self.times), maxlen=self.size)
        self.times.append(now)
        for name, rates in self.rates.items():
            child = health.managers.get(name)
            if child is None:
                rates.append(None)
                self.depths[name].append(None)
                continue
            handled = child.metrics.get("handled", 0)
            before = self._handled.get(name)
            self._handled[name] = handled
            if before is None or elapsed <= 0:
                rates.append(None)
            else:
                grown = handled - before if handled >= before else handled
                rates.append(round(grown / elapsed, 2))
            self.depths[name].append(child.mailbox_depth)

    def latest_rate(self, name: str) -> float | None:
        """The manager's messages per second at the last sample (None before two samples)."""
        rates = self.rates.get(name)
        return rates[-1] if rates else None

    def document(self) -> dict[str, Any]:
        """The samples as JSON-ready lists, oldest first, times in unix seconds."""
        return {
            "step": self.step,
            "t": [round(t, 1) for t in self.times],
            "managers": {
                name: {"rate": list(rates), "depth": list(self.depths[name])}
                for name, rates in self.rates.items()
            },
        }
