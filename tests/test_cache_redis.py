"""Cache manager on a real Redis: L1 coherence and single-flight leases across two Systems,
the default backend on a Redis bus, and Redis going away and coming back (circuit
breaker, fallback, degraded health, recovery)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis
from cryptography.fernet import Fernet
from redis.crc import key_slot

import corral
from corral._redis import connect, masters
from corral.actors.cache import CacheManager
from corral.config import BusSection, Config, ManagerSection
from corral.errors import BackendUnavailable, ConfigError, InvalidMessage
from corral.messages.cache import (
    CacheClear,
    CacheDelete,
    CacheGet,
    CacheGetOrLease,
    CacheInvalidate,
    CacheInvalidateTags,
    CacheLease,
    CacheRelease,
    CacheSet,
    CacheSetMany,
    CacheStats,
)
from corral.system import System
from tests.redis_server import ClusterGroup, RedisServer
from tests.support import wait_until
from tests.test_cache import lease_waiters


def tiered_system(url: str, **backend: Any) -> System:
    options = {"backends": {"main": {"type": "tiered", "url": url, "l1_ttl": 60.0, **backend}}}
    config = Config().replace(managers={"cache": ManagerSection(options=options)})
    return System(config, managers=[CacheManager]).start()


def l1_hits(system: System) -> int:
    hits: int = system.ask(CacheStats()).backends["main"]["l1_hits"]
    return hits


def read_from_l1(system: System, key: str, value: Any) -> None:
    """Read ``key`` until a read is an L1 hit with ``value``.

    The first read fills L1 from L2; the invalidation of the set that wrote the key
    may still arrive after it and empty L1 again, hence the loop.
    """

    def hit() -> bool:
        before = l1_hits(system)
        reply = system.ask(CacheGet(key=key))
        return reply.value == value and l1_hits(system) == before + 1

    wait_until(hit)


def cache_status(system: System) -> str:
    health = system.health().managers["cache"].health
    assert health is not None
    return health.status


def test_l1_invalidation_across_two_systems(redis_server: RedisServer) -> None:
    l1_invalidation_across_two_systems(redis_server.url)


def test_l1_invalidation_across_two_systems_on_a_cluster(redis_cluster: ClusterGroup) -> None:
    l1_invalidation_across_two_systems(redis_cluster.node_url(0))


def l1_invalidation_across_two_systems(url: str) -> None:
    """Every way of changing a key through one system removes it from the other's L1."""
    with tiered_system(url) as one, tiered_system(url) as two:
        one.ask(CacheSet(key="k", value=1, tags=["group"]))
        read_from_l1(two, "k", 1)

        one.ask(CacheSet(key="k", value=2))
        wait_until(lambda: two.ask(CacheGet(key="k")).value == 2)

        one.ask(CacheDelete(key="k"))
        wait_until(lambda: not two.ask(CacheGet(key="k")).found)

        for invalidate in (
            CacheInvalidate(pattern="user:*"),
            CacheInvalidateTags(tags=["users"]),
            CacheClear(),
        ):
            one.ask(CacheSet(key="user:1", value="ada", tags=["users"]))
            read_from_l1(two, "user:1", "ada")
            one.ask(invalidate)
            wait_until(lambda: not two.ask(CacheGet(key="user:1")).found)


def test_namespaces_keep_caches_apart(redis_server: RedisServer) -> None:
    with (
        tiered_system(redis_server.url, namespace="a") as one,
        tiered_system(redis_server.url, namespace="b") as two,
    ):
        one.ask(CacheSet(key="k", value="a"))
        two.ask(CacheSet(key="k", value="b"))
        assert one.ask(CacheClear()).count == 1
        assert two.ask(CacheGet(key="k")).value == "b"
        with redis.Redis.from_url(redis_server.url) as client:
            assert client.keys("*") == [b"b:cache:main:{k}"]


def test_redis_stopped_and_restarted(fresh_redis_server: RedisServer) -> None:
    server = fresh_redis_server
    breaker = {"breaker_threshold": 2, "breaker_reset_timeout": 0.2, "socket_timeout": 0.3}
    with tiered_system(server.url, **breaker) as system:
        system.ask(CacheSet(key="before", value=1))
        assert cache_status(system) == "healthy"

        server.stop()
        # Nothing raises into the callers: reads and writes fall back to L1.
        for n in range(5):
            system.ask(CacheSet(key=f"during:{n}", value=n))
        assert system.ask(CacheGet(key="during:4")).value == 4
        assert system.ask(CacheGet(key="missing")).found is False
        with pytest.raises(BackendUnavailable, match="nothing was deleted there"):
            system.ask(CacheDelete(key="during:0"))
        assert system.ask(CacheGet(key="during:0")).found is False  # gone here, at least
        assert cache_status(system) == "degraded"
        stats = system.ask(CacheStats()).backends["main"]
        assert stats["breaker"] == "open" and stats["fallbacks"] > 0 and stats["errors"] >= 2
        health = system.health().managers["cache"].health
        assert health is not None
        assert health.details["backends"]["main"]["breaker"] == "open"

        server.start()

        def recovered() -> bool:
            system.ask(CacheGet(key="probe"))  # a request is the half-open probe
            return cache_status(system) == "healthy"

        wait_until(recovered)
        # Entries written only to L1 while Redis was away are dropped: they may be stale.
        assert system.ask(CacheGet(key="during:4")).found is False
        system.ask(CacheSet(key="after", value="ok"))
        with redis.Redis.from_url(server.url) as client:
            assert client.exists("corral:cache:main:{after}") == 1
        assert system.ask(CacheStats()).backends["main"]["breaker_opens"] == 1


def test_without_fallback_redis_down_is_backend_unavailable(
    fresh_redis_server: RedisServer,
) -> None:
    server = fresh_redis_server
    backend = {
        "type": "redis",
        "url": server.url,
        "fallback": False,
        "breaker_threshold": 1,
        "breaker_reset_timeout": 0.2,
    }
    config = Config().replace(
        managers={"cache": ManagerSection(options={"backends": {"r": backend}})}
    )
    with System(config, managers=[CacheManager]) as system:
        system.ask(CacheSet(key="k", value=1))
        server.stop()
        with pytest.raises(BackendUnavailable, match="Redis is unavailable"):
            system.ask(CacheGet(key="k"))
        with pytest.raises(BackendUnavailable):
            system.ask(CacheSet(key="k", value=2))
        assert cache_status(system) == "unhealthy"
        server.start()

        def recovered() -> bool:
            try:
                system.ask(CacheSet(key="k", value=3))
            except BackendUnavailable:
                return False
            return True

        wait_until(recovered)
        assert system.ask(CacheGet(key="k")).value == 3
        assert cache_status(system) == "healthy"


def test_gets_waiting_together_share_one_round_trip(redis_server: RedisServer) -> None:
    options = {"backends": {"main": {"type": "redis", "url": redis_server.url}}}
    config = Config().replace(managers={"cache": ManagerSection(options=options)})
    with System(config, managers=[CacheManager]) as system:
        for n in range(20):
            system.ask(CacheSet(key=f"k{n}", value=n))
        wrong: list[tuple[int, Any]] = []

        def reader(offset: int) -> None:
            for i in range(100):
                n = (offset + i) % 25  # k20..k24 are misses
                reply = system.ask(CacheGet(key=f"k{n}"))
                expected = (True, n) if n < 20 else (False, None)
                if (reply.found, reply.value) != expected:
                    wrong.append((n, reply))

        threads = [threading.Thread(target=reader, args=(t,)) for t in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert wrong == []
        health = system.health().managers["cache"].health
        assert health is not None
        assert health.metrics["batched_gets"] > 0  # 16 callers at once: some gets waited together
        with pytest.raises(InvalidMessage, match="no cache backend named 'nope'"):
            system.ask(CacheGet(key="k1", backend="nope"))


def redis_system(url: str, **backend: Any) -> System:
    options = {"backends": {"main": {"type": "redis", "url": url, **backend}}}
    config = Config().replace(managers={"cache": ManagerSection(options=options)})
    return System(config, managers=[CacheManager]).start()


def test_a_value_that_does_not_decode_fails_only_its_own_get_in_a_batch(
    redis_server: RedisServer,
) -> None:
    with redis_system(redis_server.url) as system, redis.Redis.from_url(redis_server.url) as raw:
        for n in range(4):
            system.ask(CacheSet(key=f"good{n}", value=n))
        raw.set("corral:cache:main:{bad}", b"\xc1")  # not msgpack
        raw.execute_command("CLIENT", "PAUSE", "300", "ALL")  # so the gets pile up behind one
        outcomes: dict[str, Any] = {}

        def get(key: str) -> None:
            try:
                outcomes[key] = system.ask(CacheGet(key=key), timeout=5).value
            except corral.errors.CorralError as exc:
                outcomes[key] = exc

        keys = ["good0", "bad", "good1", "good2", "good3"]
        threads = [threading.Thread(target=get, args=(k,)) for k in keys]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert {k: outcomes[k] for k in keys if k != "bad"} == {f"good{n}": n for n in range(4)}
        assert isinstance(outcomes["bad"], corral.errors.BackendUnavailable)


def test_sets_waiting_together_are_stored_as_one_after_the_other(
    redis_server: RedisServer,
) -> None:
    with redis_system(redis_server.url) as system, redis.Redis.from_url(redis_server.url) as raw:
        raw.execute_command("CLIENT", "PAUSE", "1000", "ALL")  # the sets queue behind a get
        system.tell(CacheGet(key="first"))
        for msg in [
            CacheSet(key="k", value=1),
            CacheSet(key="k", value=2, ttl=50),
            CacheSet(key="k", value="nope", backend="nope"),  # refused alone
            CacheSet(key="k", value=3, ttl=50),
            CacheSet(key="j", value=1, tags=["t"]),
        ]:
            system.tell(msg)
        assert system.ask(CacheGet(key="k"), timeout=10).value == 3  # the last set wins
        assert system.ask(CacheGet(key="j")).value == 1
        assert 0 < raw.pttl("corral:cache:main:{k}") <= 50_000
        health = system.health().managers["cache"].health
        assert health is not None
        assert health.metrics["batched_sets"] == 5  # all five taken together
        assert system.ask(CacheInvalidateTags(tags=["t"])).count == 1


def test_a_probe_answered_with_an_error_still_closes_the_breaker(
    fresh_redis_server: RedisServer,
) -> None:
    server = fresh_redis_server
    options = {"breaker_threshold": 1, "breaker_reset_timeout": 0.2, "socket_timeout": 0.3}
    with redis_system(server.url, **options) as system:
        server.stop()
        system.ask(CacheGet(key="x"))  # opens the breaker; served from the fallback
        assert system.ask(CacheStats()).backends["main"]["breaker"] == "open"
        server.start()
        with redis.Redis.from_url(server.url) as raw:
            raw.rpush("corral:cache:main:{listed}", "a")  # a GET on it is a WRONGTYPE error

        def probed_with_an_error() -> bool:
            with contextlib.suppress(corral.errors.BackendUnavailable):
                system.ask(CacheGet(key="listed"))
            breaker: str = system.ask(CacheStats()).backends["main"]["breaker"]
            return breaker != "open"

        wait_until(probed_with_an_error)
        assert system.ask(CacheStats()).backends["main"]["breaker"] == "closed"
        system.ask(CacheSet(key="after", value=1))
        assert system.ask(CacheGet(key="after")).value == 1
        assert cache_status(system) == "healthy"


# -- single-flight leases in Redis --------------------------------------------------------


def wait_in_thread(system: System, request: CacheGetOrLease) -> Callable[[], CacheLease]:
    """Ask ``request`` in a thread once it waits on ``system``; call the result for the reply."""
    answers: list[CacheLease] = []
    thread = threading.Thread(target=lambda: answers.append(system.ask(request, timeout=10)))
    thread.start()
    wait_until(lambda: lease_waiters(system) == 1)

    def answer() -> CacheLease:
        thread.join(10)
        (reply,) = answers
        return reply

    return answer


def test_a_lease_in_redis_holds_across_systems_until_the_value_is_set(redis_url: str) -> None:
    with (
        connect(redis_url) as raw,
        redis_system(redis_url) as one,
        tiered_system(redis_url) as two,
    ):
        holder = one.ask(CacheGetOrLease(key="k", lease_ttl=30))
        assert not holder.found and holder.lease
        assert raw.get("corral:cache:main:lease:{k}") == holder.lease.encode()
        assert 0 < raw.pttl("corral:cache:main:lease:{k}") <= 30_000

        answer = wait_in_thread(two, CacheGetOrLease(key="k", wait=10))
        one.ask(CacheSet(key="k", value={"rows": 3}, lease=holder.lease))
        assert (answer().found, answer().value) == (True, {"rows": 3})
        assert raw.exists("corral:cache:main:lease:{k}") == 0  # the set ended the lease
        assert lease_waiters(two) == 0


def test_a_released_or_expired_lease_passes_to_a_waiter_of_another_system(
    redis_url: str,
) -> None:
    with redis_system(redis_url) as one, redis_system(redis_url) as two:
        # The holder never comes back: the waiter's timer at the lease's expiry finds it gone.
        first = one.ask(CacheGetOrLease(key="k", lease_ttl=0.2))
        second = wait_in_thread(two, CacheGetOrLease(key="k", lease_ttl=30, wait=10))()
        assert not second.found and second.lease and second.lease != first.lease
        assert one.ask(CacheRelease(key="k", lease=first.lease)).released is False

        # The holder gives it back: the waiter on the other system hears of it at once.
        answer = wait_in_thread(one, CacheGetOrLease(key="k", lease_ttl=30, wait=10))
        assert two.ask(CacheRelease(key="k", lease=second.lease)).released is True
        third = answer()
        assert not third.found and third.lease not in ("", first.lease, second.lease)
        with connect(redis_url) as raw:
            assert raw.get("corral:cache:main:lease:{k}") == third.lease.encode()


def test_the_default_backend_is_redis_on_a_redis_bus(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    bus = BusSection(backend="redis", url=redis_server.url, namespace="shared")
    config = Config().replace(bus=bus, managers={"cache": ManagerSection()})
    with caplog.at_level(logging.WARNING), System(config, managers=[CacheManager]) as system:
        system.ask(CacheSet(key="k", value=1))
        assert system.ask(CacheStats()).backends["redis"]["type"] == "redis"
        with redis.Redis.from_url(redis_server.url) as raw:
            assert raw.exists("shared:cache:redis:{k}") == 1
    assert "memory, in this process" not in caplog.text

    memory = ManagerSection(options={"backends": {"local": {}, "small": {"max_size": 10}}})
    config = config.replace(managers={"cache": memory})
    with caplog.at_level(logging.WARNING), System(config, managers=[CacheManager]):
        pass
    warnings = [r.getMessage() for r in caplog.records if "in this process" in r.getMessage()]
    assert warnings == [
        "cache backends local, small: memory, in this process, although the bus is on Redis: "
        "with several daemons each daemon has its own values, and invalidations and "
        'single-flight leases are per daemon (type = "redis" or "tiered" shares them)'
    ]


# -- what Redis holds: changes refused while it is away, tag sets, one keyspace per backend


def recovered(system: System) -> bool:
    """True once a request (the half-open probe) found Redis back."""
    system.ask(CacheGet(key="probe"))
    return cache_status(system) == "healthy"


def test_changes_that_cannot_reach_redis_are_refused_not_acknowledged() -> None:
    breaker = {"breaker_threshold": 1, "breaker_reset_timeout": 0.2, "socket_timeout": 0.3}
    with (
        RedisServer("--appendonly", "yes", "--appendfsync", "always") as server,
        redis_system(server.url, **breaker) as system,
    ):
        for key in ("k", "tagged", "user:1"):
            system.ask(CacheSet(key=key, value="old", tags=["group"]))
        server.stop()
        changes = [
            CacheDelete(key="k"),
            CacheInvalidateTags(tags=["group"]),
            CacheInvalidate(pattern="user:*"),
            CacheClear(),
        ]
        for change in changes:
            with pytest.raises(BackendUnavailable, match="try again once it is") as refused:
                system.ask(change)
            assert refused.value.details == {"backend": "main", "breaker": "open"}
        system.ask(CacheSet(key="during", value=1))  # a set still falls back to memory
        assert system.ask(CacheGet(key="during")).value == 1

        server.start()
        wait_until(lambda: recovered(system))
        # Nothing was acknowledged that was not done: Redis has what it had.
        assert [system.ask(CacheGet(key=k)).value for k in ("k", "tagged", "user:1")] == ["old"] * 3
        assert system.ask(CacheDelete(key="k")).count == 1
        assert system.ask(CacheInvalidateTags(tags=["group"])).count == 2
        assert [system.ask(CacheGet(key=k)).found for k in ("k", "tagged", "user:1")] == [False] * 3


def test_tag_sets_expire_with_their_keys_and_drop_dead_ones(redis_url: str) -> None:
    with redis_system(redis_url) as system, connect(redis_url) as raw:
        brief = "corral:cache:main:tag:{brief}"
        system.ask(CacheSetMany(values={f"b{n}": n for n in range(50)}, ttl=0.2, tags=["brief"]))
        assert raw.zcard(brief) == 50 and 0 < raw.pttl(brief) <= 200
        wait_until(lambda: raw.exists(brief) == 0)  # gone with its keys

        group = "corral:cache:main:tag:{group}"
        system.ask(CacheSet(key="long", value=1, ttl=60, tags=["group"]))
        values = {f"short:{n}": n for n in range(200)}
        system.ask(CacheSetMany(values=values, ttl=0.1, tags=["group"]))
        assert raw.zcard(group) == 201 and 59_000 < raw.pttl(group) <= 60_000

        def pruned_by_a_write() -> bool:
            system.ask(CacheSet(key="other", value=1, ttl=30, tags=["group"]))
            return bool(raw.zrange(group, 0, -1) == [b"other", b"long"])

        wait_until(pruned_by_a_write)

        system.ask(CacheSet(key="forever", value=1, tags=["group"]))
        assert raw.pttl(group) == -1  # a key without TTL: the tag lives as long
        system.ask(CacheSet(key="brief", value=1, ttl=1, tags=["group"]))
        assert raw.pttl(group) == -1

        assert system.ask(CacheInvalidateTags(tags=["group"])).count == 4
        assert raw.exists(group) == 0
        assert not system.ask(CacheGet(key="forever")).found


def test_tag_sets_stay_bounded_under_a_stream_of_short_lived_keys(
    redis_server: RedisServer,
) -> None:
    with redis_system(redis_server.url) as system, connect(redis_server.url) as raw:

        def gone(key: str) -> Callable[[], bool]:
            return lambda: raw.exists(key) == 0

        for batch in range(6):
            values = {f"k{batch}:{n}": n for n in range(1000)}
            system.ask(CacheSetMany(values=values, ttl=0.05, tags=["hot"]))
            wait_until(gone(f"corral:cache:main:{{k{batch}:999}}"))

        def pruned_by_a_write() -> bool:
            system.ask(CacheSet(key="last", value=1, ttl=0.05, tags=["hot"]))
            return bool(raw.zcard("corral:cache:main:tag:{hot}") == 1)  # not 6,001

        wait_until(pruned_by_a_write)
        wait_until(gone("corral:cache:main:tag:{hot}"))


def test_two_redis_backends_keep_their_keys_apart(redis_url: str) -> None:
    backends = {name: {"type": "redis", "url": redis_url} for name in ("a", "b")}
    config = Config().replace(managers={"cache": ManagerSection(options={"backends": backends})})
    with System(config, managers=[CacheManager]) as system, connect(redis_url) as raw:
        for name in ("a", "b"):
            system.ask(CacheSet(key="k", value=name, tags=["t"], backend=name))
            system.ask(CacheSet(key="user:1", value=name, backend=name))
        assert system.ask(CacheClear(backend="a")).count == 2
        assert system.ask(CacheInvalidateTags(tags=["t"], backend="a")).count == 0
        assert system.ask(CacheInvalidate(pattern="user:*", backend="a")).count == 0
        assert system.ask(CacheGet(key="k", backend="b")).value == "b"
        assert system.ask(CacheGet(key="user:1", backend="b")).value == "b"
        assert system.ask(CacheGet(key="k", backend="a")).found is False
        assert sorted(key for node in masters(raw) for key in node.keys("*")) == [
            b"corral:cache:b:tag:{t}",
            b"corral:cache:b:{k}",
            b"corral:cache:b:{user:1}",
        ]
        # A lease is in its value's slot, even for a key with braces of its own.
        holder = system.ask(CacheGetOrLease(key="order:{7}:items", backend="b"))
        lease_key = "corral:cache:b:lease:{order:{7}:items}"
        assert raw.get(lease_key) == holder.lease.encode()
        assert key_slot(lease_key.encode()) == key_slot(b"corral:cache:b:{order:{7}:items}")


def test_an_encrypting_backend_keeps_nothing_readable_in_redis(redis_server: RedisServer) -> None:
    key, other = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    secret = {"card": "4111-1111-1111-1111", "holder": "Ada Lovelace"}
    with (
        redis_system(redis_server.url, encryption_keys=[key]) as system,
        redis.Redis.from_url(redis_server.url) as raw,
    ):
        system.ask(CacheSet(key="payment", value=secret, ttl=300, stale_ttl=30))
        system.ask(CacheSet(key="plain-looking", value="4111-1111-1111-1111"))
        stored = b"".join(raw.get(k) or b"" for k in raw.scan_iter("corral:cache:main:*"))
        assert stored and b"4111" not in stored and b"Ada" not in stored
        assert system.ask(CacheGet(key="payment")).value == secret
    with redis_system(redis_server.url, encryption_keys=[other, key]) as rotated:
        assert rotated.ask(CacheGet(key="payment")).value == secret  # an old key still reads
    for settings in ({"encryption_keys": [other]}, {}):
        with (
            redis_system(redis_server.url, fallback=False, **settings) as wrong,
            pytest.raises(BackendUnavailable, match="encrypted"),
        ):
            wrong.ask(CacheGet(key="payment"))
    with pytest.raises(ConfigError, match="is not a Fernet key"):
        redis_system(redis_server.url, encryption_keys=["short"])
