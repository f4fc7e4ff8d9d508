"""The ``cached`` decorator as a user meets it: ordinary return values never fail the
function, tuples come back as tuples, default keys hit only for arguments that say the
same in every process, key templates, ``invalidate``, and all of it through
``corral.connect()`` too."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import decimal
import enum
import logging
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

import corral
from corral.actors.cache import CacheManager
from corral.client import Client
from corral.config import BusSection, Config, DaemonSection, ManagerSection, SystemSection
from corral.daemon import Daemon
from corral.errors import InvalidMessage
from corral.ext.cache import CachedFunction, CachedStats, CacheKey, cached
from corral.manager import Asker
from corral.messages.base import MAX_NESTING
from corral.messages.cache import CacheGet, CacheInvalidate, CacheSet
from corral.system import System
from tests.redis_server import RedisServer
from tests.support import wait_until


def cache_system(*, validate: bool = True) -> System:
    """A system with a memory cache; ``validate``: it checks messages before they go."""
    config = Config().replace(
        system=SystemSection(validate=validate), managers={"cache": ManagerSection()}
    )
    return System(config, managers=[CacheManager]).start()


@pytest.fixture
def system() -> Iterator[System]:
    with cache_system() as running:
        yield running


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Colour(enum.Enum):
    RED = "red"


class Pair(NamedTuple):
    left: int
    right: int


class Opaque:
    """An object whose ``repr`` is its address."""


@dataclasses.dataclass
class Box:
    content: Any


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def counting(system: Asker, **options: Any) -> tuple[CachedFunction[[Any], Any], list[Any]]:
    """A cached identity function, and the list of the arguments it computed."""
    computed: list[Any] = []

    @cached(system, **options)
    def identity(value: Any) -> Any:
        computed.append(value)
        return value

    return identity, computed


@pytest.mark.parametrize("validate", [True, False], ids=["validated", "unvalidated"])
@pytest.mark.parametrize(
    "value",
    [
        datetime.datetime(2024, 1, 1, 10, 0, tzinfo=datetime.UTC),
        {1, 2},
        Point(1, 2),
        {1: "a"},
        nested(MAX_NESTING + 1),
        "x" * 600_000,
    ],
    ids=["datetime", "set", "dataclass", "int-keys", "too-deep", "over-the-size-limit"],
)
def test_a_value_the_cache_cannot_carry_is_returned_uncached(
    value: Any, validate: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with cache_system(validate=validate) as system:
        identity, computed = counting(system, key="k")
        with caplog.at_level(logging.WARNING, logger="corral.ext.cache"):
            results = [identity(value), identity(value), identity(value)]
        assert results == [value] * 3
        if value == {1: "a"} and not validate:  # msgpack carries it when nothing checks
            assert computed == [value]
            assert identity.stats() == CachedStats(hits=2, misses=1)
            return
        assert computed == [value] * 3
        assert identity.stats() == CachedStats(uncacheable=3)
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1, warnings
        assert "identity: a value the cache cannot carry is returned uncached" in warnings[0]
        assert system.ask(CacheGet(key="k")).found is False
        waiter, _ = counting(system, key="k")  # the lease was given back: no wait for it
        assert waiter(1) == 1 and waiter(1) == 1


def test_tuples_come_back_as_tuples(system: System) -> None:
    value = (1, [2, (3, 4)], {"k": (5,)}, ())
    identity, computed = counting(system, key="k")
    assert identity(value) == value
    again = identity(value)
    assert again == value and type(again) is tuple
    assert type(again[1][1]) is tuple and type(again[2]["k"]) is tuple
    assert len(computed) == 1
    # Everything else is stored as it is: other readers see plain msgpack.
    assert system.ask(CacheGet(key="k")).value == {
        " t": [1, [2, {" t": [3, 4]}], {"k": {" t": [5]}}, {" t": []}]
    }


@pytest.mark.parametrize(
    "value", [{" t": [1, 2]}, {" d": {" t": 1}}, {" t": 1, "other": 2}, [{" d": {}}]]
)
def test_maps_that_look_like_stored_tuples_come_back_as_maps(system: System, value: Any) -> None:
    identity, _ = counting(system, key="k")
    assert identity(value) == value
    assert identity(value) == value
    assert identity.stats().hits == 1


def test_a_value_stored_by_another_caller_is_a_copy_of_its_own(system: System) -> None:
    identity, _ = counting(system, key="k")
    first = identity([1])
    first.append(2)
    assert identity([1]) == [1]


def test_default_keys_hit_for_arguments_that_read_the_same_everywhere(system: System) -> None:
    computed: list[Any] = []

    @cached(system)
    def describe(value: Any, unit: str = "m") -> str:
        computed.append(value)
        return f"{value!r} {unit}"

    arguments = [
        None, True, 1, 1.0, "1", b"1", (1, "a"), [1, "a"], {"b": 1, "a": [2]}, {3, 1, 2},
        frozenset({"x"}), Colour.RED, datetime.date(2024, 1, 2), datetime.timedelta(seconds=3),
        decimal.Decimal("1.10"), uuid.UUID(int=7), Point(1, 2), Pair(1, 2),
    ]  # fmt: skip
    for argument in arguments:
        describe(argument)
    assert computed == arguments  # 1, 1.0, True, "1", (1,) and [1] are told apart
    for argument in arguments:
        describe(argument)
    describe({"a": [2], "b": 1})  # the same map, built in another order
    describe(frozenset({"x"}), unit="m")  # the default, given
    describe(value=Colour.RED)
    assert computed == arguments
    assert describe.stats() == CachedStats(hits=len(arguments) + 3, misses=len(arguments))


def test_arguments_without_a_stable_key_run_uncached_and_say_so_once(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    computed: list[Any] = []

    @cached(system)
    def size(thing: Any) -> int:
        computed.append(thing)
        return len(computed)

    first, second = Opaque(), Opaque()
    with caplog.at_level(logging.WARNING, logger="corral.ext.cache"):
        assert [size(first), size(first), size([second]), size(Box(first))] == [1, 2, 3, 4]
    assert size.stats() == CachedStats(unkeyed=4)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert (
        "size: called without the cache: argument 'thing' (a tests.test_cached.Opaque)" in warning
    )
    assert 'give the decorator a key (a template such as "user:{user_id}"' in warning
    assert size.invalidate(first) is False


def test_a_key_template_names_the_parameters(system: System) -> None:
    computed: list[int] = []

    @cached(system, key="user:{user_id}:{fields[0]}:{scope}")
    def profile(user_id: int, fields: tuple[str, ...], scope: str = "all") -> dict[str, Any]:
        computed.append(user_id)
        return {"id": user_id, "fields": list(fields)}

    assert profile(42, ("name",)) == {"id": 42, "fields": ["name"]}
    assert profile(fields=("name", "mail"), user_id=42) == {"id": 42, "fields": ["name"]}
    assert computed == [42]
    assert system.ask(CacheGet(key="user:42:name:all")).found


@pytest.mark.parametrize(
    ("template", "error"),
    [
        ("user:{uid}", "names 'uid', not a parameter (parameters: user_id)"),
        ("user:{}", "names '{}', not a parameter"),
        ("user:{0}", "names '0', not a parameter"),
    ],
)
def test_a_key_template_that_names_no_parameter_fails_when_decorating(
    system: System, template: str, error: str
) -> None:
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)")):

        @cached(system, key=template)
        def profile(user_id: int) -> int:
            return user_id


def test_settings_the_cache_refuses_fail_when_decorating(system: System) -> None:
    with pytest.raises(InvalidMessage, match="ttl"):
        cached(system, ttl=0)
    with pytest.raises(InvalidMessage, match="wait"):
        cached(system, wait=-1)


def test_invalidate_drops_the_value_of_one_call(system: System) -> None:
    computed: list[int] = []

    @cached(system, key="square:{n}")
    def square(n: int) -> int:
        computed.append(n)
        return n * n

    @cached(system)
    def cube(n: int) -> int:
        computed.append(n)
        return n**3

    assert [square(2), square(3), cube(2)] == [4, 9, 8]
    assert square.invalidate(2) is True
    assert square.invalidate(n=2) is False
    assert cube.invalidate(2) is True
    assert [square(2), square(3), cube(2)] == [4, 9, 8]
    assert computed == [2, 3, 2, 2, 2]


def test_coroutine_functions_cache_and_invalidate_alike(system: System) -> None:
    computed: list[int] = []

    @cached(system, key="pair:{n}")
    async def pair(n: int) -> tuple[int, int]:
        computed.append(n)
        return (n, n)

    async def scenario() -> list[Any]:
        results: list[Any] = [await pair(1), await pair(1)]
        results.append(await pair.invalidate(1))
        results.append(await pair(1))
        return results

    assert asyncio.run(scenario()) == [(1, 1), (1, 1), True, (1, 1)]
    assert computed == [1, 1]
    assert pair.stats() == CachedStats(hits=1, misses=2)


# -- through corral.connect() -----------------------------------------------------------


@pytest.fixture
def remote(redis_server: RedisServer) -> Iterator[Client]:
    config = Config().replace(
        bus=BusSection(backend="redis", url=redis_server.url, namespace="cached"),
        daemon=DaemonSection(port=0),
        managers={"cache": ManagerSection()},
    )
    with Daemon(config), corral.connect(redis_server.url, namespace="cached") as client:
        yield client


def test_through_corral_connect(remote: Client, caplog: pytest.LogCaptureFixture) -> None:
    computed: list[Any] = []

    @cached(remote, ttl=60, key="report:{day}")
    def report(day: str) -> Any:
        computed.append(day)
        if day == "today":
            return datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
        return (day, {"rows": (1, 2)})

    with caplog.at_level(logging.WARNING, logger="corral.ext.cache"):
        assert report("monday") == ("monday", {"rows": (1, 2)})
        assert report("monday") == ("monday", {"rows": (1, 2)})
        assert report("today") == report("today")
    assert computed == ["monday", "today", "today"]
    assert report.stats() == CachedStats(hits=1, misses=1, uncacheable=2)
    assert len([r for r in caplog.records if "cannot carry" in r.getMessage()]) == 1
    assert remote.ask(CacheGet(key="report:monday")).found
    assert report.invalidate("monday") is True
    assert report("monday") == ("monday", {"rows": (1, 2)})
    assert computed == ["monday", "today", "today", "monday"]


def test_coroutine_functions_through_corral_connect(remote: Client) -> None:
    remote.ask(CacheSet(key="seed", value=1))

    @cached(remote, key="async:{n}")
    async def double(n: int) -> tuple[int, ...]:
        return (n, n)

    async def scenario() -> list[Any]:
        return [await double(3), await double(3), await double.invalidate(3)]

    assert asyncio.run(scenario()) == [(3, 3), (3, 3), True]


# -- refresh and key templates --------------------------------------------------------------


def test_a_stale_value_is_served_while_one_call_refreshes_it(system: System) -> None:
    computed: list[int] = []

    @cached(system, ttl=0.05, stale_ttl=60, key="report:{day}")
    def report(day: str) -> dict[str, Any]:
        computed.append(len(computed))
        return {"day": day, "version": len(computed)}

    assert report("mon") == {"day": "mon", "version": 1}
    wait_until(lambda: system.ask(CacheGet(key="report:mon")).stale)
    # The first call past the ttl refreshes and returns the new value.
    assert report("mon") == {"day": "mon", "version": 2}
    assert report.stats().refreshes == 1
    assert report.stats().misses == 1


def test_early_refresh_through_the_decorator(system: System) -> None:
    versions = iter(range(1, 100))

    @cached(system, ttl=60, early_ttl=59.9)
    def value() -> int:
        return next(versions)

    assert value() == 1

    def refreshed() -> bool:
        return value() == 2

    wait_until(refreshed)
    assert value() == 2  # fresh again: served from the cache until its early mark
    stats = value.stats()
    assert (stats.misses, stats.refreshes) == (1, 1)


def test_refresh_settings_are_checked_when_decorating(system: System) -> None:
    with pytest.raises(InvalidMessage, match="stale_ttl"):
        cached(system, ttl=5, stale_ttl=0)
    with pytest.raises(ValueError, match="early_ttl"):
        cached(system, ttl=5, early_ttl=5)


def test_a_cache_key_makes_the_keys_and_patterns_of_a_function(system: System) -> None:
    orders = CacheKey("user:{user_id}:orders:{status}")

    @cached(system, ttl=60, key=orders)
    def user_orders(user_id: int, status: str = "open") -> list[int]:
        return [user_id, len(status)]

    assert user_orders(42) == [42, 4]
    assert system.ask(CacheGet(key=orders.format(user_id=42, status="open"))).value == [42, 4]
    user_orders(42, "shipped")
    user_orders(7)
    dropped = system.ask(CacheInvalidate(pattern=orders.pattern(user_id=42))).count
    assert dropped == 2
    assert system.ask(CacheGet(key="user:7:orders:open")).found
    assert orders.names == ("user_id", "status")
    assert CacheKey("a*{x}").pattern(x="[y]") == "a\\*\\[y\\]"
    with pytest.raises(ValueError, match="names 'customer', not a parameter"):
        cached(system, key=CacheKey("c:{customer}"))(lambda user_id: user_id)
