"""Pool: HTTP calls through the ``pool`` manager against plain httpx, same server, same run.

- throughput: 1,000 GETs at concurrency 50, ``System.ask_async`` through the pool
  manager vs ``httpx.AsyncClient`` with ``asyncio.gather`` (target ratio >= 0.8);
- sequential latency p50/p99: ``System.ask`` vs ``httpx.Client.get``;
- concurrency: 100 concurrent calls to a 50 ms endpoint vs one call's latency
  (target <= 1.5x: the mailbox never waits on the network), and vs the same
  100 calls made with plain ``httpx.AsyncClient``; and the pool's 100 against one call
  once more, on an aiohttp server.

The server runs in a subprocess (its own interpreter, so it does not share the
client's GIL): a lean HTTP/1.1 responder on asyncio's transports, so that the figures
are the clients' (see ``serve``). Run: ``python bench/pool.py``. Prints figures and
ratios; asserts nothing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httpx
from _report import Row, percentiles, report

from corral.actors.pool import PoolManager
from corral.config import Config, ManagerSection
from corral.messages.pool import HttpRequest
from corral.system import System

REQUESTS = 1_000
CONCURRENCY = 50
SEQUENTIAL = 300
SLOW_CALLS = 100
SLOW_MS = 50
SLOW_ROUNDS = 6  # best of: the figures are tens of ms on a shared machine
ROUNDS = 2
BUDGET = 15.0  # seconds: no further throughput rounds past it (a loaded machine)
ASK_TIMEOUT = 60.0  # a loaded machine must slow the figures down, not fail the run


def serve() -> None:
    """The subprocess: a lean HTTP/1.1 server on a free port, printed on stdout.

    It keeps connections alive and answers ``GET /ok`` at once and ``GET /slow?ms=N``
    after N ms with the same small JSON body, on asyncio's transports, at a few tens of
    µs of CPU per request: the figures measure the clients, not the server (aiohttp's
    server spends about 250 µs per request, which for 100 concurrent calls on 2 cores
    is most of their time; ``serve_aiohttp`` serves with it instead, for comparison).
    """

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_LeanHttp, "127.0.0.1", 0, backlog=1024)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


_ANSWER = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"ok": true}'
)


class _LeanHttp(asyncio.Protocol):
    """One connection of ``serve``: bodiless requests, answered in order."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = b""
        self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            target = head.split(b" ", 2)[1]
            path, _, query = target.partition(b"?")
            delay = int(query.partition(b"ms=")[2] or 50) / 1000 if path == b"/slow" else 0.0
            self.loop.call_later(delay, self.transport.write, _ANSWER)


def serve_aiohttp() -> None:
    """``serve`` by an aiohttp server."""
    from aiohttp import web  # noqa: PLC0415 - only the server process needs it

    async def ok(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(int(request.query.get("ms", "50")) / 1000)
        return web.json_response({"ok": True})

    async def run() -> None:
        app = web.Application()
        app.router.add_get("/ok", ok)
        app.router.add_get("/slow", slow)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        server: Any = site._server
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


async def bounded(n: int, concurrency: int, call: Callable[[], Awaitable[Any]]) -> float:
    """Calls per second of ``n`` calls, at most ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - started)


async def throughput(system: System, url: str) -> tuple[float, float]:
    request = HttpRequest(service="bench", path="/ok")
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    best_pool = best_httpx = 0.0
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:

        async def plain() -> None:
            (await client.get(url + "/ok")).raise_for_status()

        async def through_pool() -> None:
            await system.ask_async(request, timeout=ASK_TIMEOUT)

        await bounded(CONCURRENCY, CONCURRENCY, plain)  # warm both pools up
        await bounded(CONCURRENCY, CONCURRENCY, through_pool)
        budget_end = time.perf_counter() + BUDGET
        for _ in range(ROUNDS):
            best_httpx = max(best_httpx, await bounded(REQUESTS, CONCURRENCY, plain))
            best_pool = max(best_pool, await bounded(REQUESTS, CONCURRENCY, through_pool))
            if time.perf_counter() > budget_end:
                break
    return best_pool, best_httpx


def sequential(system: System, url: str) -> tuple[list[float], list[float]]:
    request = HttpRequest(service="bench", path="/ok")
    pool_times: list[float] = []
    httpx_times: list[float] = []
    with httpx.Client(trust_env=False) as client:
        for _ in range(SEQUENTIAL):
            started = time.perf_counter()
            client.get(url + "/ok")
            httpx_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            system.ask(request, timeout=ASK_TIMEOUT)
            pool_times.append(time.perf_counter() - started)
    return pool_times, httpx_times


async def slow_calls(
    system: System, url: str, service: str = "bench"
) -> tuple[float, float, float]:
    """Best times of: 100 concurrent slow calls through the pool, one call, 100 with httpx."""
    request = HttpRequest(service=service, path="/slow", params={"ms": SLOW_MS})
    best_one = best_many = best_httpx = float("inf")
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        for _ in range(SLOW_ROUNDS + 1):  # the first round opens the connections
            started = time.perf_counter()
            await system.ask_async(request, timeout=ASK_TIMEOUT)
            best_one = min(best_one, time.perf_counter() - started)
            started = time.perf_counter()
            await asyncio.gather(
                *(system.ask_async(request, timeout=ASK_TIMEOUT) for _ in range(SLOW_CALLS))
            )
            best_many = min(best_many, time.perf_counter() - started)
            started = time.perf_counter()
            await asyncio.gather(
                *(client.get(f"{url}/slow", params={"ms": SLOW_MS}) for _ in range(SLOW_CALLS))
            )
            best_httpx = min(best_httpx, time.perf_counter() - started)
    return best_many, best_one, best_httpx


def start_server(*flags: str) -> tuple[subprocess.Popen[str], str]:
    """The server subprocess (see ``serve``) and its URL."""
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", *flags], stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None
    return server, f"http://127.0.0.1:{server.stdout.readline().strip()}"


def main() -> None:
    servers: list[subprocess.Popen[str]] = []
    try:
        lean, url = start_server()
        servers.append(lean)
        aiohttp_server, aiohttp_url = start_server("--aiohttp")
        servers.append(aiohttp_server)
        services = {
            name: {"base_urls": [base], "max_connections": 100, "max_keepalive": 100}
            for name, base in (("bench", url), ("bench-aiohttp", aiohttp_url))
        }
        config = Config().replace(managers={"pool": ManagerSection(options={"services": services})})
        with System(config, managers=[PoolManager]) as system:
            pool_rate, httpx_rate = asyncio.run(throughput(system, url))
            pool_times, httpx_times = sequential(system, url)
            many, one, many_httpx = asyncio.run(slow_calls(system, url))
            on_aiohttp = asyncio.run(slow_calls(system, aiohttp_url, "bench-aiohttp"))
    finally:
        for server in servers:
            server.terminate()
            server.wait(5)
    pool_p50, pool_p99 = percentiles(pool_times)
    httpx_p50, httpx_p99 = percentiles(httpx_times)
    rows = [
        Row(
            f"{REQUESTS:,} GETs at concurrency {CONCURRENCY}: pool vs httpx.AsyncClient",
            pool_rate,
            httpx_rate,
            "req/s",
        ),
        Row("sequential GET p50: pool ask vs httpx.Client", pool_p50 * 1e6, httpx_p50 * 1e6, "µs"),
        Row("sequential GET p99: pool ask vs httpx.Client", pool_p99 * 1e6, httpx_p99 * 1e6, "µs"),
        Row(f"{SLOW_CALLS} concurrent {SLOW_MS} ms calls vs one call", many * 1e3, one * 1e3, "ms"),
        Row(
            f"{SLOW_CALLS} concurrent {SLOW_MS} ms calls: pool vs httpx.AsyncClient",
            many * 1e3,
            many_httpx * 1e3,
            "ms",
        ),
        Row(
            f"the same {SLOW_CALLS} vs one, on an aiohttp server",
            on_aiohttp[0] * 1e3,
            on_aiohttp[1] * 1e3,
            "ms",
        ),
    ]
    report(
        "pool manager vs plain httpx (same local server, same run)",
        rows,
        note="targets: throughput ratio >= 0.8; 100 slow calls <= 1.5x one call",
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    elif sys.argv[1:] == ["--serve", "--aiohttp"]:
        serve_aiohttp()
    else:
        main()
