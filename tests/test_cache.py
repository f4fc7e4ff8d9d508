"""Cache manager: every operation on memory, Redis and tiered backends, strategies, TTL,
invalidation, statistics, bad input, single-flight leases and the ``cached`` decorator."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from corral.actors.cache import CacheManager
from corral.config import Config, ManagerSection
from corral.errors import ConfigError, InvalidMessage, Timeout
from corral.ext.cache import cached
from corral.messages.cache import (
    CacheClear,
    CacheDelete,
    CacheExists,
    CacheGet,
    CacheGetMany,
    CacheGetOrLease,
    CacheInvalidate,
    CacheInvalidateTags,
    CacheRelease,
    CacheSet,
    CacheSetMany,
    CacheStats,
)
from corral.system import System
from tests.redis_server import RedisServer
from tests.support import wait_until


def cache_system(**options: Any) -> System:
    config = Config().replace(managers={"cache": ManagerSection(options=options)})
    return System(config, managers=[CacheManager]).start()


@pytest.fixture(params=["memory", "redis", "tiered"])
def system(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[System]:
    """A system whose default cache backend is of each type."""
    backend: dict[str, Any] = {"type": request.param}
    if request.param != "memory":
        backend["url"] = redis_server.url
    with cache_system(backends={"main": backend}) as system:
        yield system


def test_get_set_delete_exists(system: System) -> None:
    assert system.ask(CacheGet(key="k")).found is False
    assert system.ask(CacheSet(key="k", value={"a": [1, 2.5, "x", b"\x00", None]})).count == 1
    reply = system.ask(CacheGet(key="k"))
    assert reply.found and reply.value == {"a": [1, 2.5, "x", b"\x00", None]}
    system.ask(CacheSet(key="none", value=None))
    assert system.ask(CacheGet(key="none")).found is True  # a stored None is not a miss
    assert system.ask(CacheExists(key="k")).exists is True
    assert system.ask(CacheDelete(key="k")).count == 1
    assert system.ask(CacheDelete(key="k")).count == 0
    assert system.ask(CacheExists(key="k")).exists is False


def test_get_many_set_many_and_clear(system: System) -> None:
    assert system.ask(CacheSetMany(values={"a": 1, "b": [2], "c": "3"})).count == 3
    assert system.ask(CacheGetMany(keys=["a", "b", "missing"])).values == {"a": 1, "b": [2]}
    assert system.ask(CacheClear()).count == 3
    assert system.ask(CacheGetMany(keys=["a", "b", "c"])).values == {}


def test_ttl_expiry(system: System) -> None:
    system.ask(CacheSet(key="short", value=1, ttl=0.05))
    system.ask(CacheSet(key="long", value=2, ttl=60))
    system.ask(CacheSet(key="forever", value=3))
    wait_until(lambda: not system.ask(CacheGet(key="short")).found)
    assert system.ask(CacheGet(key="long")).value == 2
    assert system.ask(CacheGet(key="forever")).value == 3


def test_pattern_and_tag_invalidation(system: System) -> None:
    system.ask(CacheSetMany(values={"user:1": 1, "user:2": 2, "users": 0, "item:1": 9}))
    assert system.ask(CacheInvalidate(pattern="user:*")).count == 2
    assert system.ask(CacheGetMany(keys=["user:1", "user:2", "users", "item:1"])).values == {
        "users": 0,
        "item:1": 9,
    }
    assert system.ask(CacheInvalidate(pattern="item:[0-9]")).count == 1

    system.ask(CacheSet(key="p1", value=1, tags=["profiles", "eu"]))
    system.ask(CacheSet(key="p2", value=2, tags=["profiles"]))
    system.ask(CacheSet(key="o1", value=3, tags=["orders"]))
    assert system.ask(CacheInvalidateTags(tags=["profiles"])).count == 2
    assert system.ask(CacheGetMany(keys=["p1", "p2", "o1"])).values == {"o1": 3}
    assert system.ask(CacheInvalidateTags(tags=["eu", "nothing"])).count == 0


def test_statistics(system: System) -> None:
    system.ask(CacheSet(key="k", value=1))
    system.ask(CacheGet(key="k"))
    system.ask(CacheGet(key="k"))
    system.ask(CacheGet(key="missing"))
    system.ask(CacheDelete(key="k"))
    stats = system.ask(CacheStats())
    main = stats.backends["main"]
    assert (main["hits"], main["misses"], main["sets"], main["deletes"]) == (2, 1, 1, 1)
    assert main["hit_rate"] == pytest.approx(2 / 3)
    assert stats.total["hits"] == 2 and stats.total["hit_rate"] == pytest.approx(2 / 3)
    health = system.health().managers["cache"].health
    assert health is not None and health.status == "healthy"
    assert health.metrics["backends.main.hits"] == 2
    assert health.metrics["cache_misses"] == 1


@pytest.mark.parametrize(
    ("strategy", "reads", "evicted"),
    [
        ("lru", ["a"], "b"),  # b is the least recently used
        ("lfu", ["a", "a", "b", "c", "c"], "b"),  # b is read least often
        ("ttl", ["a"], "b"),  # nothing expired: least recently used
    ],
)
def test_eviction_order(strategy: str, reads: list[str], evicted: str) -> None:
    backends = {"m": {"strategy": strategy, "max_size": 3}}
    with cache_system(backends=backends) as system:
        system.ask(CacheSetMany(values={"a": 1, "b": 2, "c": 3}))
        for key in reads:
            system.ask(CacheGet(key=key))
        system.ask(CacheSet(key="d", value=4))
        present = system.ask(CacheGetMany(keys=["a", "b", "c", "d"])).values
        assert sorted(present) == sorted({"a", "b", "c", "d"} - {evicted})
        assert system.ask(CacheStats()).total["evictions"] == 1


def test_ttl_strategy_drops_expired_entries_before_evicting_live_ones() -> None:
    with cache_system(backends={"m": {"strategy": "ttl", "max_size": 3}}) as system:
        system.ask(CacheSet(key="a", value=1, ttl=60))
        system.ask(CacheSet(key="b", value=2, ttl=0.05))
        system.ask(CacheSet(key="c", value=3, ttl=60))
        wait_until(lambda: not system.ask(CacheExists(key="b")).exists)
        system.ask(CacheSet(key="d", value=4, ttl=60))
        assert sorted(system.ask(CacheGetMany(keys=["a", "b", "c", "d"])).values) == [
            "a",
            "c",
            "d",
        ]
        total = system.ask(CacheStats()).total
        assert (total["evictions"], total["expirations"]) == (0, 1)


def test_default_ttl_and_named_backends(redis_server: RedisServer) -> None:
    backends = {
        "fast": {"default_ttl": 0.05},
        "shared": {"type": "redis", "url": redis_server.url, "namespace": "t"},
    }
    with cache_system(backends=backends, default_backend="shared") as system:
        system.ask(CacheSet(key="k", value="fast", backend="fast"))
        system.ask(CacheSet(key="k", value="shared"))
        assert system.ask(CacheGet(key="k")).value == "shared"
        wait_until(lambda: not system.ask(CacheGet(key="k", backend="fast")).found)
        assert sorted(system.ask(CacheStats()).backends) == ["fast", "shared"]
        with pytest.raises(InvalidMessage, match="no cache backend named 'nope'"):
            system.ask(CacheGet(key="k", backend="nope"))


def test_bad_input_is_invalid_message_with_a_reason() -> None:
    with cache_system(max_key_length=16, max_value_size=64) as system:
        with pytest.raises(InvalidMessage, match="must not be empty") as empty:
            system.ask(CacheGet(key=""))
        assert empty.value.path == "key"
        with pytest.raises(InvalidMessage, match="at most 16 bytes, got 17"):
            system.ask(CacheSet(key="k" * 17, value=1))
        with pytest.raises(InvalidMessage, match="over the 64-byte limit") as big:
            system.ask(CacheSet(key="k", value="x" * 100))
        assert big.value.path == "value"
        with pytest.raises(InvalidMessage, match="msgpack value") as odd:
            system.ask(CacheSet(key="k", value={"a": object()}))
        assert odd.value.path == "value.a"
        with pytest.raises(InvalidMessage, match="must be > 0"):
            system.ask(CacheSet(key="k", value=1, ttl=0))
        with pytest.raises(InvalidMessage, match="keys\\[1\\]"):
            system.ask(CacheGetMany(keys=["ok", ""]))
        with pytest.raises(InvalidMessage, match="at most 16 bytes, got 17") as pattern:
            system.ask(CacheInvalidate(pattern="*" * 17))  # as long as a key, at most
        assert pattern.value.path == "pattern"
        assert system.ask(CacheSet(key="k", value="fits")).count == 1


def test_non_encodable_value_without_system_validation() -> None:
    config = Config().replace(managers={"cache": ManagerSection(options={})})
    config = config.replace(system=config.system.__class__(validate=False))
    with System(config, managers=[CacheManager]) as system:
        with pytest.raises(InvalidMessage, match="cannot encode the value as msgpack"):
            system.ask(CacheSet(key="k", value={1, 2}))
        with pytest.raises(InvalidMessage, match="cannot encode"):
            system.ask(CacheSet(key="k", value=2**70))


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"backends": {"m": {"max_size": 0}}}, "backends.m.max_size: must be >= 1, got 0"),
        ({"backends": {"m": {"strategy": "fifo"}}}, "backends.m.strategy: expected one of"),
        ({"backends": {"m": {"colour": 1}}}, "backends.m.colour: not a backend option"),
        ({"default_backend": "x"}, "default_backend: no backend named 'x'"),
        ({"backends": {"a{b}": {}}}, "backends.a{b}: a backend name is letters, digits"),
        ({"backends": {"a*": {}}}, "backends.a*: a backend name is letters, digits"),
    ],
)
def test_bad_options_fail_when_the_system_is_built(options: dict[str, Any], error: str) -> None:
    config = Config().replace(managers={"cache": ManagerSection(options=options)})
    with pytest.raises(ConfigError, match=re.escape(error)):
        System(config, managers=[CacheManager])


# -- single-flight ------------------------------------------------------------------------


def test_fifty_concurrent_callers_compute_once(system: System) -> None:
    calls = []
    gate = threading.Barrier(50)

    @cached(system, ttl=60)
    def slow_square(n: int) -> int:
        calls.append(n)
        if len(calls) == 1:  # the first computation lasts until every other caller waits
            wait_until(lambda: lease_waiters(system) == 49)
        return n * n

    results: list[int] = []

    def call() -> None:
        gate.wait()
        results.append(slow_square(7))

    threads = [threading.Thread(target=call) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [49] * 50
    assert calls == [7]
    assert slow_square(7) == 49 and calls == [7]
    assert slow_square(8) == 64 and calls == [7, 8]


def test_async_callers_compute_once(redis_server: RedisServer) -> None:
    calls = []
    with cache_system(backends={"r": {"type": "redis", "url": redis_server.url}}) as system:

        @cached(system, ttl=60, key=lambda user: f"profile:{user}")
        async def profile(user: str) -> dict[str, str]:
            calls.append(user)
            await asyncio.sleep(0.1)
            return {"name": user.title()}

        async def main() -> list[dict[str, str]]:
            return await asyncio.gather(*(profile("ada") for _ in range(50)))

        assert asyncio.run(main()) == [{"name": "Ada"}] * 50
        assert calls == ["ada"]
        assert system.ask(CacheGet(key="profile:ada", backend="r")).value == {"name": "Ada"}


def test_failed_compute_hands_the_lease_to_a_waiter(system: System) -> None:
    attempts = []
    started = threading.Event()

    @cached(system, key=lambda: "flaky")
    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            started.set()
            wait_until(lambda: lease_waiters(system) == 1)
            raise RuntimeError("first compute fails")
        return "ok"

    outcome: list[Any] = []

    def first() -> None:
        try:
            flaky()
        except RuntimeError as exc:
            outcome.append(exc)

    holder = threading.Thread(target=first)
    holder.start()
    started.wait(5)
    assert flaky() == "ok"  # waited, got the lease when the holder released it
    holder.join()
    assert len(attempts) == 2 and isinstance(outcome[0], RuntimeError)


def test_lease_expires_when_its_holder_never_comes_back(system: System) -> None:
    first = system.ask(CacheGetOrLease(key="k", lease_ttl=0.1))
    assert not first.found and first.lease
    second = system.ask(CacheGetOrLease(key="k", lease_ttl=5, wait=5))  # waits ~0.1 s
    assert not second.found and second.lease and second.lease != first.lease
    assert system.ask(CacheRelease(key="k", lease=first.lease)).released is False
    waiter: list[Any] = []
    thread = threading.Thread(
        target=lambda: waiter.append(system.ask(CacheGetOrLease(key="k", wait=5)))
    )
    thread.start()
    wait_until(lambda: lease_waiters(system) == 1)
    system.ask(CacheSet(key="k", value="computed", lease=second.lease))
    thread.join()
    assert waiter[0].found and waiter[0].value == "computed"


def test_waiter_times_out_cleanly(system: System) -> None:
    assert system.ask(CacheGetOrLease(key="k", lease_ttl=30)).lease
    with pytest.raises(Timeout, match="no value for 'k'"):  # the manager's, not the ask's
        system.ask(CacheGetOrLease(key="k", wait=0.1))
    assert system.ask(CacheGet(key="k")).found is False


def lease_waiters(system: System) -> int:
    health = system.health().managers["cache"].health
    assert health is not None
    waiters: int = health.metrics["lease_waiters"]
    return waiters
