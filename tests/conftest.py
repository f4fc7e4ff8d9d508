"""Shared fixtures. Redis is always a real, private redis-server (see tests/redis_server.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.browser import DevTools, chromium
from tests.operations import BusyDaemon
from tests.redis_server import ClusterGroup, RedisServer, RedisServerNotFound, SentinelGroup


def _start_redis(*args: str) -> RedisServer:
    try:
        return RedisServer(*args)
    except RedisServerNotFound as exc:
        problem = str(exc)
    pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def _shared_redis_server() -> Iterator[RedisServer]:
    with _start_redis() as server:
        yield server


@pytest.fixture
def redis_server(_shared_redis_server: RedisServer) -> RedisServer:
    """The session's redis-server, emptied (FLUSHALL) for this test. Do not stop it:
    tests that restart, kill or pause Redis take ``fresh_redis_server``."""
    server = _shared_redis_server
    if not server.running:
        server.start()
    with redis.Redis.from_url(server.url, protocol=2) as client:
        client.flushall()
    return server


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to stop, restart, kill or pause."""
    with _start_redis() as server:
        yield server


@pytest.fixture(scope="session")
def _sentinel_group() -> Iterator[SentinelGroup]:
    group = SentinelGroup()
    yield group
    group.close()


@pytest.fixture
def sentinel_group(_sentinel_group: SentinelGroup) -> SentinelGroup:
    """The session's master + replica + 3 sentinels, emptied for this test. Tests that
    fail the master over take ``fresh_sentinel_group``."""
    _sentinel_group.flushall()
    return _sentinel_group


@pytest.fixture
def fresh_sentinel_group() -> Iterator[SentinelGroup]:
    group = SentinelGroup()
    yield group
    group.close()


@pytest.fixture(scope="session")
def _redis_cluster() -> Iterator[ClusterGroup]:
    cluster = ClusterGroup()
    yield cluster
    cluster.close()


@pytest.fixture
def redis_cluster(_redis_cluster: ClusterGroup) -> ClusterGroup:
    """The session's 3-master + 3-replica cluster, emptied for this test. Tests that
    kill a node take ``fresh_redis_cluster``."""
    _redis_cluster.wait_until_ok()
    _redis_cluster.flushall()
    return _redis_cluster


@pytest.fixture(params=["standalone", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """The URL of the session's standalone Redis, then of one node of its 3-master cluster."""
    topology: RedisServer | ClusterGroup = request.getfixturevalue(
        "redis_server" if request.param == "standalone" else "redis_cluster"
    )
    return topology.url


@pytest.fixture
def fresh_redis_cluster() -> Iterator[ClusterGroup]:
    cluster = ClusterGroup()
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def busy_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BusyDaemon]:
    """A real ``corral run`` with every built-in manager and JSON logs, after some traffic
    (see tests/operations.py); on a redis-server of its own."""
    with BusyDaemon(tmp_path_factory.mktemp("busy")) as busy:
        yield busy


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
    """Headless Chromium on a blank page, driven through the DevTools protocol."""
    with chromium(tmp_path / "profile") as tools:
        yield tools
