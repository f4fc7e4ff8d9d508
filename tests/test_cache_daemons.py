"""The cache manager served by three real ``corral run`` daemons on one Redis (standalone
and a cluster): one computation for a key however many daemons take its callers, values
shared by default, a released lease passed to a waiter on another daemon, tiered L1s
kept coherent (writes made outside corral too), a stale value refreshed once, a lock
passed on by a release on any daemon, and the start-up warning for a per-process backend
on a Redis bus."""

from __future__ import annotations

import json
import signal
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

import corral
from corral._redis import connect
from corral.client import Client
from corral.ext.cache import cached, lock
from corral.messages.cache import (
    CacheGet,
    CacheGetOrLease,
    CacheLease,
    CacheLock,
    CacheLocked,
    CacheRelease,
    CacheSet,
    CacheUnlock,
)
from tests.daemons import DaemonGroup, DaemonProcess, redis_daemons_config
from tests.support import wait_until

CALLERS = 20


@pytest.fixture
def namespace() -> str:
    return f"cd{uuid.uuid4().hex[:8]}"


@pytest.fixture
def daemons(tmp_path: Any, redis_url: str, namespace: str) -> Iterator[DaemonGroup]:
    """Three daemons serving ``[managers.cache]`` with its defaults."""
    config = redis_daemons_config(redis_url, namespace, "[managers.cache]\n")
    with DaemonGroup(tmp_path, config, count=3) as group:
        yield group


@pytest.fixture
def client(daemons: DaemonGroup, redis_url: str, namespace: str) -> Iterator[Client]:
    with corral.connect(redis_url, namespace=namespace, ask_timeout=15.0) as remote:
        yield remote


def lease_waiters(daemon: DaemonProcess) -> int:
    """How many callers wait for a lease on ``daemon``, from its /health."""
    with urllib.request.urlopen(f"{daemon.http_url}/health?fresh=1", timeout=5) as response:
        document = json.load(response)
    waiters: int = document["managers"]["cache"]["metrics"]["lease_waiters"]
    return waiters


def test_a_concurrent_miss_on_three_daemons_loads_once(client: Client) -> None:
    loads = 0
    counting = threading.Lock()
    everyone_asks = threading.Barrier(CALLERS)

    @cached(client, ttl=60, key=lambda n: f"report:{n}")
    def report(n: int) -> dict[str, int]:
        nonlocal loads
        with counting:
            loads += 1
        threading.Event().wait(0.5)  # a slow load: every caller asks meanwhile
        return {"n": n, "rows": 1000}

    results: list[dict[str, int]] = []

    def call() -> None:
        everyone_asks.wait()
        results.append(report(7))

    threads = [threading.Thread(target=call) for _ in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert loads == 1
    assert results == [{"n": 7, "rows": 1000}] * CALLERS


def test_default_backend_shares_values_between_daemons(client: Client) -> None:
    for n in range(200):
        client.ask(CacheSet(key=f"user:{n}", value={"n": n}))
    found = [client.ask(CacheGet(key=f"user:{n}")) for n in range(200)]
    assert [(reply.found, reply.value) for reply in found] == [(True, {"n": n}) for n in range(200)]


def test_a_released_lease_passes_to_a_waiter_on_another_daemon(
    daemons: DaemonGroup, client: Client, redis_url: str, namespace: str
) -> None:
    holder = client.ask(CacheGetOrLease(key="k", lease_ttl=30))
    assert not holder.found and holder.lease
    answers: list[CacheLease] = []
    waiter = threading.Thread(
        target=lambda: answers.append(
            client.ask(CacheGetOrLease(key="k", lease_ttl=30, wait=10), timeout=15)
        )
    )
    waiter.start()
    waiting = wait_until(
        lambda: next((d for d in daemons.daemons if lease_waiters(d) == 1), None), timeout=10
    )
    # With the waiter's daemon stopped, another daemon takes the release.
    waiting.signal(signal.SIGSTOP)
    try:
        assert client.ask(CacheRelease(key="k", lease=holder.lease)).released is True
    finally:
        waiting.signal(signal.SIGCONT)
    waiter.join(15)
    (answer,) = answers
    assert not answer.found and answer.lease and answer.lease != holder.lease
    raw = connect(redis_url)
    try:
        assert raw.get(f"{namespace}:cache:redis:lease:{{k}}") == answer.lease.encode()
    finally:
        raw.close()


def test_a_memory_backend_on_a_redis_bus_is_warned_of_once(
    tmp_path: Any, redis_url: str, namespace: str
) -> None:
    managers = '[managers.cache.backends.local]\ntype = "memory"\n'
    with DaemonGroup(tmp_path, redis_daemons_config(redis_url, namespace, managers)) as group:
        for daemon in group.daemons:
            log = daemon.wait_for("cache backend local: memory, in this process")
            assert log.count("cache backend local: memory") == 1
            assert "each daemon has its own values" in log


@pytest.mark.parametrize("writer", ["corral", "a plain Redis client"])
def test_tiered_l1s_of_three_daemons_follow_a_change(
    tmp_path: Any, redis_url: str, namespace: str, writer: str
) -> None:
    managers = '[managers.cache.backends.main]\ntype = "tiered"\n'
    config = redis_daemons_config(redis_url, namespace, managers)
    with (
        DaemonGroup(tmp_path, config, count=3),
        corral.connect(redis_url, namespace=namespace) as remote,
        connect(redis_url) as raw,
    ):
        remote.ask(CacheSet(key="price", value=1))
        for _ in range(30):  # the reads fill the L1 of every daemon that serves one
            assert remote.ask(CacheGet(key="price")).value == 1
        if writer == "corral":
            remote.ask(CacheSet(key="price", value=2))
        else:  # seen through CLIENT TRACKING
            raw.set(f"{namespace}:cache:main:{{price}}", msgpack.packb(2))
        wait_until(lambda: all(remote.ask(CacheGet(key="price")).value == 2 for _ in range(30)))


def test_a_stale_value_is_refreshed_once_across_three_daemons(client: Client) -> None:
    loads = 0
    counting = threading.Lock()

    @cached(client, ttl=0.2, stale_ttl=60, key="report")
    def report() -> int:
        nonlocal loads
        with counting:
            loads += 1
            version = loads
        threading.Event().wait(0.5)  # a slow load: every caller asks meanwhile
        return version

    assert report() == 1
    wait_until(lambda: client.ask(CacheGet(key="report")).stale)
    everyone_asks = threading.Barrier(CALLERS)
    results: list[int] = []

    def call() -> None:
        everyone_asks.wait()
        results.append(report())

    threads = [threading.Thread(target=call) for _ in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert loads == 2  # one refresh, while the others were served the stale value
    assert len(results) == CALLERS and set(results) == {1, 2}  # 2: the refresher (and late)
    assert report.stats().refreshes == 1


def test_a_lock_waiter_is_answered_by_a_release_on_any_daemon(client: Client) -> None:
    held = client.ask(CacheLock(name="nightly", ttl=60))
    answers: list[CacheLocked] = []
    waiter = threading.Thread(
        target=lambda: answers.append(
            client.ask(CacheLock(name="nightly", ttl=60, wait=20), timeout=25)
        )
    )
    waiter.start()
    with lock(client, "other", ttl=60) as other:  # locks of other names go their own way
        assert other.token == 1
    client.ask(CacheUnlock(name="nightly", token=held.token))
    waiter.join(25)
    (answer,) = answers
    assert (answer.acquired, answer.token) == (True, held.token + 1)
