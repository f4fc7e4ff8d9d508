"""Transactions through ``corral.connect()`` served by three real ``corral run`` daemons
on one Redis (standalone and Cluster): each request of a transaction may land on any
daemon, and every transaction still commits or rolls back exactly as written."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

import corral
from corral.errors import NotFound
from corral.ext.transaction import transaction
from corral.messages.state import StateGet, StateRegister
from tests.daemons import DaemonGroup, redis_daemons_config
from tests.redis_server import ClusterGroup, RedisServer

MANAGERS = '[managers.state]\n[managers.transaction]\ndepends_on = ["state"]\n'
TRANSACTIONS = 20


class Undo(Exception):
    """Raised inside a block to roll it back."""


def run_order(remote: corral.Client, order: int) -> None:
    """One transaction over the states of ``order`` (one hash tag, so one partition):
    writes, a savepoint kept, a nested one rolled back, reads through the transaction;
    committed, or rolled back at the end when ``order`` is a multiple of 5."""
    items, total = f"order:{{{order}}}:items", f"order:{{{order}}}:total"
    with transaction(remote) as tx:
        tx.update(items, data={"n": 1})
        tx.register(total, "Order", data={"sum": order})
        with transaction(remote):  # a savepoint, kept
            tx.update(total, data={"sum": order * 10})
            try:
                with transaction(remote):  # a savepoint, rolled back
                    tx.update(items, data={"n": 99})
                    tx.update(total, transition="suspend")
                    raise Undo
            except Undo:
                pass
        seen = tx.get(items), tx.get(total)
        assert [state.data for state in seen] == [{"n": 1}, {"sum": order * 10}]
        assert seen[1].status == "active"
        tx.update(items, data={"n": 2})
        if order % 5 == 0:
            raise Undo


async def run_order_async(remote: corral.Client, order: int, hooks: list[str]) -> None:
    """``async with`` over ``Client.ask_async``: a savepoint rolled back, a hook kept."""
    total = f"order:{{{order}}}:total"
    async with transaction(remote) as tx:
        await tx.register(total, "Order", data={"n": 1})
        tx.on_commit(lambda: hooks.append("async order committed"))
        try:
            async with transaction(remote):
                await tx.update(total, data={"n": 2})
                tx.on_commit(lambda: hooks.append("rolled back"))
                raise Undo
        except Undo:
            pass
        assert (await tx.get(total)).data == {"n": 1}


@pytest.mark.parametrize("topology", ["redis_server", "redis_cluster"])
def test_transactions_spread_over_three_daemons_all_succeed(
    topology: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    redis: RedisServer | ClusterGroup = request.getfixturevalue(topology)
    url = redis.url
    namespace = f"txd-{uuid.uuid4().hex[:8]}"
    config = redis_daemons_config(url, namespace, MANAGERS)
    with (
        DaemonGroup(tmp_path, config, count=3) as group,
        corral.connect(url, namespace=namespace) as remote,
    ):
        for order in range(TRANSACTIONS):
            remote.ask(
                StateRegister(state_id=f"order:{{{order}}}:items", state_type="Order",
                              data={"n": 0})
            )  # fmt: skip
        failures: list[str] = []
        for order in range(TRANSACTIONS):
            try:
                run_order(remote, order)
            except Undo:
                pass
            except Exception as exc:
                failures.append(f"order {order}: {exc!r}")
        assert failures == []

        for order in range(TRANSACTIONS):
            items = remote.ask(StateGet(state_id=f"order:{{{order}}}:items"))
            total_id = f"order:{{{order}}}:total"
            if order % 5 == 0:
                assert (items.data, items.version) == ({"n": 0}, 1)
                with pytest.raises(NotFound):
                    remote.ask(StateGet(state_id=total_id))
            else:
                total = remote.ask(StateGet(state_id=total_id))
                assert (items.data, items.version) == ({"n": 2}, 3)
                assert (total.data, total.version, total.status) == (
                    {"sum": order * 10}, 2, "active")  # fmt: skip

        served = [
            httpx.get(f"{daemon.http_url}/health?fresh=1", timeout=5).json()["managers"][
                "transaction"
            ]
            for daemon in group.daemons
        ]
        committed_hooks: list[str] = []
        asyncio.run(run_order_async(remote, TRANSACTIONS, committed_hooks))
        assert committed_hooks == ["async order committed"]
        assert remote.ask(StateGet(state_id=f"order:{{{TRANSACTIONS}}}:total")).data == {"n": 1}
    handled = [document["metrics"]["handled"] for document in served]
    assert all(document["details"]["backend"] == "redis" for document in served)
    assert sum(1 for n in handled if n) > 1, handled
    assert sum(document["metrics"]["committed"] for document in served) == TRANSACTIONS - 4
    assert sum(document["metrics"]["rolled_back"] for document in served) == 4
    print("transaction requests handled per daemon:", handled)
