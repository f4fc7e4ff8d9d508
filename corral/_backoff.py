"""One backoff policy for every retry and reconnect loop: exponential, capped, jittered.

After ``n`` failures in a row the next attempt waits ``initial``·2^(n-1) seconds, at
most ``cap``, shortened at random by up to ``jitter`` of itself: 0 waits exactly that
long, 0.5 between half of it and all of it, 1 anywhere from nothing to all of it (the
"full jitter" of AWS's study of backoff). Many clients cut off at once then come back
spread out, not together::

    backoff = Backoff(initial=0.1, cap=5.0, jitter=0.5)
    failures = 0
    while not stopping.is_set():
        try:
            serve()
            failures = 0
        except ConnectionError:
            failures += 1
            stopping.wait(backoff.delay(failures))
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff", "jittered"]


def jittered(delay: float, jitter: float, rand: Callable[[], float] = random.random) -> float:
    """``delay`` shortened at random by up to ``jitter`` (0..1) of itself."""
    return delay * (1.0 - jitter * rand())


@dataclass(frozen=True)
class Backoff:
    """Exponential delays with a cap and jitter (see the module docstring)."""

    initial: float
    cap: float
    jitter: float = 0.5
    rand: Callable[[], float] = random.random
    """Uniform in [0, 1): replaced in tests to pick the jitter."""

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` (>= 1) failures in a row."""
        exact = min(self.cap, self.initial * 2.0 ** min(max(0, failures - 1), 60))
        return jittered(exact, self.jitter, self.rand)
