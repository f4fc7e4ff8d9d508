"""An asyncio loop in its own thread, for the calls a handler hands over.

A handler that must wait on the network takes its caller's reply with
``self.defer_reply()``, hands the work to the :class:`LoopThread` and returns at
once; the mailbox moves on, and the reply is sent from the loop when the work
completes::

    @handles(HttpRequest)
    def http_request(self, msg: HttpRequest) -> None:
        reply = self.defer_reply()
        self.loop.spawn(answer(reply, self.fetch(msg)))
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from corral._loops import call_soon_batched

__all__ = ["LoopThread"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a daemon thread of its own.

    ``spawn`` schedules a coroutine from any thread without waiting; ``call``
    runs one and waits for its result (for start, stop and health, not for
    requests). ``stop`` gives running tasks ``grace`` seconds, then cancels them.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.tasks: set[asyncio.Task[Any]] = set()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` on the loop as a task; returns at once. Raises RuntimeError if closed."""
        call_soon_batched(self.loop, self._create_task, work)

    def _create_task(self, work: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(work)
        self.tasks.add(task)  # the loop keeps only weak references to its tasks
        task.add_done_callback(self.tasks.discard)

    def call(self, work: Awaitable[T], timeout: float) -> T:
        """Run ``work`` on the loop and wait for its result; TimeoutError past ``timeout``."""
        future = asyncio.run_coroutine_threadsafe(_awaited(work), self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the event loop did not answer within {timeout:g}s") from None

    def stop(
        self,
        *,
        grace: float,
        timeout: float,
        cleanup: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Let tasks finish for ``grace`` seconds, cancel the rest, run ``cleanup``, stop
        the loop, join. Every task left on the loop is cancelled and awaited first, so
        none is destroyed while pending."""
        if not self.alive:
            return
        try:
            self.call(self._drain(grace, cleanup), timeout=grace + timeout)
        except (TimeoutError, RuntimeError):
            log.warning("event loop %s did not drain in time", self._thread.name)
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # closed already
            return
        self._thread.join(timeout)

    async def _drain(self, grace: float, cleanup: Callable[[], Awaitable[None]] | None) -> None:
        pending = set(self.tasks)
        if pending and grace > 0:
            await asyncio.wait(pending, timeout=grace)
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=1.0)
        if cleanup is not None:
            try:
                await cleanup()
            except Exception:
                log.warning("event loop %s: cleanup failed", self._thread.name, exc_info=True)
        others = asyncio.all_tasks() - {asyncio.current_task()}
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=1.0)


async def _awaited(work: Awaitable[T]) -> T:
    return await work
