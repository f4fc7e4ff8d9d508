"""The pool manager against real local HTTP servers (aiohttp on 127.0.0.1, in a thread).

One ``Backend`` serves several ports; each port has its own health switch and
records the requests it saw (time, path, client port, calls in flight), so the
tests can check retries, spacing, balancing and connection limits from the
server's side.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from corral.actors.pool import PoolManager, PoolOptions, ServiceOptions
from corral.actors.pool._policy import parse_retry_after, retry_delay
from corral.clock import ManualClock
from corral.config import Config, ManagerSection, parse_options
from corral.errors import (
    BackendUnavailable,
    ConfigError,
    InvalidMessage,
    ManagerUnavailable,
    NotFound,
    RequestError,
    Timeout,
    Unauthorized,
)
from corral.manager import handles
from corral.messages.base import Request, message
from corral.messages.pool import (
    HttpRequest,
    HttpResponse,
    JsonRpcCall,
    PoolBreakerChanged,
    PoolStats,
)
from corral.messages.system import HealthCheck
from corral.system import System
from tests.support import read_until, start_corral, wait_until

# -- the test servers -------------------------------------------------------------------------


@dataclass
class Port:
    """What one listening port saw, and its health switch."""

    port: int
    healthy: bool = True
    hits: list[tuple[float, str, int]] = field(default_factory=list)  # (time, path, client port)
    in_flight: int = 0
    max_in_flight: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self, prefix: str) -> list[float]:
        return [when for when, path, _ in self.hits if path.startswith(prefix)]


class Backend:
    """An aiohttp app on ``ports`` ports, run by its own event loop thread."""

    def __init__(self, ports: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.flaky: dict[str, int] = defaultdict(int)
        self.barriers: dict[str, asyncio.Event] = {}
        self.ports: list[Port] = asyncio.run_coroutine_threadsafe(
            self._start(ports), self.loop
        ).result(10)
        self.by_port = {p.port: p for p in self.ports}

    async def _start(self, count: int) -> list[Port]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        ports = []
        for _ in range(count):
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            server: Any = site._server
            ports.append(Port(server.sockets[0].getsockname()[1]))
        return ports

    def release(self, key: str) -> None:
        """Let the calls to ``/hold?key=<key>`` answer."""
        self.loop.call_soon_threadsafe(lambda: self._hold(key).set())

    def _hold(self, key: str) -> asyncio.Event:
        return self.barriers.setdefault(key, asyncio.Event())

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        port = self.by_port[request.transport.get_extra_info("sockname")[1]]  # type: ignore[union-attr]
        peer = request.transport.get_extra_info("peername")[1]  # type: ignore[union-attr]
        port.hits.append((time.monotonic(), request.path_qs, peer))
        port.headers.append(dict(request.headers))
        port.in_flight += 1
        port.max_in_flight = max(port.max_in_flight, port.in_flight)
        try:
            return await self._answer(request, port)
        finally:
            port.in_flight -= 1

    async def _answer(self, request: web.Request, port: Port) -> web.StreamResponse:
        q = request.query
        path = request.path
        if path == "/ok":
            return web.json_response({"port": port.port})
        if path == "/slow":
            await asyncio.sleep(int(q.get("ms", "50")) / 1000)
            return web.json_response({"port": port.port})
        if path == "/hold":  # answers once the test releases its key
            await self._hold(q["key"]).wait()
            return web.json_response({"port": port.port})
        if path == "/barrier":  # answers once ``n`` calls with this key are all in flight
            barrier = self._hold(q["key"])
            self.flaky[q["key"]] += 1
            if self.flaky[q["key"]] >= int(q["n"]):
                barrier.set()
            try:
                await asyncio.wait_for(barrier.wait(), 5.0)
            except TimeoutError:
                return web.Response(status=504)
            return web.Response(status=200)
        if path == "/health":
            return web.Response(status=200 if port.healthy else 503)
        if path.startswith("/status/"):
            return web.Response(status=int(path.rsplit("/", 1)[1]))
        if path == "/flaky":
            key = q["key"]
            self.flaky[key] += 1
            if self.flaky[key] <= int(q.get("fail", "1")):
                headers = {"Retry-After": q["retry_after"]} if "retry_after" in q else {}
                return web.Response(status=int(q.get("status", "503")), headers=headers)
            return web.json_response({"calls": self.flaky[key]})
        if path == "/cookie":  # sets a cookie, as a login would
            login = web.json_response({"port": port.port})
            login.set_cookie("session", q["value"])
            return login
        if path == "/query":
            return web.json_response({"query": request.rel_url.raw_query_string})
        if path == "/echo":
            return web.json_response(
                {"body": (await request.read()).decode(), "headers": dict(request.headers)}
            )
        if path == "/big":
            return web.Response(body=b"x" * int(q["size"]))
        if path == "/big_chunked":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for _ in range(int(q["chunks"])):
                await response.write(b"y" * 1000)
            await response.write_eof()
            return response
        if path == "/jsonrpc":
            return await self._json_rpc(await request.json())
        return web.Response(status=404)

    async def _json_rpc(self, call: dict[str, Any]) -> web.StreamResponse:
        method, params, ident = call["method"], call.get("params") or [], call["id"]
        if method == "add":
            return web.json_response({"jsonrpc": "2.0", "id": ident, "result": sum(params)})
        if method == "secret":
            error = {
                "code": 200,
                "message": "Odoo Server Error",
                "data": {"name": "odoo.exceptions.AccessError", "message": "no"},
            }
            return web.json_response({"jsonrpc": "2.0", "id": ident, "error": error})
        if method == "crash":
            return web.Response(status=500, text="Internal Server Error")
        error = {"code": -32601, "message": "Method not found"}
        return web.json_response({"jsonrpc": "2.0", "id": ident, "error": error})


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    server = Backend(ports=3)
    yield server
    server.close()


@pytest.fixture
def ports(backend: Backend) -> list[Port]:
    for port in backend.ports:
        port.healthy = True
        port.hits.clear()
        port.headers.clear()
        port.max_in_flight = 0
    return backend.ports


def down_url() -> str:
    """A URL nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


_keys = iter(range(1_000_000))


def key() -> str:
    """A fresh key for /flaky, so that tests do not share its failure counts."""
    return f"k{next(_keys)}"


TRANSPORT: list[str] = ["auto"]
"""The transport ``pool()`` gives its services (every test runs with each)."""


@pytest.fixture(autouse=True, params=["aiohttp", "httpx"])
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    TRANSPORT[0] = request.param
    yield request.param
    TRANSPORT[0] = "auto"


@contextmanager
def pool(clock: ManualClock | None = None, **services: dict[str, Any]) -> Iterator[System]:
    services = {name: {"transport": TRANSPORT[0], **options} for name, options in services.items()}
    options: dict[str, Any] = {"services": services}
    config = Config().replace(managers={"pool": ManagerSection(options=options)})
    with System(config, managers=[PoolManager], clock=clock) as system:
        yield system


FAST_RETRIES = {"retry_delay": 0.02, "retry_jitter": 0.0}


# -- calls ----------------------------------------------------------------------------------


def test_get_answers_status_headers_body_and_base_url(ports: list[Port]) -> None:
    with pool(api={"base_urls": [ports[0].url], "headers": {"X-Team": "corral"}}) as system:
        reply = system.ask(HttpRequest(service="api", path="/ok"))
        assert (reply.status, reply.json(), reply.attempts) == (200, {"port": ports[0].port}, 1)
        assert reply.url == ports[0].url
        assert reply.headers["content-type"].startswith("application/json")
        assert ports[0].headers[-1]["X-Team"] == "corral"
        assert system.ask(HttpRequest(service="api", path="/nothing")).status == 404


def test_post_json_and_raw_body(ports: list[Port]) -> None:
    with pool(api={"base_urls": [ports[0].url], "bearer_token": "t0k"}) as system:
        reply = system.ask(HttpRequest(service="api", method="POST", path="/echo", json={"a": 1}))
        echoed = reply.json()
        assert echoed["body"] == '{"a":1}'
        assert echoed["headers"]["Content-Type"] == "application/json"
        assert echoed["headers"]["Authorization"] == "Bearer t0k"
        raw = system.ask(HttpRequest(service="api", method="PUT", path="/echo", body=b"raw"))
        assert raw.json()["body"] == "raw"


def test_query_params_go_out_as_httpx_writes_them_however_often_a_url_recurs(
    ports: list[Port],
) -> None:
    def query(path: str, params: dict[str, Any]) -> str:
        reply = system.ask(HttpRequest(service="api", path=path, params=params))
        return str(reply.json()["query"])

    with pool(api={"base_urls": [ports[0].url]}) as system:
        for _ in range(2):  # the second time from the pool's parsed URLs
            assert query("/query", {"a": True}) == "a=true"
            assert query("/query", {"a": 1}) == "a=1"  # equal to True, not the same query
            assert query("/query", {"a": 1.0}) == "a=1.0"
            assert query("/query", {"a": None, "b": "x y"}) == "a=&b=x+y"
            assert query("/query", {"a": ["x", "y"]}) == "a=x&a=y"


def test_a_cookie_set_for_one_caller_never_goes_out_with_another_s_call(
    ports: list[Port],
) -> None:
    with pool(api={"base_urls": [ports[0].url]}) as system:
        reply = system.ask(HttpRequest(service="api", path="/cookie", params={"value": "alice"}))
        assert "session=alice" in reply.headers["set-cookie"]
        echoed = system.ask(HttpRequest(service="api", path="/echo")).json()
        assert "Cookie" not in echoed["headers"]
        given = {"Cookie": "session=bob"}  # a caller may still send its own
        echoed = system.ask(HttpRequest(service="api", path="/echo", headers=given)).json()
        assert echoed["headers"]["Cookie"] == "session=bob"


def test_a_hundred_calls_are_in_flight_at_once(ports: list[Port]) -> None:
    async def hundred(system: System, path: str, params: dict[str, Any]) -> list[int]:
        calls = [
            system.ask_async(HttpRequest(service="api", path=path, params=params))
            for _ in range(100)
        ]
        return [reply.status for reply in await asyncio.gather(*calls)]

    with pool(api={"base_urls": [ports[0].url]}) as system:
        # The server holds every call until all 100 have arrived: they can only pass together.
        assert asyncio.run(hundred(system, "/barrier", {"key": key(), "n": 100})) == [200] * 100
    assert ports[0].max_in_flight == 100


def test_the_mailbox_answers_while_calls_wait(ports: list[Port]) -> None:
    async def scenario(system: System) -> tuple[int, list[int]]:
        slow = [
            asyncio.ensure_future(
                system.ask_async(HttpRequest(service="api", path="/slow", params={"ms": 600}))
            )
            for _ in range(20)
        ]
        await asyncio.to_thread(wait_until, lambda: ports[0].in_flight == 20)
        stats = await system.ask_async(PoolStats(service="api"))
        return stats.services["api"]["in_flight"], [r.status for r in await asyncio.gather(*slow)]

    with pool(api={"base_urls": [ports[0].url]}) as system:
        in_flight, statuses = asyncio.run(scenario(system))
    assert in_flight == 20
    assert statuses == [200] * 20


# -- retries --------------------------------------------------------------------------------


def test_retry_delays_by_policy() -> None:
    def options(backoff: str, jitter: float = 0.0) -> ServiceOptions:
        return ServiceOptions(
            base_urls=["http://x"],
            retry_backoff=backoff,  # type: ignore[arg-type]
            retry_delay=0.1,
            retry_max_delay=0.5,
            retry_jitter=jitter,
        )

    exponential = [retry_delay(options("exponential"), n) for n in range(1, 6)]
    assert exponential == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert [retry_delay(options("linear"), n) for n in (1, 2, 3)] == pytest.approx([0.1, 0.2, 0.3])
    assert [retry_delay(options("fixed"), n) for n in (1, 5)] == pytest.approx([0.1, 0.1])
    jittered = options("exponential", jitter=0.5)
    assert retry_delay(jittered, 2, rand=lambda: 1.0) == pytest.approx(0.1)
    assert retry_delay(jittered, 2, rand=lambda: 0.0) == pytest.approx(0.2)


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_idempotent_calls_are_retried_with_growing_spacing(ports: list[Port]) -> None:
    service = {"base_urls": [ports[0].url], "retry_delay": 0.05, "retry_jitter": 0.0}
    with pool(api=service) as system:
        k = key()
        reply = system.ask(HttpRequest(service="api", path="/flaky", params={"key": k, "fail": 2}))
        stats = system.ask(PoolStats(service="api")).services["api"]
    assert (reply.status, reply.attempts, reply.json()) == (200, 3, {"calls": 3})
    first, second, third = ports[0].paths(f"/flaky?key={k}")
    assert second - first >= 0.05 and third - second >= 0.1  # exponential: 0.05, then 0.1
    assert stats["retries"] == 2 and stats["attempts"] == 3 and stats["requests"] == 1


def test_retries_stop_at_max_attempts_and_return_the_last_response(ports: list[Port]) -> None:
    with pool(api={"base_urls": [ports[0].url], "retry_attempts": 2, **FAST_RETRIES}) as system:
        k = key()
        reply = system.ask(HttpRequest(service="api", path="/flaky", params={"key": k, "fail": 5}))
    assert (reply.status, reply.attempts) == (503, 2)


def test_retry_after_is_honoured(ports: list[Port]) -> None:
    with pool(api={"base_urls": [ports[0].url], **FAST_RETRIES}) as system:
        k = key()
        params = {"key": k, "fail": 1, "status": 429, "retry_after": 1}
        reply = system.ask(HttpRequest(service="api", path="/flaky", params=params))
        assert (reply.status, reply.attempts) == (200, 2)
        first, second = ports[0].paths(f"/flaky?key={k}")
        assert second - first >= 1.0
        # A Retry-After past the retry budget ends the call with the response in hand.
        k = key()
        params = {"key": k, "fail": 1, "status": 503, "retry_after": 3600}
        reply = system.ask(HttpRequest(service="api", path="/flaky", params=params))
        assert (reply.status, reply.attempts, reply.headers["retry-after"]) == (503, 1, "3600")


def test_post_is_not_retried_unless_it_has_an_idempotency_key(ports: list[Port]) -> None:
    with pool(api={"base_urls": [ports[0].url], **FAST_RETRIES}) as system:
        k = key()
        params = {"key": k, "fail": 1}
        reply = system.ask(HttpRequest(service="api", method="POST", path="/flaky", params=params))
        assert (reply.status, reply.attempts) == (503, 1)
        assert len(ports[0].paths(f"/flaky?key={k}")) == 1
        k = key()
        reply = system.ask(
            HttpRequest(
                service="api",
                method="POST",
                path="/flaky",
                params={"key": k, "fail": 1},
                idempotency_key="order-7",
            )
        )
        assert (reply.status, reply.attempts) == (200, 2)
        assert ports[0].headers[-1]["Idempotency-Key"] == "order-7"


def test_client_errors_are_not_retried(ports: list[Port]) -> None:
    with pool(api={"base_urls": [ports[0].url], **FAST_RETRIES}) as system:
        k = key()
        params = {"key": k, "fail": 1, "status": 409}
        reply = system.ask(HttpRequest(service="api", path="/flaky", params=params))
    assert (reply.status, reply.attempts) == (409, 1)


def test_a_service_that_is_down_gives_backend_unavailable(ports: list[Port]) -> None:
    with pool(down={"base_urls": [down_url()], **FAST_RETRIES}) as system:
        with pytest.raises(BackendUnavailable) as caught:
            system.ask(HttpRequest(service="down", path="/ok"))
        stats = system.ask(PoolStats(service="down")).services["down"]
    assert "'down'" in str(caught.value)
    assert caught.value.details["attempts"] == 3
    assert stats["errors"] == {"connect": 1} and stats["retries"] == 2


# -- circuit breaker ------------------------------------------------------------------------


def test_breaker_opens_fails_fast_then_half_opens_and_closes(ports: list[Port]) -> None:
    service = {
        "base_urls": [ports[0].url],
        "breaker_threshold": 2,
        "breaker_open_seconds": 0.3,
        "retry_attempts": 1,
    }
    clock = ManualClock()
    with pool(clock, api=service) as system:
        for _ in range(2):
            assert system.ask(HttpRequest(service="api", path="/status/500")).status == 500
        seen = len(ports[0].hits)
        with pytest.raises(BackendUnavailable, match="'api' unavailable: circuit breaker open"):
            system.ask(HttpRequest(service="api", path="/ok"))
        assert len(ports[0].hits) == seen  # failed at once, never sent
        health = system.ask(HealthCheck(target="pool"))
        assert health.status == "unhealthy"
        assert health.details["api"]["urls"][ports[0].url]["breaker"] == "open"
        clock.advance(0.35)

        # Half-open: one probe at a time; a second call meanwhile fails at once.
        async def probe_and_second() -> tuple[int, BaseException | None]:
            probe = asyncio.ensure_future(
                system.ask_async(HttpRequest(service="api", path="/slow", params={"ms": 300}))
            )
            await asyncio.to_thread(wait_until, lambda: ports[0].in_flight == 1)
            try:
                await system.ask_async(HttpRequest(service="api", path="/ok"))
                second = None
            except BackendUnavailable as exc:
                second = exc
            return (await probe).status, second

        status, second = asyncio.run(probe_and_second())
        assert status == 200 and isinstance(second, BackendUnavailable)
        assert system.ask(HttpRequest(service="api", path="/ok")).status == 200
        stats = system.ask(PoolStats(service="api")).services["api"]
        assert stats["breakers"] == {ports[0].url: "closed"}
        assert stats["breaker_transitions"] == 3  # open, half_open, closed
        assert stats["errors"]["breaker_open"] == 2


def test_breaker_transitions_are_published_as_events(ports: list[Port]) -> None:
    service = {"base_urls": [ports[0].url], "breaker_threshold": 2, "retry_attempts": 1,
               "breaker_open_seconds": 0.2}  # fmt: skip
    with pool(api=service) as system, system.subscribe("pool.breaker.*") as breakers:
        for _ in range(2):
            system.ask(HttpRequest(service="api", path="/status/500"))

        def answered() -> bool:
            try:
                return system.ask(HttpRequest(service="api", path="/ok")).status == 200
            except BackendUnavailable:  # open: failing fast until the cool-down is over
                return False

        wait_until(answered)
        changes: list[tuple[str, str, str, int]] = []
        while len(changes) < 3 and (delivery := breakers.get(timeout=5)) is not None:
            event = delivery.message
            assert isinstance(event, PoolBreakerChanged) and delivery.topic == "pool.breaker.api"
            changes.append((event.url, event.old, event.new, event.failures))
        assert changes == [
            (ports[0].url, "closed", "open", 2),
            (ports[0].url, "open", "half_open", 2),
            (ports[0].url, "half_open", "closed", 0),
        ]


def test_an_open_breaker_is_not_retried(ports: list[Port]) -> None:
    service = {"base_urls": [ports[0].url], "breaker_threshold": 1, **FAST_RETRIES}
    with pool(api=service) as system:
        reply = system.ask(HttpRequest(service="api", path="/status/503"))
    assert (reply.status, reply.attempts) == (503, 1)  # the failure opened it: no retry


# -- load balancing and failover ------------------------------------------------------------


def test_round_robin_across_base_urls(ports: list[Port]) -> None:
    with pool(api={"base_urls": [ports[0].url, ports[1].url]}) as system:
        urls = [system.ask(HttpRequest(service="api", path="/ok")).url for _ in range(4)]
    assert urls == [ports[0].url, ports[1].url, ports[0].url, ports[1].url]


def test_least_outstanding_avoids_the_busy_url(ports: list[Port]) -> None:
    async def scenario(system: System) -> list[str]:
        busy = asyncio.ensure_future(
            system.ask_async(HttpRequest(service="api", path="/slow", params={"ms": 500}))
        )
        await asyncio.to_thread(wait_until, lambda: ports[0].in_flight == 1)
        quick = [(await system.ask_async(HttpRequest(service="api", path="/ok"))).url]
        quick.append((await system.ask_async(HttpRequest(service="api", path="/ok"))).url)
        await busy
        return quick

    service = {"base_urls": [ports[0].url, ports[1].url], "balance": "least_outstanding"}
    with pool(api=service) as system:
        assert asyncio.run(scenario(system)) == [ports[1].url, ports[1].url]


def test_failover_to_a_live_url_then_the_dead_one_is_skipped(ports: list[Port]) -> None:
    dead = down_url()
    service = {"base_urls": [dead, ports[0].url], "breaker_threshold": 1, **FAST_RETRIES}
    with pool(api=service) as system:
        first = system.ask(HttpRequest(service="api", path="/ok"))
        assert (first.url, first.attempts) == (ports[0].url, 2)
        later = [system.ask(HttpRequest(service="api", path="/ok")) for _ in range(3)]
        assert [(r.url, r.attempts) for r in later] == [(ports[0].url, 1)] * 3
        health = system.ask(HealthCheck(target="pool"))
    assert health.status == "degraded"
    assert health.dependencies == {"api": "degraded"}
    assert health.details["api"]["urls"][dead]["breaker"] == "open"


# -- health probes --------------------------------------------------------------------------


def test_health_probes_flip_status_and_steer_calls(ports: list[Port]) -> None:
    a, b = ports[0], ports[1]
    service = {"base_urls": [a.url, b.url], "health_path": "/health", "health_interval": 0.05}

    def pool_health(system: System) -> Any:
        return system.ask(HealthCheck(target="pool"))

    with pool(api=service) as system:
        wait_until(lambda: pool_health(system).details["api"]["urls"][a.url]["probe"] == "healthy")
        assert pool_health(system).status == "healthy"
        a.healthy = False
        wait_until(lambda: pool_health(system).status == "degraded")
        assert pool_health(system).details["api"]["urls"][a.url]["probe"] == "unhealthy"
        urls = {system.ask(HttpRequest(service="api", path="/ok")).url for _ in range(4)}
        assert urls == {b.url}
        b.healthy = False
        wait_until(lambda: pool_health(system).status == "unhealthy")
        with pytest.raises(BackendUnavailable, match="no healthy base URL"):
            system.ask(HttpRequest(service="api", path="/ok"))
        a.healthy = b.healthy = True
        wait_until(lambda: pool_health(system).status == "healthy")
        assert system.ask(HttpRequest(service="api", path="/ok")).status == 200


# -- limits, timeouts, sizes ----------------------------------------------------------------


def test_never_more_connections_than_configured(ports: list[Port]) -> None:
    async def thirty(system: System) -> list[int]:
        calls = [
            system.ask_async(HttpRequest(service="api", path="/slow", params={"ms": 30}))
            for _ in range(30)
        ]
        return [reply.status for reply in await asyncio.gather(*calls)]

    with pool(api={"base_urls": [ports[0].url], "max_connections": 3}) as system:
        assert asyncio.run(thirty(system)) == [200] * 30
        stats = system.ask(PoolStats(service="api")).services["api"]
    assert ports[0].max_in_flight == 3
    assert len({peer for _, _, peer in ports[0].hits}) <= 3
    assert stats["connections_in_use"] + stats["connections_idle"] <= 3


def test_timeouts_give_timeout(ports: list[Port]) -> None:
    with pool(api={"base_urls": [ports[0].url], "read_timeout": 0.2}) as system:
        with pytest.raises(Timeout, match="'api'"):
            system.ask(HttpRequest(service="api", path="/slow", params={"ms": 1000}))
        with pytest.raises(Timeout):
            system.ask(HttpRequest(service="api", path="/slow", params={"ms": 1000}, timeout=0.1))
        assert system.ask(HttpRequest(service="api", path="/slow", params={"ms": 1})).status == 200


def test_oversized_responses_are_refused(ports: list[Port]) -> None:
    with pool(api={"base_urls": [ports[0].url], "max_response_bytes": 4000}) as system:
        assert (
            len(system.ask(HttpRequest(service="api", path="/big", params={"size": 4000})).body)
            == 4000
        )
        with pytest.raises(RequestError, match="exceeds 4000") as caught:
            system.ask(HttpRequest(service="api", path="/big", params={"size": 4001}))
        assert caught.value.details["max_response_bytes"] == 4000
        with pytest.raises(RequestError, match="exceeds 4000"):  # no Content-Length: counted
            system.ask(HttpRequest(service="api", path="/big_chunked", params={"chunks": 5}))
        assert system.ask(HttpRequest(service="api", path="/ok")).status == 200


# -- JSON-RPC -------------------------------------------------------------------------------


def test_json_rpc_results_and_errors(ports: list[Port]) -> None:
    with pool(odoo={"base_urls": [ports[0].url]}) as system:
        assert system.ask(JsonRpcCall(service="odoo", method="add", params=[1, 2, 3])).result == 6
        with pytest.raises(NotFound) as missing:
            system.ask(JsonRpcCall(service="odoo", method="nope", params={}))
        assert missing.value.details["remote_code"] == -32601
        with pytest.raises(Unauthorized) as denied:
            system.ask(JsonRpcCall(service="odoo", method="secret"))
        assert denied.value.details["remote_message"] == "Odoo Server Error"
        with pytest.raises(BackendUnavailable, match="without a JSON-RPC body"):
            system.ask(JsonRpcCall(service="odoo", method="crash"))


# -- bad input and bad config ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "path"),
    [
        (HttpRequest(service="nope"), "service"),
        (HttpRequest(service="api", path="ok"), "path"),
        (HttpRequest(service="api", path="/a?b=1"), "path"),
        (HttpRequest(service="api", method="POST", json={"raw": b"\x00"}), "json"),
        (HttpRequest(service="api", method="POST", json={"n": float("nan")}), "json"),
        (HttpRequest(service="api", method="POST", json=[1], body=b"1"), "body"),
        (HttpRequest(service="api", params={"a": {"b": 1}}), "params.a"),
        (HttpRequest(service="api", headers={"X-A": "1\r\nX-B: 2"}), "headers.X-A"),
        (HttpRequest(service="api", timeout=0.0), "timeout"),
        (JsonRpcCall(service="api", method="add", params="1"), "params"),
    ],
)
def test_bad_requests_are_refused_clearly(
    ports: list[Port], request_: Request[Any], path: str
) -> None:
    with pool(api={"base_urls": [ports[0].url]}) as system:
        with pytest.raises(InvalidMessage) as caught:
            system.ask(request_)
        assert caught.value.path == path
        assert system.ask(HttpRequest(service="api", path="/ok")).status == 200


@pytest.mark.parametrize(
    ("service", "error"),
    [
        ({}, 'services.api.base_urls: needs at least one URL (or discovery = "registry")'),
        ({"base_urls": []}, "services.api.base_urls: needs at least one URL"),
        ({"base_urls": ["ftp://x"]}, "services.api.base_urls[0]: expected an http"),
        ({"base_urls": ["http://x"], "colour": 1}, "services.api.colour: not an option"),
        ({"base_urls": ["http://x"], "max_connections": 0}, "max_connections: must be >= 1"),
        ({"base_urls": ["http://x"], "health_path": "h"}, "health_path: must start with '/'"),
    ],
)
def test_bad_service_config_is_named(service: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_options(PoolOptions, {"services": {"api": service}}, manager="pool")


def test_statistics_in_health_metrics(ports: list[Port]) -> None:
    with pool(api={"base_urls": [ports[0].url]}) as system:
        for _ in range(3):
            system.ask(HttpRequest(service="api", path="/ok"))
        metrics = system.ask(HealthCheck(target="pool")).metrics
    assert metrics["api.requests"] == 3
    assert metrics["api.responses.2xx"] == 3
    assert metrics["api.latency_ms.p99"] > 0
    assert metrics["api.max_connections"] == 100


# -- stopping and crashing ------------------------------------------------------------------


@message("test.pool_boom")
class PoolBoom(Request[HttpResponse]):
    manager = "pool"


class Impatient(PoolManager):
    """Gives calls in flight no time at all when it stops; fails on the loop when told to."""

    stop_grace = 0.0

    @handles(PoolBoom)
    def boom(self, _msg: PoolBoom) -> None:
        self._reply_later(_fail_on_the_loop())


class Watched(PoolManager):
    """Says when it starts to stop."""

    stopping = threading.Event()

    def on_stop(self) -> None:
        Watched.stopping.set()
        super().on_stop()


async def _fail_on_the_loop() -> HttpResponse:
    raise ValueError("a bug on the loop")


def _system(manager: type[PoolManager], ports: list[Port]) -> System:
    options = {"services": {"api": {"base_urls": [ports[0].url]}}}
    config = Config().replace(managers={"pool": ManagerSection(options=options)})
    return System(config, managers=[manager]).start()


def test_calls_in_flight_finish_when_the_manager_stops(backend: Backend, ports: list[Port]) -> None:
    Watched.stopping.clear()
    system = _system(Watched, ports)
    hold = key()
    with ThreadPoolExecutor(2) as executor:
        call = executor.submit(
            system.ask, HttpRequest(service="api", path="/hold", params={"key": hold})
        )
        wait_until(lambda: ports[0].in_flight == 1)
        stopped = executor.submit(system.stop)
        assert Watched.stopping.wait(5)
        backend.release(hold)
        assert call.result().status == 200
        stopped.result()


def test_calls_in_flight_past_the_grace_get_manager_unavailable(
    backend: Backend, ports: list[Port]
) -> None:
    system = _system(Impatient, ports)
    hold = key()
    try:
        with ThreadPoolExecutor(1) as executor:
            call = executor.submit(
                system.ask, HttpRequest(service="api", path="/hold", params={"key": hold})
            )
            wait_until(lambda: ports[0].in_flight == 1)
            system.stop()
            with pytest.raises(ManagerUnavailable, match="stopped before the call completed"):
                call.result()
    finally:
        backend.release(hold)
        wait_until(lambda: ports[0].in_flight == 0)


def test_a_bug_on_the_loop_answers_the_caller_and_restarts_the_manager(ports: list[Port]) -> None:
    system = _system(Impatient, ports)
    try:
        with pytest.raises(ManagerUnavailable, match="ValueError: a bug on the loop"):
            system.ask(PoolBoom())
        wait_until(lambda: system.health().managers["pool"].restarts == 1)
        assert system.ask(HttpRequest(service="api", path="/ok")).status == 200
    finally:
        system.stop()


def test_a_daemon_probing_its_services_logs_no_request_lines_and_stops_cleanly(
    backend: Backend, ports: list[Port], tmp_path: Path, transport: str
) -> None:
    path = tmp_path / "corral.toml"
    hold = key()
    path.write_text(
        "[managers.pool.services.web]\n"
        f'base_urls = ["{ports[0].url}", "{ports[1].url}"]\n'
        f'health_path = "/health"\nhealth_interval = 0.05\ntransport = "{transport}"\n'
        "[managers.pool.services.stuck]\n"  # its probe is still waiting when the daemon stops
        f'base_urls = ["{ports[2].url}"]\nhealth_path = "/hold?key={hold}"\nhealth_timeout = 30\n'
        f'transport = "{transport}"\n'
    )
    process = start_corral("run", "-c", str(path))
    try:
        log = read_until(process, "running 2 managers")
        wait_until(lambda: len(ports[0].paths("/health")) >= 5 and ports[2].in_flight == 1)
        process.send_signal(signal.SIGTERM)
        log += process.communicate(timeout=30)[1]
    finally:
        process.kill()
        process.wait()
        backend.release(hold)
    assert process.returncode == 0, log
    assert "stopped cleanly" in log
    assert "HTTP Request:" not in log  # httpx's INFO line for every call and probe
    assert "Task was destroyed" not in log
