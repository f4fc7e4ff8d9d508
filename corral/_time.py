"""The wall clock in unix milliseconds, as states, transactions and rooms record it."""

from __future__ import annotations

import time

__all__ = ["now_ms"]


def now_ms() -> int:
    """Unix time in whole milliseconds: ``now_ms() - state.updated_at`` is an age in ms."""
    return int(time.time() * 1000)
