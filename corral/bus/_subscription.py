"""Subscriptions: a bounded queue of deliveries, read by iteration, asyncio or a callback.

Callback subscriptions do not get a thread each: a bus runs their callbacks on a
:class:`CallbackDispatcher`, a few threads shared by all of them. A subscription is
handed to one dispatcher thread at a time, so its callbacks run one after the other,
in order; it gives its thread back after a turn of deliveries, so a busy subscription
does not starve the others, and a slow callback holds only the thread it runs on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

from corral._closing import Closing
from corral._loops import call_soon_batched, settle
from corral.messages.base import Message

if TYPE_CHECKING:
    from corral.bus._bus import Bus

__all__ = [
    "DEFAULT_CALLBACK_THREADS",
    "MAX_CALLBACK_THREADS",
    "CallbackDispatcher",
    "Delivery",
    "Offer",
    "Subscription",
]

logger = logging.getLogger("corral.bus")

DEFAULT_CALLBACK_THREADS = 4
"""Threads a bus shares among its callback subscriptions (``[bus] callback_threads``)."""
MAX_CALLBACK_THREADS = 16

_CALLBACK_JOIN_TIMEOUT = 5.0
_FULL_QUEUE_POLL = 0.01
_TURN = 64
"""Deliveries a subscription's callback takes before giving its thread to the next one."""


class Delivery(NamedTuple):
    """One message as a subscription receives it, with the topic it was published on.

    ``correlation`` is the id of the request a reply answers (remote requests), else None.
    """

    topic: str
    message: Message
    correlation: bytes | None = None


_AsyncWaiter = tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]

Offer = Literal["delivered", "dropped", "closed"]
"""What became of a delivery offered to a subscription."""


class CallbackDispatcher:
    """Runs the callbacks of callback subscriptions on at most ``max_threads`` threads.

    Threads start as callback subscriptions come (one per subscription until there are
    ``max_threads``) and stop with :meth:`stop`::

        dispatcher = CallbackDispatcher(max_threads=4, name="corral-bus-callback")
    """

    def __init__(self, *, max_threads: int, name: str) -> None:
        if not 1 <= max_threads <= MAX_CALLBACK_THREADS:
            raise ValueError(f"max_threads must be between 1 and {MAX_CALLBACK_THREADS}")
        self.max_threads = max_threads
        self.name = name
        self._ready: queue.SimpleQueue[Subscription | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def __repr__(self) -> str:
        return f"<CallbackDispatcher {self.name!r} {len(self._threads)}/{self.max_threads} threads>"

    def add_subscription(self) -> None:
        """Make room for one more callback subscription: a thread, unless there are enough."""
        with self._lock:
            if self._stopped or len(self._threads) >= self.max_threads:
                return
            thread = threading.Thread(
                target=self._work, name=f"{self.name}-{len(self._threads) + 1}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def schedule(self, sub: Subscription) -> None:
        """Give ``sub`` a turn on the next free thread (it has deliveries waiting)."""
        self._ready.put(sub)

    def stop(self, timeout: float = _CALLBACK_JOIN_TIMEOUT) -> None:
        """Let the threads finish the turns they are in, and end them. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            threads = list(self._threads)
        for _ in threads:
            self._ready.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        while (sub := self._ready.get()) is not None:
            sub._take_turn()


class Subscription(Closing):
    """Deliveries whose topic matches ``pattern``, in a bounded queue.

    Read them with :meth:`get`, by iterating (blocking), or with ``async for``;
    or pass ``callback`` to :meth:`Bus.subscribe` and they are handed to it, one at a
    time and in order, on a thread the bus shares among its callback subscriptions
    (then do not read them here as well).
    """

    def __init__(
        self,
        bus: Bus,
        pattern: str,
        *,
        queue_size: int,
        callback: Callable[[Delivery], None] | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.pattern = pattern
        self.dropped = 0
        self.callback_errors = 0
        self._bus = bus
        self._maxsize = queue_size
        self._items: collections.deque[Delivery] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._async_waiters: list[_AsyncWaiter] = []
        self._callback = callback
        self._scheduled = False
        """Its callback has a turn coming or running on a dispatcher thread."""
        self._running_on: threading.Thread | None = None
        """The dispatcher thread running its callback now."""
        if callback is not None:
            bus._dispatcher.add_subscription()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._items)} queued"
        return f"<Subscription {self.pattern!r} {state}, {self.dropped} dropped>"

    @property
    def closed(self) -> bool:
        return self._closed

    def get(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery; None on timeout or once the subscription is closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed, timeout)
            if self._closed or not self._items:
                return None
            return self._items.popleft()

    def put(self, deliveries: Sequence[Delivery]) -> bool:
        """Queue ``deliveries`` in order, waiting for room instead of dropping any.

        For a producer that must not lose what it delivers (a durable subscription's
        reader); a bus's own deliveries are dropped and counted when the queue is full.
        False once the subscription is closed::

            sub.put([Delivery("state.changed.User.1", event)])
        """
        while deliveries:
            with self._cond:
                while len(self._items) >= self._maxsize and not self._closed:
                    self._cond.wait(_FULL_QUEUE_POLL)
                if self._closed:
                    return False
                room = self._maxsize - len(self._items)
                self._items.extend(deliveries[:room])
                waiters = self._queued(wake_all=True)
            _wake(waiters)
            deliveries = deliveries[room:]
        return True

    def __iter__(self) -> Iterator[Delivery]:
        while (delivery := self.get()) is not None:
            yield delivery

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Delivery]:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._closed:
                    return
                if self._items:
                    delivery: Delivery | None = self._items.popleft()
                else:
                    delivery = None
                    waiter: asyncio.Future[None] = loop.create_future()
                    self._async_waiters.append((loop, waiter))
            if delivery is not None:
                yield delivery
                continue
            try:
                await waiter
            finally:
                with self._cond:
                    if (loop, waiter) in self._async_waiters:
                        self._async_waiters.remove((loop, waiter))

    def close(self) -> None:
        """Stop receiving and unsubscribe; blocked readers get None. Idempotent.

        A callback running meanwhile is waited for (a few seconds at most), unless it
        is the one closing its own subscription.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._items.clear()
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        _wake(waiters)
        self._bus._unsubscribe(self)
        if self._callback is None:
            return
        with self._cond:
            if self._running_on is threading.current_thread():
                return
            finished = self._cond.wait_for(lambda: self._running_on is None, _CALLBACK_JOIN_TIMEOUT)
        if not finished:
            logger.warning(
                "subscription %r closed, but its callback is still running after %gs",
                self.pattern,
                _CALLBACK_JOIN_TIMEOUT,
            )

    # -- for the bus ---------------------------------------------------------------------

    def _offer(self, delivery: Delivery) -> Offer:
        with self._cond:
            if self._closed:
                return "closed"
            if len(self._items) >= self._maxsize:
                self.dropped += 1
                return "dropped"
            self._items.append(delivery)
            waiters = self._queued(wake_all=False)
        _wake(waiters)
        return "delivered"

    def _queued(self, *, wake_all: bool) -> list[_AsyncWaiter]:
        """Tell whoever reads that deliveries were queued; under ``_cond``. Returns the
        asyncio waiters to wake once the lock is released."""
        if self._callback is not None:
            if not self._scheduled:
                self._scheduled = True
                self._bus._dispatcher.schedule(self)
            return []
        if wake_all:
            self._cond.notify_all()
        else:
            self._cond.notify()
        waiters, self._async_waiters = self._async_waiters, []
        return waiters

    def _take_turn(self) -> None:
        """Run the callback on up to a turn of deliveries (on a dispatcher thread)."""
        callback = self._callback
        assert callback is not None
        for _ in range(_TURN):
            with self._cond:
                if self._closed or not self._items:
                    self._end_turn()
                    return
                delivery = self._items.popleft()
                self._running_on = threading.current_thread()
            try:
                callback(delivery)
            except Exception:
                with self._cond:
                    self.callback_errors += 1
                self._bus._count("callback_errors")
                logger.exception(
                    "subscription %r: callback failed on %s", self.pattern, delivery.topic
                )
        with self._cond:
            if self._closed or not self._items:
                self._end_turn()
                return
            self._running_on = None
        self._bus._dispatcher.schedule(self)  # more to do: after the others waiting

    def _end_turn(self) -> None:
        """Under ``_cond``: nothing more to run until the next delivery is queued."""
        self._scheduled = False
        self._running_on = None
        self._cond.notify_all()  # close() may wait for the callback to finish


def _wake(waiters: list[_AsyncWaiter]) -> None:
    for loop, waiter in waiters:
        # RuntimeError: that event loop is closed, so nobody waits on it any more.
        with contextlib.suppress(RuntimeError):
            call_soon_batched(loop, settle, waiter)
