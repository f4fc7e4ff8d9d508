"""Handing callbacks to an asyncio event loop from other threads, one wake-up per batch.

``loop.call_soon_threadsafe`` writes to the loop's self-pipe on every call: a system
call that lets go of the GIL, after which the calling thread may wait for it behind
every other busy thread. When a manager answers a burst of ``ask_async`` calls, that
is once per reply. :func:`call_soon_batched` queues the callback and wakes the loop
only when no wake-up is pending already; the loop then runs everything queued, in
order::

    call_soon_batched(loop, future.set_result, 42)
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["call_soon_batched", "settle"]


class _Inbox:
    """The callbacks queued for one loop, and whether a wake-up is on its way."""

    __slots__ = ("lock", "queued", "waking")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queued: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self.waking = False

    def put(
        self, loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        with self.lock:
            self.queued.append((callback, args))
            if self.waking:
                return
            self.waking = True
        try:
            loop.call_soon_threadsafe(self.run, loop)
        except RuntimeError:  # the loop is closed: nothing queued will ever run
            with self.lock:
                self.queued.clear()
                self.waking = False
            raise

    def run(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            batch = list(self.queued)
            self.queued.clear()
            self.waking = False
        for callback, args in batch:
            try:
                callback(*args)
            except Exception as exc:  # as the loop does for a callback of its own
                loop.call_exception_handler(
                    {"message": f"Exception in callback {callback!r}", "exception": exc}
                )


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()
_inboxes_lock = threading.Lock()


def call_soon_batched(
    loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any
) -> None:
    """Run ``callback(*args)`` on ``loop`` soon, from any thread (see the module docstring).

    Callbacks queued from one thread run in the order they were queued. Raises
    RuntimeError when the loop is closed, as ``call_soon_threadsafe`` does.
    """
    inbox = _inboxes.get(loop)
    if inbox is None:
        with _inboxes_lock:
            inbox = _inboxes.get(loop)
            if inbox is None:
                inbox = _inboxes[loop] = _Inbox()
    inbox.put(loop, callback, args)


def settle(
    future: asyncio.Future[Any], value: Any = None, error: BaseException | None = None
) -> None:
    """Give ``future`` its result (or ``error``), unless it is done already: a caller that
    stopped waiting (a timeout) has cancelled it. On the future's loop; as a callback of
    :func:`call_soon_batched` from other threads."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
