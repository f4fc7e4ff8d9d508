"""Two processes x 8 threads, each process with its own System, hammer one limit on one Redis.

Every thread of both processes starts at once (on a ``go`` line on its stdin), makes
its calls, and the processes report how many were allowed: never more than the
limit, for the sliding window and for the token bucket.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.redis_server import ClusterGroup, RedisServer

THREADS = 8
CALLS = 30  # per thread and per limit: 2 x 8 x 30 = 480 tries at each limit

WORKER = textwrap.dedent(
    """
    import json, sys, threading
    from corral.actors.ratelimit import RatelimitManager
    from corral.messages.ratelimit import RatelimitCheck
    from corral.supervisor import ChildSpec
    from corral.system import System

    url, threads, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cluster = sys.argv[4] == "cluster"
    rules = {
        "window": {"level": "ip", "limit": "40/hour"},
        "bucket": {"level": "user", "limit": "30/hour", "algorithm": "token_bucket"},
    }
    spec = ChildSpec(name="ratelimit", manager=RatelimitManager,
                     options={"backend": "redis", "redis_url": url, "rules": rules,
                              "cluster": cluster})
    allowed = {"window": 0, "bucket": 0}
    lock = threading.Lock()

    def hammer(system):
        for _ in range(calls):
            for rule, call in (("window", RatelimitCheck(ip="shared")),
                               ("bucket", RatelimitCheck(user="shared"))):
                if system.ask(call, timeout=30).allowed:
                    with lock:
                        allowed[rule] += 1

    with System(managers=[spec]) as system:
        print("ready", flush=True)
        assert sys.stdin.readline().strip() == "go"
        workers = [threading.Thread(target=hammer, args=(system,)) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    print(json.dumps(allowed), flush=True)
    """
)


@pytest.mark.parametrize("layout", ["single", "cluster"])
def test_two_processes_never_exceed_one_limit(redis_server: RedisServer, layout: str) -> None:
    # "cluster": the per-identity scripts a cluster needs, forced on a single server.
    assert two_processes_hammer(redis_server.url, layout) == {"window": 40, "bucket": 30}


def test_two_processes_never_exceed_one_limit_on_a_real_cluster(
    redis_cluster: ClusterGroup,
) -> None:
    assert two_processes_hammer(redis_cluster.node_url(2), "auto") == {"window": 40, "bucket": 30}


def two_processes_hammer(url: str, layout: str) -> dict[str, int]:
    """How many calls the two processes were allowed, per limit. Each limit is reached
    exactly: never exceeded, and not refused below it either."""
    root = Path(__file__).resolve().parent.parent
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(THREADS), str(CALLS), layout],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        totals = {"window": 0, "bucket": 0}
        for process in processes:
            out, _ = process.communicate(timeout=60)
            assert process.returncode == 0
            for rule, count in json.loads(out.strip().splitlines()[-1]).items():
                totals[rule] += count
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return totals
