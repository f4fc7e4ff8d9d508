"""Cache refresh and serializers: stale-while-revalidate and early refresh (one refresher
across systems on Redis), msgpack/JSON/signed pickle per backend, and the refusals."""

from __future__ import annotations

import pickle
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from corral._redis import connect
from corral.actors.cache import CacheManager
from corral.actors.cache._values import ValueCodec
from corral.clock import ManualClock
from corral.config import Config, ManagerSection
from corral.errors import BackendUnavailable, ConfigError, InvalidMessage
from corral.messages.cache import (
    CacheGet,
    CacheGetMany,
    CacheGetOrLease,
    CacheRelease,
    CacheSet,
    CacheSetMany,
)
from corral.system import System
from tests.redis_server import RedisServer
from tests.support import wait_until

KEYS = ["first signing key", "older key"]


def cache_system(backends: dict[str, Any], signing_keys: list[str] | None = None) -> System:
    """``signing_keys``: those of every pickle backend."""
    for options in backends.values():
        if options.get("serializer") == "pickle":
            options["signing_keys"] = signing_keys
    config = Config().replace(managers={"cache": ManagerSection(options={"backends": backends})})
    return System(config, managers=[CacheManager]).start()


def backend_of(kind: str, url: str, **options: Any) -> dict[str, Any]:
    backend: dict[str, Any] = {"type": kind, **options}
    if kind != "memory":
        backend["url"] = url
    return backend


@pytest.fixture(params=["memory", "redis", "tiered"])
def system(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[System]:
    with cache_system({"main": backend_of(request.param, redis_server.url)}) as system:
        yield system


def is_stale(system: System, key: str) -> bool:
    reply = system.ask(CacheGet(key=key))
    return bool(reply.found and reply.stale)


# -- stale-while-revalidate -----------------------------------------------------------------


def test_a_stale_value_is_served_while_one_caller_refreshes_it(system: System) -> None:
    system.ask(CacheSet(key="k", value="old", ttl=0.05, stale_ttl=60))
    fresh = system.ask(CacheGetOrLease(key="k"))
    assert (fresh.found, fresh.value, fresh.lease, fresh.stale) == (True, "old", "", False)
    wait_until(lambda: is_stale(system, "k"))

    refresher = system.ask(CacheGetOrLease(key="k"))
    assert (refresher.found, refresher.value, refresher.stale) == (True, "old", True)
    assert refresher.lease  # this caller refreshes
    for _ in range(5):
        other = system.ask(CacheGetOrLease(key="k"))
        assert (other.found, other.value, other.stale, other.lease) == (True, "old", True, "")

    system.ask(CacheSet(key="k", value="new", ttl=60, stale_ttl=60, lease=refresher.lease))
    after = system.ask(CacheGetOrLease(key="k"))
    assert (after.value, after.stale, after.lease) == ("new", False, "")


def test_a_refresher_that_gives_up_passes_the_refresh_on(system: System) -> None:
    system.ask(CacheSet(key="k", value="old", ttl=0.05, stale_ttl=60))
    wait_until(lambda: is_stale(system, "k"))
    first = system.ask(CacheGetOrLease(key="k"))
    assert first.lease
    assert system.ask(CacheRelease(key="k", lease=first.lease)).released
    second = system.ask(CacheGetOrLease(key="k"))
    assert second.lease and second.lease != first.lease and second.value == "old"


def test_a_value_past_its_stale_ttl_is_gone(system: System) -> None:
    system.ask(CacheSet(key="k", value="old", ttl=0.05, stale_ttl=0.05))
    wait_until(lambda: not system.ask(CacheGet(key="k")).found)
    miss = system.ask(CacheGetOrLease(key="k"))
    assert (miss.found, bool(miss.lease)) == (False, True)


def test_the_backend_default_stale_ttl_applies_to_values_with_a_ttl(
    redis_server: RedisServer,
) -> None:
    backend = {"type": "redis", "url": redis_server.url, "stale_ttl": 60.0}
    with cache_system({"main": backend}) as system, connect(redis_server.url) as raw:
        system.ask(CacheSet(key="k", value=1, ttl=0.05))
        assert raw.pttl("corral:cache:main:{k}") > 59_000  # its ttl and its stale_ttl
        wait_until(lambda: is_stale(system, "k"))
        system.ask(CacheSet(key="forever", value=1))  # no ttl: nothing to refresh
        assert raw.get("corral:cache:main:{forever}") == b"\x01"  # plain msgpack


def test_stale_values_of_set_many_and_get_many(system: System) -> None:
    system.ask(CacheSetMany(values={"a": 1, "b": 2}, ttl=0.05, stale_ttl=60))
    wait_until(lambda: is_stale(system, "a") and is_stale(system, "b"))
    assert system.ask(CacheGetMany(keys=["a", "b"])).values == {"a": 1, "b": 2}


# -- early refresh --------------------------------------------------------------------------


def test_early_refresh_lets_one_caller_refresh_before_the_value_expires(system: System) -> None:
    system.ask(CacheSet(key="k", value="v", ttl=60, early_ttl=59.95))

    def refresh_due() -> str:
        reply = system.ask(CacheGetOrLease(key="k"))
        assert (reply.found, reply.value, reply.stale) == (True, "v", False)
        return reply.lease

    lease = wait_until(refresh_due)
    assert system.ask(CacheGetOrLease(key="k")).lease == ""  # one refresher at a time
    assert system.ask(CacheGet(key="k")).stale is False
    system.ask(CacheSet(key="k", value="v2", ttl=60, early_ttl=1, lease=lease))
    assert system.ask(CacheGetOrLease(key="k")).lease == ""


def test_refresh_settings_the_value_cannot_have_are_refused(system: System) -> None:
    with pytest.raises(InvalidMessage, match="less than the ttl") as caught:
        system.ask(CacheSet(key="k", value=1, ttl=5, early_ttl=5))
    assert caught.value.path == "early_ttl"
    with pytest.raises(InvalidMessage, match="never expires") as caught:
        system.ask(CacheSet(key="k", value=1, stale_ttl=5))
    assert caught.value.path == "stale_ttl"
    for bad in (0.0, -1.0, float("inf"), float("nan"), 10 * 365 * 24 * 3600 + 1.0):
        with pytest.raises(InvalidMessage, match=r"stale_ttl|early_ttl"):
            system.ask(CacheSet(key="k", value=1, ttl=5, stale_ttl=bad))
        with pytest.raises(InvalidMessage, match=r"stale_ttl|early_ttl"):
            system.ask(CacheSetMany(values={"k": 1}, ttl=5, early_ttl=bad))


def test_one_refresher_across_systems(redis_url: str) -> None:
    """Of many callers on two systems reading one stale value at once, one refreshes."""
    with (
        cache_system({"main": backend_of("redis", redis_url)}) as one,
        cache_system({"main": backend_of("tiered", redis_url)}) as two,
    ):
        one.ask(CacheSet(key="k", value="old", ttl=0.05, stale_ttl=60))
        wait_until(lambda: is_stale(one, "k") and is_stale(two, "k"))
        replies: list[Any] = []
        start = threading.Barrier(20)

        def caller(system: System) -> None:
            start.wait()
            replies.append(system.ask(CacheGetOrLease(key="k")))

        threads = [threading.Thread(target=caller, args=(s,)) for s in [one, two] * 10]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len(replies) == 20
        assert all(r.found and r.value == "old" and r.stale for r in replies)
        assert len([r for r in replies if r.lease]) == 1


# -- serializers ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "redis", "tiered"])
def test_json_values_round_trip_and_stay_json_in_redis(
    kind: str, redis_server: RedisServer
) -> None:
    backend = backend_of(kind, redis_server.url, serializer="json")
    with cache_system({"main": backend}) as system, connect(redis_server.url) as raw:
        system.ask(CacheSet(key="k", value={"a": [1, 2.5, "x", None, True]}, ttl=60))
        assert system.ask(CacheGet(key="k")).value == {"a": [1, 2.5, "x", None, True]}
        if kind != "memory":
            stored = raw.get("corral:cache:main:{k}")
            assert stored.endswith(b'{"a":[1,2.5,"x",null,true]}')
        with pytest.raises(InvalidMessage, match="cannot encode the value as json") as caught:
            system.ask(CacheSet(key="k", value=b"bytes"))
        assert caught.value.path == "value"


def test_a_value_of_another_serializer_is_a_clear_error(redis_server: RedisServer) -> None:
    url = redis_server.url
    prefix = {"namespace": "shared"}
    writers = {
        "msgpack": {"type": "redis", "url": url, **prefix},
        "json": {"type": "redis", "url": url, "serializer": "json", **prefix},
        "pickle": {"type": "redis", "url": url, "serializer": "pickle", **prefix},
    }
    for writer, options in writers.items():
        with cache_system({"main": options}, signing_keys=KEYS) as system:
            system.ask(CacheSet(key=writer, value={"by": writer}))
    for reader, options in writers.items():
        with cache_system({"main": options}, signing_keys=KEYS) as system:
            for writer in writers:
                if writer == reader:
                    assert system.ask(CacheGet(key=writer)).value == {"by": writer}
                    continue
                with pytest.raises(
                    BackendUnavailable,
                    match=f"written by the {writer} serializer, and this backend reads {reader}",
                ):
                    system.ask(CacheGet(key=writer))


def test_pickle_needs_signing_keys() -> None:
    config = Config().replace(
        managers={"cache": ManagerSection(options={"backends": {"main": {"serializer": "pickle"}}})}
    )
    with pytest.raises(ConfigError, match=r"backends\.main\.serializer: pickle needs signing_keys"):
        System(config, managers=[CacheManager])


class _Unpickled(Exception):
    """Raised by unpickling :class:`_Tripwire`: a refused pickle must never raise it."""


class _Tripwire:
    def __reduce__(self) -> Any:
        return (_raise_unpickled, ())


def _raise_unpickled() -> None:
    raise _Unpickled


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_pickle_values_are_signed_and_a_forged_one_is_never_unpickled(
    kind: str, redis_server: RedisServer
) -> None:
    backend = backend_of(kind, redis_server.url, serializer="pickle")
    value = {"pair": (1, 2), "rows": [("a", 1.5)]}  # pickle keeps tuples (in process)
    with cache_system({"main": backend}, signing_keys=KEYS) as system:
        system.ask(CacheSet(key="k", value=value, ttl=60))
        assert system.ask(CacheGet(key="k")).value == value
        if kind == "memory":
            return
        with connect(redis_server.url) as raw:
            stored = raw.get("corral:cache:main:{k}")
            header, signature = stored[:19], stored[19:51]
            forged = header + signature + pickle.dumps(_Tripwire())
            raw.set("corral:cache:main:{k}", forged)
            with pytest.raises(BackendUnavailable, match="signature does not verify"):
                system.ask(CacheGet(key="k"))
            raw.set("corral:cache:main:{moved}", stored)  # signed for another key
            with pytest.raises(BackendUnavailable, match="signature does not verify"):
                system.ask(CacheGet(key="moved"))
    with cache_system({"main": backend}, signing_keys=["another key"]) as system:
        with connect(redis_server.url) as raw:
            raw.set("corral:cache:main:{k}", stored)
        with pytest.raises(BackendUnavailable, match="signature does not verify"):
            system.ask(CacheGet(key="k"))
    rotated = ["newer key", KEYS[0]]  # the key it was signed with still verifies
    with cache_system({"main": backend}, signing_keys=rotated) as system:
        assert system.ask(CacheGet(key="k")).value == value


@pytest.mark.parametrize("kind", ["memory", "redis", "tiered"])
def test_refresh_times_follow_the_systems_clock(kind: str, redis_server: RedisServer) -> None:
    clock = ManualClock()
    options = {"backends": {"main": backend_of(kind, redis_server.url)}}
    config = Config().replace(managers={"cache": ManagerSection(options=options)})
    with System(config, managers=[CacheManager], clock=clock) as system:
        system.ask(CacheSet(key="k", value="v", ttl=60, stale_ttl=600, early_ttl=10))
        assert system.ask(CacheGetOrLease(key="k")).lease == ""
        clock.advance(51)  # past the early mark
        early = system.ask(CacheGetOrLease(key="k"))
        assert (early.value, early.stale, bool(early.lease)) == ("v", False, True)
        system.ask(CacheRelease(key="k", lease=early.lease))
        clock.advance(10)  # past the ttl
        stale = system.ask(CacheGetOrLease(key="k"))
        assert (stale.value, stale.stale, bool(stale.lease)) == ("v", True, True)


def test_a_signed_pickle_that_does_not_load_is_an_error_not_a_crash() -> None:
    values = ValueCodec("pickle", backend="main", keys=(b"key",))
    data = values.encode("k", _Tripwire(), refresh_at=None, stale_at=None)
    with pytest.raises(BackendUnavailable, match="a pickle that does not load"):
        values.decode("k", data)
