"""Retry spacing and the circuit breaker: small, clock-driven, no I/O.

::

    breaker = Breaker(threshold=5, open_seconds=30.0, probes=1)
    if breaker.allow():               # closed, or a half-open probe slot was free
        ...call...
        breaker.record(ok)            # a failure at the threshold opens it
    retry_delay(options, attempt=2)   # seconds to wait before the 3rd attempt
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from typing import Literal

from corral.actors.pool._options import ServiceOptions

__all__ = ["Breaker", "BreakerState", "parse_retry_after", "retry_delay"]

BreakerState = Literal["closed", "open", "half_open"]


def retry_delay(
    options: ServiceOptions, attempt: int, *, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based), jitter applied.

    exponential: delay·2^(attempt-1); linear: delay·attempt; fixed: delay — capped
    at ``retry_max_delay``, then shortened by up to ``retry_jitter`` of itself.
    """
    base = options.retry_delay
    if options.retry_backoff == "exponential":
        delay = base * 2.0 ** min(attempt - 1, 60)
    elif options.retry_backoff == "linear":
        delay = base * attempt
    else:
        delay = base
    delay = min(delay, options.retry_max_delay)
    return delay * (1.0 - options.retry_jitter * rand())


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds from now: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Breaker:
    """A circuit breaker for one base URL; its state stays local to this process.

    closed → (``threshold`` consecutive failures) → open → (``open_seconds``) →
    half_open, where ``probes`` calls may run at once: a success closes it, a
    failure opens it again. ``transitions`` counts every change of state, and
    ``on_transition`` is called at each.
    """

    def __init__(
        self,
        threshold: int,
        open_seconds: float,
        probes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[], None] = lambda: None,
    ) -> None:
        self.threshold = threshold
        self.on_transition = on_transition
        self.open_seconds = open_seconds
        self.probes = probes
        self.clock = clock
        self._state: BreakerState = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self.probing = 0
        self.transitions = 0

    @property
    def state(self) -> BreakerState:
        if self._state == "open" and self.clock() - self.opened_at >= self.open_seconds:
            self._move("half_open")
        return self._state

    def available(self) -> bool:
        """Would :meth:`allow` let a call through now (without taking a probe slot)?"""
        state = self.state
        return state == "closed" or (state == "half_open" and self.probing < self.probes)

    def allow(self) -> bool:
        """Take the right to make one call; every True must be followed by :meth:`record`."""
        if not self.available():
            return False
        if self._state == "half_open":
            self.probing += 1
        return True

    def record(self, outcome: bool | None) -> None:
        """The outcome of an allowed call: True success, False failure, None says nothing."""
        if self._state == "half_open":
            self.probing = max(0, self.probing - 1)
        if outcome is None or self._state == "open":  # a late answer from before it opened
            return
        if outcome:
            self.failures = 0
            if self._state != "closed":
                self._move("closed")
            return
        self.failures += 1
        if self._state == "half_open" or self.failures >= self.threshold:
            self.opened_at = self.clock()
            self._move("open")

    def seconds_until_half_open(self) -> float:
        if self.state != "open":
            return 0.0
        return max(0.0, self.open_seconds - (self.clock() - self.opened_at))

    def _move(self, state: BreakerState) -> None:
        self._state = state
        self.transitions += 1
        self.on_transition()
        if state != "half_open":
            self.probing = 0
