"""The daemon's probes: /livez never waits on an actor, /readyz says when to send traffic."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

import corral
from corral.config import BusSection, Config, DaemonSection, ManagerSection
from corral.daemon import Daemon
from tests.redis_server import RedisServer
from tests.support import Work, wait_until


@pytest.fixture
def gate() -> threading.Event:
    return threading.Event()


@pytest.fixture
def daemon(redis_server: RedisServer, gate: threading.Event) -> Iterator[Daemon]:
    config = Config().replace(
        bus=BusSection(backend="redis", url=redis_server.url, namespace="probes"),
        daemon=DaemonSection(port=0),
        managers={
            "worker": ManagerSection(class_path="tests.support:Worker", options={"gate": gate})
        },
    )
    with Daemon(config) as running:
        yield running
    gate.set()


def test_probes_answer_while_a_handler_is_blocked(
    daemon: Daemon, gate: threading.Event, redis_server: RedisServer
) -> None:
    worker = daemon.system.supervisor.live_ref("worker")
    assert worker is not None
    worker.tell(Work(action="block", seconds=4))
    blocked_until = time.monotonic() + 4
    timings = []
    with httpx.Client(base_url=daemon.url, timeout=1.0) as http:
        for _ in range(20):
            started = time.perf_counter()
            assert http.get("/livez").json() == {"status": "alive"}
            timings.append(time.perf_counter() - started)
            health = http.get("/health")  # the latest probes: no waiting on the worker
            assert health.status_code == 200
            assert health.json()["managers"]["worker"]["state"] == "running"
            assert http.get("/readyz").status_code == 200
    # Every probe was answered while the handler still held the worker.
    assert time.monotonic() < blocked_until
    assert daemon.system.supervisor.live_ref("worker") is worker
    gate.set()
    print(f"/livez p99 over 20 calls while blocked: {max(timings) * 1000:.1f} ms")


def test_readyz_is_503_while_draining(daemon: Daemon, redis_server: RedisServer) -> None:
    with corral.connect(redis_server.url, namespace="probes") as remote:
        caller = threading.Thread(target=lambda: remote.ask(Work(action="sleep", seconds=1.5)))
        caller.start()
        wait_until(lambda: daemon.remote is not None and daemon.remote.in_flight == 1)
        stopper = threading.Thread(target=daemon.stop)
        stopper.start()
        wait_until(lambda: daemon.draining)
        response = httpx.get(f"{daemon.url}/readyz", timeout=2)
        assert response.status_code == 503
        assert response.json() == {"status": "not ready", "reasons": ["draining"]}
        assert httpx.get(f"{daemon.url}/livez", timeout=2).status_code == 200
        caller.join(10)
        stopper.join(30)
