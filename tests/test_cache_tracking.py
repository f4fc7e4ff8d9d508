"""A tiered cache's L1 follows writes made outside corral (a plain Redis client), through
Redis's client-side caching invalidations (``CLIENT TRACKING ... BCAST``), on a standalone
Redis and on each master of a cluster."""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import pytest
from redis.crc import key_slot

from corral._redis import connect, masters
from corral.messages.cache import CacheGet, CacheSet, CacheSetMany
from corral.system import System
from tests.support import wait_until
from tests.test_cache_redis import l1_hits
from tests.test_cache_redis import tiered_system as tiered_system_of


def tiered_system(url: str, **backend: Any) -> System:
    """A tiered cache whose L1 keeps what it read far longer than any test runs."""
    return tiered_system_of(url, l1_ttl=600.0, **backend)


def in_l1(system: System, key: str, value: Any) -> bool:
    """Whether a read of ``key`` is an L1 hit with ``value`` (reads fill L1)."""
    before = l1_hits(system)
    reply = system.ask(CacheGet(key=key))
    return bool(reply.value == value and l1_hits(system) == before + 1)


def test_a_write_by_a_plain_redis_client_reaches_the_l1(redis_url: str) -> None:
    # Keys in several slots, so that on a cluster they live on different masters.
    keys = [f"user:{n}" for n in range(12)]
    with tiered_system(redis_url) as system, connect(redis_url) as raw:
        health = system.health().managers["cache"].health
        assert health is not None and health.details["backends"]["main"]["tracking"] is True
        system.ask(CacheSetMany(values=dict.fromkeys(keys, "corral"), ttl=600))
        wait_until(lambda: all(in_l1(system, key, "corral") for key in keys))
        for key in keys:
            raw.set(f"corral:cache:main:{{{key}}}", msgpack.packb("outside"))
        wait_until(lambda: all(system.ask(CacheGet(key=k)).value == "outside" for k in keys))
        if len(masters(raw)) > 1:
            assert len({key_slot(f"corral:cache:main:{{{k}}}".encode()) for k in keys}) > 1


def test_a_flush_outside_corral_empties_the_l1(redis_url: str) -> None:
    with tiered_system(redis_url) as system, connect(redis_url) as raw:
        system.ask(CacheSet(key="k", value=1, ttl=600))
        wait_until(lambda: in_l1(system, "k", 1))
        for node in masters(raw):
            node.flushall()
        wait_until(lambda: not system.ask(CacheGet(key="k")).found)


def test_without_tracking_the_l1_keeps_what_it_read(redis_url: str) -> None:
    """What tracking adds: with it off, only corral's own writes reach the L1."""
    with tiered_system(redis_url, track_external_writes=False) as system, connect(redis_url) as raw:
        system.ask(CacheSet(key="k", value="corral", ttl=600))
        wait_until(lambda: in_l1(system, "k", "corral"))
        raw.set("corral:cache:main:{k}", msgpack.packb("outside"))
        with tiered_system(redis_url) as tracking:
            wait_until(lambda: tracking.ask(CacheGet(key="k")).value == "outside")
        assert in_l1(system, "k", "corral")


def test_on_a_cluster_the_log_says_which_masters_are_tracked(
    redis_cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="corral.actors.cache._manager"),
        tiered_system(redis_cluster.url),
    ):
        pass
    (record,) = [r for r in caplog.records if "CLIENT TRACKING" in r.getMessage()]
    assert "on the 3 masters of the cluster" in record.getMessage()
    assert "tracking is per node" in record.getMessage()
