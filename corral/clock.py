"""Where managers and the supervisor read the time, so that tests can move it.

A :class:`System` reads time through one :class:`Clock`: the managers' TTLs, idle
timeouts, rate-limit windows, ban and token times, circuit-breaker cool-downs, and the
supervisor's restart backoff and intensity window. The default is the machine's clock;
a test passes a :class:`ManualClock` and advances it instead of sleeping::

    clock = ManualClock()
    with corral.System(managers=[CacheManager], clock=clock) as system:
        system.ask(CacheSet(key="k", value=1, ttl=60))
        clock.advance(60)
        system.ask(CacheGet(key="k")).found        # False: expired, without waiting

After moving the clock, ``system.supervisor.settle()`` returns once the supervisor has
acted on the new time (a restart whose backoff is over has happened). Time kept by
Redis (its ``TIME``, its key TTLs) and real waits (timeouts on a reply, the liveness
probe) are not the clock's: a manual clock moves neither.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """A source of time: ``monotonic()`` for durations, ``time()`` (unix seconds) for
    timestamps that outlive the process or cross it (token expiries, bans)."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


@dataclass(frozen=True)
class SystemClock:
    """The machine's clocks: :func:`time.monotonic` and :func:`time.time`. Every
    SystemClock is equal to every other: they read the same time."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class ManualClock:
    """A clock that stands still until :meth:`advance` moves it.

    It starts at the machine's time when made, so that its timestamps read as today's
    to other processes (Redis, a JWT library); from then on only ``advance`` moves
    both readings, by the same amount. Safe to advance from any thread::

        clock = ManualClock()
        before = clock.monotonic()
        clock.advance(2.5)
        assert clock.monotonic() == before + 2.5
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._monotonic = time.monotonic()
        self._time = time.time()

    def monotonic(self) -> float:
        return self._monotonic

    def time(self) -> float:
        return self._time

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward (never back)."""
        if seconds < 0:
            raise ValueError(f"a clock only moves forward, not by {seconds:g}s")
        with self._lock:
            self._monotonic += seconds
            self._time += seconds
