"""The in-memory bus: message objects handed over within one process, never encoded."""

from __future__ import annotations

import re
from collections.abc import Iterable

from corral.bus._bus import Bus
from corral.bus._glob import byte_view, check_topic, compile_glob, is_pattern
from corral.bus._subscription import DEFAULT_CALLBACK_THREADS, Delivery, Subscription
from corral.messages.base import Message

__all__ = ["MemoryBus"]


class MemoryBus(Bus):
    """An in-process bus: message objects are handed over as they are, never encoded."""

    def __init__(
        self, *, queue_size: int = 10_000, callback_threads: int = DEFAULT_CALLBACK_THREADS
    ) -> None:
        super().__init__(queue_size=queue_size, callback_threads=callback_threads)
        # Copy-on-write under self._lock, so that publish reads them without locking.
        self._exact: dict[str, tuple[Subscription, ...]] = {}
        self._patterns: tuple[tuple[re.Pattern[str], Subscription], ...] = ()

    def publish(self, topic: str, message: Message, *, correlation: bytes | None = None) -> None:
        check_topic(topic)
        self._check_open()
        subs: Iterable[Subscription] = self._exact.get(topic, ())
        patterns = self._patterns
        if patterns:
            view = byte_view(topic)
            matched = [sub for regex, sub in patterns if regex.match(view)]
            if matched:
                subs = [*subs, *matched]
        self._count("published")
        self._fan_out(subs, Delivery(topic, message, correlation))
        if self._publish_listeners:
            self._published(topic, message)

    def _attach(self, sub: Subscription) -> None:
        with self._lock:
            if is_pattern(sub.pattern):
                self._patterns = (*self._patterns, (compile_glob(sub.pattern), sub))
            else:
                self._exact[sub.pattern] = (*self._exact.get(sub.pattern, ()), sub)

    def _detach(self, sub: Subscription) -> None:
        with self._lock:
            if is_pattern(sub.pattern):
                self._patterns = tuple(entry for entry in self._patterns if entry[1] is not sub)
                return
            remaining = tuple(s for s in self._exact.get(sub.pattern, ()) if s is not sub)
            if remaining:
                self._exact[sub.pattern] = remaining
            else:
                self._exact.pop(sub.pattern, None)
