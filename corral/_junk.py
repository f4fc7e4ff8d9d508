"""Rejected input, counted by kind and logged at most once per kind per interval.

Whatever arrives from outside — a request stream entry, a pub/sub message, a
WebSocket frame — may be junk. Junk is refused, counted (``/metrics`` shows the
counts as ``corral_rejected_total{source, kind}``), and logged without a traceback,
once per kind per ``interval`` with how many more came meanwhile, so that a flood
of junk cannot flood the logs::

    REJECTED.reject("remote", "undecodable", "not a msgpack message", log)
    REJECTED.counts()    # {("remote", "undecodable"): 1}
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from corral.errors import InvalidMessage

__all__ = ["REJECTED", "Rejections", "junk_kind"]

LOG_INTERVAL = 10.0
"""Seconds between two log lines about the same kind of junk."""


class Rejections:
    """Counts of rejected input by ``(source, kind)``; thread-safe."""

    def __init__(
        self, *, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._next_log: dict[tuple[str, str], float] = {}
        self._unlogged: dict[tuple[str, str], int] = {}

    def reject(self, source: str, kind: str, detail: str, logger: logging.Logger) -> None:
        """Count one piece of junk; log it unless this kind was logged less than
        ``interval`` seconds ago."""
        key = (source, kind)
        now = self._clock()
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
            if now < self._next_log.get(key, float("-inf")):
                self._unlogged[key] = self._unlogged.get(key, 0) + 1
                return
            self._next_log[key] = now + self.interval
            more = self._unlogged.pop(key, 0)
        logger.warning(
            "rejected %s input (%s): %s%s",
            source,
            kind,
            detail,
            f" (and {more} more of this kind since the last report)" if more else "",
        )

    def counts(self) -> dict[tuple[str, str], int]:
        """Every count so far, by ``(source, kind)``."""
        with self._lock:
            return dict(self._counts)


def junk_kind(exc: InvalidMessage) -> str:
    """What kind of junk a message that does not decode is, for the counts."""
    path = exc.path
    if path == "s":
        return "bad_signature"
    if path == "t":
        return "unknown_type"
    if path == "d":
        return "bad_deadline"
    if path in ("b", "body") or path.startswith(("b.", "body.")):
        return "invalid_message"
    return "undecodable" if not path else "bad_envelope"


REJECTED = Rejections()
"""The process's counts: every reader of outside input reports here."""
