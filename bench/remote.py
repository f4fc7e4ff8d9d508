"""Remote requests: corral.connect() through a daemon vs hand-written redis-py RPC.

Both run against the same private redis-server in the same run, each with its
server side in a process of its own:

- corral: ``corral run`` (bus on Redis) serving ``system.ping``; the client adds
  the request to the request stream and waits for the reply on the request's own
  reply list, in one round trip;
- reference: a responder process doing ``BLPOP`` on a request list and ``LPUSH``
  of the reply to a per-request list, the client ``LPUSH`` + ``BLPOP`` — the
  smallest request/reply one would write by hand with redis-py and msgpack.

Figures: sequential round trip p50/p99, and throughput with 8 calling threads (the best
of 3 rounds, corral and the reference in turn); the
cost of the run record a request that is not idempotent pays (``cache.set`` against
``cache.get``); the cost of signing (``codec.signing_keys``) with the replay check:
every envelope signed and verified, each reply through the client's replay guard, and
every request, reads included, recorded in Redis once (a daemon of its own namespace
against the unsigned one); then the same throughput with 1 and with 3 daemons on the
one Redis, with the daemons' CPU seconds per 1,000 requests (from ``/proc``).
Run: ``python bench/remote.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import redis
from _report import Row, percentiles, report

import corral
from corral._wire import alive_key
from corral.messages.cache import CacheGet, CacheSet
from corral.messages.system import Ping
from tests.redis_server import RedisServer

ROUND_TRIPS = 1_000
CONCURRENT = 2_000
THREADS = 8
ROUNDS = 3
SIGNED = "signed"
"""The namespace of the daemon with signing keys."""
KEY = "bench-signing-key"

RESPONDER = """
import sys, msgpack, redis
client = redis.Redis.from_url(sys.argv[1], socket_timeout=None)  # BLPOP waits while idle
while True:
    _, raw = client.blpop("bench:requests")
    request = msgpack.unpackb(raw)
    if request["payload"] == b"stop":
        break
    client.lpush(request["reply"], msgpack.packb({"payload": request["payload"]}))
"""


def start_daemon(url: str, workdir: Path, namespace: str = "corral") -> subprocess.Popen[str]:
    """A ``corral run`` serving cache; with signing keys in the namespace SIGNED."""
    config = workdir / f"{namespace}.toml"
    codec = f'[codec]\nsigning_keys = ["{KEY}"]\n' if namespace == SIGNED else ""
    config.write_text(
        f'[bus]\nbackend = "redis"\nurl = "{url}"\nnamespace = "{namespace}"\n'
        f"[daemon]\nport = 0\n[managers.cache]\n{codec}"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "run", "-c", str(config), "--log-level", "WARNING"],
        stderr=subprocess.PIPE,
        text=True,
    )
    return process


def wait_for_daemons(url: str, count: int) -> None:
    """Until ``count`` daemons are in the alive set of system.ping's manager."""
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 30
    while client.zcard(alive_key("corral", "system")) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{count} daemons did not come up")
        time.sleep(0.1)


def wait_for_daemon(client: corral.Client) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            client.ask(Ping(), timeout=2)
            return
        except corral.errors.CorralError:
            time.sleep(0.1)
    raise SystemExit("the daemon did not come up")


def cpu_seconds(processes: list[subprocess.Popen[str]]) -> float:
    """User + system CPU seconds the processes have used so far."""
    ticks = 0
    for process in processes:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def throughput(
    call: Callable[[], object], daemons: list[subprocess.Popen[str]]
) -> tuple[float, float]:
    """Asks per second with THREADS callers, and daemon CPU seconds per 1,000 asks."""
    cpu_before = cpu_seconds(daemons)
    with ThreadPoolExecutor(THREADS) as pool:
        started = time.perf_counter()
        list(pool.map(lambda _: call(), range(CONCURRENT)))
        rate = CONCURRENT / (time.perf_counter() - started)
    return rate, (cpu_seconds(daemons) - cpu_before) / CONCURRENT * 1000


def best_of(
    best: tuple[float, float, float] | None, new: tuple[float, float, float]
) -> tuple[float, float, float]:
    """The lower p50 and p99 and the higher rate of two ``measure`` results."""
    if best is None:
        return new
    return min(best[0], new[0]), min(best[1], new[1]), max(best[2], new[2])


def measure(call: Callable[[], object]) -> tuple[float, float, float]:
    samples = []
    for _ in range(ROUND_TRIPS):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    p50, p99 = percentiles(samples)
    with ThreadPoolExecutor(THREADS) as pool:
        started = time.perf_counter()
        list(pool.map(lambda _: call(), range(CONCURRENT)))
        rate = CONCURRENT / (time.perf_counter() - started)
    return p50, p99, rate


def signed_costs(
    url: str, workdir: Path, ping: Callable[[], object], cache_get: Callable[[], object]
) -> dict[str, tuple[float, float]]:
    """p50 (us) and throughput of ping and cache.get, signed then unsigned, by name."""
    daemon = start_daemon(url, workdir, SIGNED)
    try:
        with corral.connect(url, namespace=SIGNED, signing_keys=[KEY]) as client:
            wait_for_daemon(client)
            payload = b"x" * 64
            signed = {
                "ping": measure(lambda: client.ask(Ping(payload=payload))),
                "get": measure(lambda: client.ask(CacheGet(key="bench"))),
            }
    finally:
        daemon.terminate()
        daemon.wait(30)
    unsigned = {"ping": measure(ping), "get": measure(cache_get)}
    costs = {}
    for name in ("ping", "get"):
        costs[f"{name} p50"] = (signed[name][0] * 1e6, unsigned[name][0] * 1e6)
        costs[f"{name} rate"] = (signed[name][2], unsigned[name][2])
    return costs


BATCH = 100


def batch_gain(client: corral.Client) -> tuple[float, float]:
    """cache.get replies per second: batches of BATCH by ``ask_many`` (one round trip
    each), and the same gets asked one after another; best of a few rounds each."""
    gets = [CacheGet(key=f"bench:{i}") for i in range(BATCH)]
    client.ask_many(gets)
    batched = sequential = 0.0
    for _ in range(5):
        started = time.perf_counter()
        client.ask_many(gets)
        batched = max(batched, BATCH / (time.perf_counter() - started))
        started = time.perf_counter()
        for get in gets:
            client.ask(get)
        sequential = max(sequential, BATCH / (time.perf_counter() - started))
    return batched, sequential


def main() -> None:
    with RedisServer() as server, tempfile.TemporaryDirectory() as workdir:
        daemons = [start_daemon(server.url, Path(workdir))]
        responder = subprocess.Popen([sys.executable, "-c", RESPONDER, server.url])
        plain = redis.Redis.from_url(server.url)
        try:
            with corral.connect(server.url) as client:
                wait_for_daemon(client)
                payload = b"x" * 64

                def corral_call() -> object:
                    return client.ask(Ping(payload=payload))

                def cache_get() -> object:
                    return client.ask(CacheGet(key="bench"))

                def cache_set() -> object:
                    return client.ask(CacheSet(key="bench", value="v"))

                def plain_call() -> object:
                    reply_key = f"bench:reply:{uuid.uuid4().hex}"
                    plain.lpush(
                        "bench:requests", msgpack.packb({"payload": payload, "reply": reply_key})
                    )
                    _, raw = plain.blpop([reply_key])  # type: ignore[misc]
                    return msgpack.unpackb(raw)

                results: dict[str, tuple[float, float, float]] = {}
                for _ in range(ROUNDS):  # interleaved, the best of each: the machine is shared
                    for name, call in (("corral", corral_call), ("redis-py", plain_call)):
                        call()
                        results[name] = best_of(results.get(name), measure(call))
                cache_set()
                record = {
                    name: measure(call) for name, call in (("get", cache_get), ("set", cache_set))
                }
                batch = batch_gain(client)
                signing = signed_costs(server.url, Path(workdir), corral_call, cache_get)
                one = throughput(corral_call, daemons)
                daemons += [start_daemon(server.url, Path(workdir)) for _ in range(2)]
                wait_for_daemons(server.url, 3)
                three = throughput(corral_call, daemons)
        finally:
            plain.lpush("bench:requests", msgpack.packb({"payload": b"stop", "reply": ""}))
            responder.wait(10)
            for daemon in daemons:
                daemon.terminate()
            for daemon in daemons:
                daemon.wait(30)
    corral_p50, corral_p99, corral_rate = results["corral"]
    plain_p50, plain_p99, plain_rate = results["redis-py"]
    report(
        "remote: corral.connect() through a daemon vs hand-written redis-py request/reply",
        [
            Row("round trip p50 (us)", corral_p50 * 1e6, plain_p50 * 1e6, "us"),
            Row("round trip p99 (us)", corral_p99 * 1e6, plain_p99 * 1e6, "us"),
            Row(f"throughput, {THREADS} threads", corral_rate, plain_rate, "asks/s"),
        ],
        note="latency: lower is better. corral adds the daemon liveness check, a consumer "
        "group, validation and signing-ready envelopes.",
    )
    report(
        "remote: the run record of a request that is not idempotent (cache.set vs cache.get)",
        [
            Row("round trip p50 (us)", record["set"][0] * 1e6, record["get"][0] * 1e6, "us"),
            Row(f"throughput, {THREADS} threads", record["set"][2], record["get"][2], "asks/s"),
        ],
        note="cache.set records its start (one SET NX) before it runs, and its reply after; "
        "sets queued together record their starts in one round trip and are stored in one.",
    )
    report(
        "remote: signed, with the replay check, vs unsigned",
        [
            Row("system.ping round trip p50 (us)", *signing["ping p50"], "us"),
            Row(f"system.ping throughput, {THREADS} threads", *signing["ping rate"], "asks/s"),
            Row("cache.get round trip p50 (us)", *signing["get p50"], "us"),
            Row(f"cache.get throughput, {THREADS} threads", *signing["get rate"], "asks/s"),
        ],
        note="figure: signed; reference: unsigned, measured in turn in the same run.",
    )
    report(
        f"remote: {BATCH} cache.get in one ask_many vs asked one after another",
        [Row("replies per second", batch[0], batch[1], "/s")],
        note="ask_many sends the batch in one pipeline and waits for the replies together.",
    )
    report(
        "remote: 3 daemons on one Redis vs 1 (system.ping)",
        [
            Row(f"throughput, {THREADS} threads", three[0], one[0], "asks/s"),
            Row("daemon CPU s per 1,000 asks", three[1], one[1], "s"),
        ],
        note=f"{os.cpu_count()} cores shared by Redis, the callers and the daemons.",
    )


if __name__ == "__main__":
    main()
