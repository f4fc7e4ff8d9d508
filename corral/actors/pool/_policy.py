"""Retry spacing: small, clock-driven, no I/O.

::

    retry_delay(options, attempt=2)   # seconds to wait before the 3rd attempt
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable

from corral._backoff import Backoff, jittered
from corral.actors.pool._options import ServiceOptions

__all__ = ["parse_retry_after", "retry_delay"]


def retry_delay(
    options: ServiceOptions, attempt: int, *, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based), jitter applied.

    exponential: delay·2^(attempt-1); linear: delay·attempt; fixed: delay — capped
    at ``retry_max_delay``, then shortened by up to ``retry_jitter`` of itself.
    """
    base, cap, jitter = options.retry_delay, options.retry_max_delay, options.retry_jitter
    if options.retry_backoff == "exponential":
        return Backoff(base, cap, jitter, rand).delay(attempt)
    delay = base * attempt if options.retry_backoff == "linear" else base
    return jittered(min(delay, cap), jitter, rand)


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
