"""corral._loops: callbacks handed to an event loop from other threads, in batches."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from corral._loops import call_soon_batched, settle


def test_callbacks_from_many_threads_all_run_each_thread_s_in_order() -> None:
    seen: list[tuple[int, int]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def record(thread: int, n: int) -> None:
            seen.append((thread, n))
            if len(seen) == 4 * 500:
                done.set()

        def send(thread: int) -> None:
            for n in range(500):
                call_soon_batched(loop, record, thread, n)

        threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        await asyncio.wait_for(done.wait(), 10)
        for thread in threads:
            thread.join()

    asyncio.run(main())
    for thread in range(4):
        assert [n for t, n in seen if t == thread] == list(range(500))


def test_a_callback_that_raises_is_reported_and_the_others_still_run() -> None:
    reported: list[dict[str, Any]] = []
    ran: list[str] = []

    def boom() -> None:
        raise ValueError("boom")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        finished = asyncio.Event()

        def queue_all() -> None:
            call_soon_batched(loop, ran.append, "before")
            call_soon_batched(loop, boom)
            call_soon_batched(loop, ran.append, "after")
            call_soon_batched(loop, finished.set)

        await asyncio.to_thread(queue_all)
        await asyncio.wait_for(finished.wait(), 10)

    asyncio.run(main())
    assert ran == ["before", "after"]
    assert [type(c["exception"]) for c in reported] == [ValueError]


def test_a_closed_loop_raises_runtime_error_and_a_new_loop_is_not_blocked() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError):
        call_soon_batched(loop, print, "never")

    async def main() -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        call_soon_batched(asyncio.get_running_loop(), future.set_result, "ran")
        return await asyncio.wait_for(future, 10)

    assert asyncio.run(main()) == "ran"


def test_settle_gives_a_result_or_an_error_and_leaves_a_done_future_alone() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        answered, failed, cancelled = (loop.create_future() for _ in range(3))
        settle(answered, "reply")
        settle(failed, error=ValueError("refused"))
        cancelled.cancel()  # its caller stopped waiting
        settle(cancelled, "late reply")
        settle(answered, "second reply")
        assert answered.result() == "reply"
        assert isinstance(failed.exception(), ValueError)
        assert cancelled.cancelled()

    asyncio.run(main())
