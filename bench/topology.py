"""Topology: state writes on one Redis node against a 3-master + 3-replica cluster, one run.

- state writes/s (``StateRegister`` of distinct states through ``System.ask``, 4 threads)
  and the Redis CPU each write costs (``INFO cpu`` of every master, before and after);
- how the state keys spread over the cluster's masters.

Run: ``python bench/topology.py``. Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from _report import Row, report

from corral.config import BusSection, Config, ManagerSection
from corral.messages.state import StateRegister
from corral.system import System
from tests.redis_server import ClusterGroup, RedisServer

WRITES = 4_000
THREADS = 4


def _cpu(ports: list[int]) -> float:
    total = 0.0
    for port in ports:
        with redis.Redis(port=port, protocol=2) as client:
            info: dict[str, Any] = client.info("cpu")
            total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


def writes(url: str, masters: list[int], tag: str) -> tuple[float, float]:
    """Writes/s and Redis CPU microseconds per write of ``WRITES`` new states."""
    config = Config().replace(
        bus=BusSection(backend="redis", url=url, namespace=tag),
        managers={"state": ManagerSection(options={"backend": "redis"})},
    )
    with System(config) as system:
        system.ask(StateRegister(state_id="warm", state_type="T"))
        per_thread = WRITES // THREADS
        cpu_before = _cpu(masters)

        def work(offset: int) -> None:
            for n in range(offset, offset + per_thread):
                system.ask(StateRegister(state_id=f"s{n}", state_type="T", data={"n": n}))

        threads = [threading.Thread(target=work, args=(i * per_thread,)) for i in range(THREADS)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        cpu = _cpu(masters) - cpu_before
    return WRITES / elapsed, cpu / WRITES * 1e6


def spread(masters: list[int], pattern: str) -> list[int]:
    """How many keys matching ``pattern`` each master holds."""
    counts = []
    for port in masters:
        with redis.Redis(port=port, protocol=2) as client:
            counts.append(sum(1 for _ in client.scan_iter(match=pattern, count=1000)))
    return counts


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    with RedisServer() as single:
        one_rate, one_cpu = writes(single.url, [single.port], "one")
    cluster = ClusterGroup()
    try:
        masters = [server.port for server in cluster.masters()]
        many_rate, many_cpu = writes(cluster.url, masters, "many")
        keys = spread(masters, "many:*:s:*")
    finally:
        cluster.close()
    report(
        "state writes: 3-master cluster vs one node (4 threads)",
        [
            Row("state writes/s: cluster vs one node", many_rate, one_rate),
            Row("Redis CPU per write: cluster vs one node", many_cpu, one_cpu, "µs"),
        ],
    )
    total = sum(keys) or 1
    shares = ", ".join(f"{100 * count / total:.0f}%" for count in keys)
    print(f"state keys per master of the cluster: {keys} ({shares})")


if __name__ == "__main__":
    main()
