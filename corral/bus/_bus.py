"""The Bus base class: subscriptions, counters and publish listeners both buses share."""

from __future__ import annotations

import abc
import logging
import threading
from collections.abc import Callable, Iterable

from corral._closing import Closing
from corral.bus._subscription import (
    DEFAULT_CALLBACK_THREADS,
    CallbackDispatcher,
    Delivery,
    Subscription,
)
from corral.errors import BackendUnavailable
from corral.messages.base import Message

__all__ = ["Bus"]

logger = logging.getLogger("corral.bus")


class Bus(Closing, abc.ABC):
    """Publish events on topics; subscribe to topics or Redis-style glob patterns.

    ``callback_threads`` (1 to :data:`MAX_CALLBACK_THREADS`): the threads that run the
    callbacks of every callback subscription of this bus; a callback that blocks holds
    one of them.
    """

    def __init__(
        self,
        *,
        queue_size: int = 10_000,
        callback_threads: int = DEFAULT_CALLBACK_THREADS,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.queue_size = queue_size
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            ("published", "delivered", "dropped", "rejected", "reconnects", "callback_errors"), 0
        )
        self._subscriptions: set[Subscription] = set()
        self._closed = False
        self._publish_listeners: tuple[Callable[[str, Message], None], ...] = ()
        self._dispatcher = CallbackDispatcher(
            max_threads=callback_threads, name="corral-bus-callback"
        )

    @abc.abstractmethod
    def publish(self, topic: str, message: Message, *, correlation: bytes | None = None) -> None:
        """Send ``message`` to every subscription matching ``topic``.

        ``correlation`` ties a reply to the request it answers (remote requests).
        """

    def on_publish(self, listener: Callable[[str, Message], None]) -> None:
        """Call ``listener(topic, message)`` on the publishing thread with every message
        published through this bus object, once it is sent: what this process publishes,
        not what it receives (the daemon's dashboard names the daemon of each event so).
        Keep it quick; an exception it raises is logged and counted as a callback error::

            bus.on_publish(lambda topic, message: print(topic))
        """
        with self._lock:
            self._publish_listeners = (*self._publish_listeners, listener)

    def _published(self, topic: str, message: Message) -> None:
        for listener in self._publish_listeners:
            try:
                listener(topic, message)
            except Exception:
                self._count("callback_errors")
                logger.exception("a publish listener failed on %s", topic)

    def subscribe(
        self,
        pattern: str,
        *,
        callback: Callable[[Delivery], None] | None = None,
        queue_size: int | None = None,
    ) -> Subscription:
        """Follow ``pattern``: an exact topic, or a glob when it holds ``*``, ``?`` or ``[``.

        With ``callback``, deliveries go to it one at a time, in order, on one of the
        bus's callback threads; an exception it raises is logged and counted, and the
        next delivery goes to it as usual.
        """
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"a pattern must be a non-empty string, got {pattern!r}")
        self._check_open()
        size = self.queue_size if queue_size is None else queue_size
        sub = Subscription(self, pattern, queue_size=size, callback=callback)
        with self._lock:
            closed = self._closed
            if not closed:
                self._subscriptions.add(sub)
        if closed:  # closed meanwhile, by another thread
            sub.close()
            self._check_open()
        self._attach(sub)
        return sub

    def stats(self) -> dict[str, int]:
        """Counters: published, delivered, dropped, rejected, reconnects, callback_errors,
        and the number of open subscriptions."""
        with self._lock:
            return {**self._counts, "subscriptions": len(self._subscriptions)}

    @property
    def healthy(self) -> bool:
        return not self._closed

    def close(self) -> None:
        """Close every subscription and release the bus's resources. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subscriptions = list(self._subscriptions)
        for sub in subscriptions:
            sub.close()
        self._shutdown()
        self._dispatcher.stop()

    @abc.abstractmethod
    def _attach(self, sub: Subscription) -> None:
        """Start routing deliveries to a new subscription."""

    @abc.abstractmethod
    def _detach(self, sub: Subscription) -> None:
        """Stop routing deliveries to a closed subscription."""

    def _shutdown(self) -> None:
        """Release what the implementation holds, after every subscription is closed."""

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(sub)
        self._detach(sub)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _fan_out(self, subs: Iterable[Subscription], delivery: Delivery) -> None:
        delivered = dropped = 0
        for sub in subs:
            outcome = sub._offer(delivery)
            if outcome == "delivered":
                delivered += 1
            elif outcome == "dropped":
                dropped += 1
        with self._lock:
            self._counts["delivered"] += delivered
            self._counts["dropped"] += dropped

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailable("the bus is closed")
