"""``ask_many`` and ``ask_many_async``: many requests at once, replies in order, each
error in its place; in process, and through ``corral.connect()`` in one Redis round trip,
standalone and Cluster."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

import corral
from corral.actors.cache import CacheManager
from corral.actors.state import StateManager
from corral.config import BusSection, Config, DaemonSection, ManagerSection
from corral.daemon import Daemon
from corral.errors import CorralError, InvalidMessage, ManagerUnavailable, NotFound, Timeout
from corral.messages.base import MAX_BATCH, Reply, Request
from corral.messages.cache import CacheGet, CacheSet, CacheStored, CacheValue
from corral.messages.pool import PoolStats
from corral.messages.state import StateGet, StateInfo, StateRegister
from tests.support import Done, Work

Batch = Callable[[Sequence[Request[Any]]], list[Reply | CorralError]]


def _asker(target: corral.System | corral.Client, way: str) -> Batch:
    """``target``'s ask_many, or its ask_many_async run to completion."""
    if way == "sync":
        return target.ask_many
    return lambda messages: asyncio.run(target.ask_many_async(messages))


WAYS = pytest.mark.parametrize("way", ["sync", "async"])


@WAYS
def test_in_process_replies_come_in_order_with_each_error_in_its_place(way: str) -> None:
    with corral.System(managers=[CacheManager, StateManager]) as system:
        ask_many = _asker(system, way)
        answers = ask_many(
            [
                CacheSet(key="a", value=1),
                StateRegister(state_id="u1", state_type="User"),
                CacheGet(key="a"),
                StateGet(state_id="nobody"),
                PoolStats(),  # no pool manager here
                CacheGet(key="missing"),
            ]
        )
        assert isinstance(answers[0], CacheStored)
        assert isinstance(answers[1], StateInfo) and answers[1].state_id == "u1"
        assert isinstance(answers[2], CacheValue) and answers[2].value == 1
        assert isinstance(answers[3], NotFound)
        assert isinstance(answers[4], ManagerUnavailable)
        assert isinstance(answers[5], CacheValue) and not answers[5].found
        for wrong in ([], [CacheGet(key="k")] * (MAX_BATCH + 1)):
            with pytest.raises(InvalidMessage, match="a batch holds 1 to"):
                ask_many(wrong)


@pytest.fixture
def daemons(redis_url: str) -> Iterator[str]:
    """Two daemons serving cache and state under a namespace of their own; its name."""
    namespace = f"batch{uuid.uuid4().hex[:8]}"
    config = Config().replace(
        bus=BusSection(backend="redis", url=redis_url, namespace=namespace),
        daemon=DaemonSection(port=0),
        managers={"cache": ManagerSection(), "state": ManagerSection()},
    )
    with Daemon(config), Daemon(config):
        yield namespace


@WAYS
def test_through_connect_many_requests_go_in_one_round_trip(
    redis_url: str, daemons: str, way: str
) -> None:
    with corral.connect(redis_url, namespace=daemons, validate_messages=True) as client:
        ask_many = _asker(client, way)
        keys = [f"k{i}" for i in range(100)]
        stored = ask_many([CacheSet(key=k, value=i) for i, k in enumerate(keys)])
        assert all(isinstance(answer, CacheStored) for answer in stored)
        answers = ask_many(
            [
                *(CacheGet(key=k) for k in keys),
                StateGet(state_id="nobody"),
                CacheSet(key="bad", value=1, ttl=-1),  # refused before it is sent
                PoolStats(),  # no daemon serves a pool
            ]
        )
        values = answers[:100]
        assert [a.value for a in values if isinstance(a, CacheValue)] == list(range(100))
        assert isinstance(answers[100], NotFound)
        assert isinstance(answers[101], InvalidMessage) and answers[101].path == "ttl"
        assert isinstance(answers[102], ManagerUnavailable)
        assert "no corral daemon is serving pool" in answers[102].message


def test_ask_many_async_keeps_the_loop_free_and_times_out_only_the_late_request() -> None:
    gate = threading.Event()
    config = Config().replace(
        managers={
            name: ManagerSection(class_path="tests.support:Worker", options={"gate": gate})
            for name in ("fast", "slow")
        }
    )

    async def main() -> tuple[list[Reply | CorralError], Done, bool]:
        batch = asyncio.create_task(
            system.ask_many_async(
                [
                    Work(target="fast"),
                    Work(target="slow", action="block"),
                    Work(target="fast"),
                ],
                timeout=2.0,
            )
        )
        meanwhile = await system.ask_async(Work(target="fast"))  # the loop is not blocked
        waiting_then = not batch.done()
        return await batch, meanwhile, waiting_then

    with corral.System(config) as system:
        try:
            answers, meanwhile, waiting_then = asyncio.run(main())
        finally:
            gate.set()
    assert waiting_then and meanwhile.name == "fast"
    assert [type(a) for a in answers] == [Done, Timeout, Done]
    assert [a.name for a in answers if isinstance(a, Done)] == ["fast", "fast"]
