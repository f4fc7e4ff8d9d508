"""Rate limiting: the ``ratelimit`` manager on Redis against ``limits`` and plain redis-py.

- 3-level check (ip, user, api_key, sliding window counter each) through the
  actor — one ``System.ask``, one Redis round trip — vs ``limits`` doing the same
  three hits with its Redis storage (``SlidingWindowCounterRateLimiter``, one Lua
  script per hit), and vs ``limits``' cheapest strategy (fixed window);
- single-level check through the actor vs a plain redis-py ``GET`` (the floor of
  any Redis-backed decision made from Python), and vs a bare pykka actor doing
  that ``GET`` (the floor of any Redis-backed decision made *through an actor*:
  the caller's thread hands over to the actor's, which waits on the socket);
- the same 1-level and 3-level checks from 8 caller threads (the actor then
  decides the checks waiting in its mailbox in one round trip) vs redis-py GET
  and ``limits`` from 8 threads;
- the same 3-level check with the Redis Cluster layout (``cluster = true``: one
  script per identifier, pipelined), and on the memory backend (the actor's own cost).

Run: ``python bench/ratelimit.py``. Starts a private redis-server; prints figures
and ratios; asserts nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import limits
import limits.storage
import limits.strategies
import pykka
import redis
from _report import Row, percentiles, report, timed

from corral.actors.ratelimit import RatelimitManager
from corral.messages.ratelimit import RatelimitCheck
from corral.supervisor import ChildSpec
from corral.system import System
from tests.redis_server import RedisServer

N = 2_000
ROUNDS = 2
THREADS = 8
RULES = {"ip": "1000000/hour", "user": "1000000/hour", "api_key": "1000000/hour"}


def threaded(fn: Callable[[], object], n: int, threads: int = THREADS) -> float:
    """Calls per second of ``fn`` made by ``threads`` threads, ``n`` calls in all."""
    each = n // threads
    workers = [threading.Thread(target=lambda: [fn() for _ in range(each)]) for _ in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return each * threads / (time.perf_counter() - started)


def latencies(fn: Callable[[], object], n: int) -> tuple[float, float]:
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        started = clock()
        fn()
        samples.append(clock() - started)
    p50, p99 = percentiles(samples)
    return p50 * 1e6, p99 * 1e6


class BareGetter(pykka.ThreadingActor):
    """A bare pykka actor that answers every message with one redis-py GET."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__()
        self.client = client

    def on_receive(self, message: object) -> object:
        return self.client.get("bench:key")


def limiter(url: str, rules: dict[str, str], *, cluster: bool = False) -> System:
    options = {
        "backend": "redis" if url else "memory",
        "redis_url": url,
        "rules": rules,
        "cluster": cluster,
    }
    return System(managers=[ChildSpec(name="ratelimit", manager=RatelimitManager, options=options)])


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    with RedisServer() as server:
        storage = limits.storage.RedisStorage(server.url)
        sliding = limits.strategies.SlidingWindowCounterRateLimiter(storage)
        fixed = limits.strategies.FixedWindowRateLimiter(storage)
        hour = limits.parse("1000000/hour")
        plain = redis.Redis.from_url(server.url)
        plain.set("bench:key", b"x")

        def limits_three(strategy: limits.strategies.RateLimiter) -> Callable[[], object]:
            def hit() -> bool:
                return (
                    strategy.hit(hour, "ip", "10.0.0.1")
                    and strategy.hit(hour, "user", "ada")
                    and strategy.hit(hour, "api_key", "k-123")
                )

            return hit

        assert limits_three(sliding)(), "limits' Redis storage does not work here"
        three = RatelimitCheck(ip="10.0.0.1", user="ada", api_key="k-123")
        one = RatelimitCheck(ip="10.0.0.1")
        with (
            limiter(server.url, RULES) as system,
            limiter(server.url, RULES, cluster=True) as cluster,
            limiter("", RULES) as memory,
        ):
            assert system.ask(three).allowed and not system.ask(three).degraded

            def corral_three() -> object:
                return system.ask(three)

            def corral_one() -> object:
                return system.ask(one)

            def cluster_three() -> object:
                return cluster.ask(three)

            def memory_three() -> object:
                return memory.ask(three)

            def get() -> object:
                return plain.get("bench:key")

            bare = BareGetter.start(plain)

            def bare_get() -> object:
                return bare.ask("get")

            warm = (corral_three, cluster_three, corral_one, memory_three, get, bare_get)
            for fn in (*warm, limits_three(sliding)):
                timed(fn, 500)  # warm up
            rows = [
                Row(
                    "3-level check: corral vs limits sliding window",
                    timed(corral_three, N, repeat=ROUNDS),
                    timed(limits_three(sliding), N, repeat=ROUNDS),
                ),
                Row(
                    "3-level check: corral vs limits fixed window",
                    timed(corral_three, N, repeat=ROUNDS),
                    timed(limits_three(fixed), N, repeat=ROUNDS),
                ),
                Row(
                    "3-level, cluster layout: corral vs limits sliding",
                    timed(cluster_three, N, repeat=ROUNDS),
                    timed(limits_three(sliding), N, repeat=ROUNDS),
                ),
                Row(
                    "1-level check: corral vs redis-py GET",
                    timed(corral_one, N, repeat=ROUNDS),
                    timed(get, N, repeat=ROUNDS),
                ),
                Row(
                    "1-level check: corral vs bare pykka actor + GET",
                    timed(corral_one, N, repeat=ROUNDS),
                    timed(bare_get, N, repeat=ROUNDS),
                ),
                Row(
                    "3-level check: corral memory vs corral redis",
                    timed(memory_three, N, repeat=ROUNDS),
                    timed(corral_three, N, repeat=ROUNDS),
                ),
            ]
            bare.stop()
            report("ratelimit: throughput, one caller (ratio: corral / reference)", rows)
            concurrent = [
                Row(
                    "1-level check: corral vs redis-py GET",
                    threaded(corral_one, 2 * N),
                    threaded(get, 2 * N),
                ),
                Row(
                    "3-level check: corral vs limits sliding window",
                    threaded(corral_three, 2 * N),
                    threaded(limits_three(sliding), 2 * N),
                ),
            ]
            report(f"ratelimit: throughput, {THREADS} caller threads", concurrent)
            p50, p99 = latencies(corral_three, N)
            ref50, ref99 = latencies(limits_three(sliding), N)
            report(
                "ratelimit: 3-level check latency (reference: limits sliding window)",
                [
                    Row("p50", p50, ref50, unit="us"),
                    Row("p99", p99, ref99, unit="us"),
                ],
                note="targets: 3-level >= 2.5x limits; 1-level >= 0.8x redis-py GET",
            )


if __name__ == "__main__":
    main()
