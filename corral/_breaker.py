"""One circuit breaker for every remote dependency: clock-driven, no I/O, no threads.

closed → (``threshold`` consecutive failures) → open → (the first call after
``cooldown`` seconds) → half_open, where ``probes`` calls may run at once: a success
closes it, a failure opens it again. As in pybreaker and resilience4j, an open breaker
turns half-open when a call asks for it, not by itself: until then ``state`` reads
"open"::

    breaker = CircuitBreaker(threshold=5, cooldown=30.0)
    if breaker.allow():               # closed, or a half-open probe slot was free
        ok = call()
        breaker.record(ok)            # a failure at the threshold opens it
    else:
        fail_fast(breaker.seconds_until_half_open())
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

__all__ = ["BreakerState", "CircuitBreaker"]

BreakerState = Literal["closed", "open", "half_open"]
Transition = Callable[[BreakerState, BreakerState], None]


def _nothing(_old: BreakerState, _new: BreakerState) -> None:
    return None


class CircuitBreaker:
    """A circuit breaker, used from one thread (an actor's, or an event loop's).

    ``failures`` counts the consecutive failures; ``transitions`` every change of
    state, and ``on_transition(old, new)`` is called at each. ``clock`` (monotonic
    seconds) may be replaced in tests.
    """

    def __init__(
        self,
        threshold: int,
        cooldown: float,
        *,
        probes: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Transition = _nothing,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.probes = probes
        self.clock = clock
        self.on_transition = on_transition
        self.state: BreakerState = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self.probing = 0
        """Half-open calls allowed and not recorded yet."""
        self.transitions = 0

    def available(self) -> bool:
        """Would :meth:`allow` let a call through now (without taking a probe slot)?"""
        if self.state == "closed":
            return True
        if self.state == "open":
            return self.seconds_until_half_open() == 0.0
        return self.probing < self.probes

    def allow(self) -> bool:
        """Take the right to make one call; every True must be followed by :meth:`record`."""
        if not self.available():
            return False
        if self.state == "open":
            self._move("half_open")
        if self.state == "half_open":
            self.probing += 1
        return True

    def record(self, outcome: bool | None) -> None:
        """The outcome of an allowed call: True success, False failure, None says nothing
        of the dependency (the call was refused on our side)."""
        if self.state == "half_open":
            self.probing = max(0, self.probing - 1)
        if outcome is None or self.state == "open":  # a late answer from before it opened
            return
        if outcome:
            self.failures = 0
            if self.state != "closed":
                self._move("closed")
            return
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.threshold:
            self.opened_at = self.clock()
            self._move("open")

    def seconds_until_half_open(self) -> float:
        """0 unless open; then how long until a call may probe."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.cooldown - (self.clock() - self.opened_at))

    def _move(self, state: BreakerState) -> None:
        old, self.state = self.state, state
        self.transitions += 1
        if state != "half_open":
            self.probing = 0
        self.on_transition(old, state)
