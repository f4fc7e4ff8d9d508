"""The pool's httpx transport over aiohttp keeps httpx's promises (a local aiohttp server)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web

from corral.actors.pool._transport import AiohttpTransport

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "0.5")))
    return web.Response(text="slow")


async def _echo(request: web.Request) -> web.Response:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return web.json_response(
        {
            "method": request.method,
            "query": request.query_string,
            "raw_path": request.raw_path,
            "body": (await request.read()).decode(),
            "cookie": request.headers.getall("Cookie", []),
            "port": peer[1] if peer else None,
        }
    )


async def _gzipped(_request: web.Request) -> web.Response:
    return web.Response(body=gzip.compress(b"zipped " * 100), headers={"Content-Encoding": "gzip"})


async def _cut_short(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Length": "1000"})
    await response.prepare(request)
    await response.write(b"x" * 10)
    assert request.transport is not None
    request.transport.close()  # 990 bytes short
    return response


async def _redirect(_request: web.Request) -> web.Response:
    raise web.HTTPFound("/echo")


async def _cookie(_request: web.Request) -> web.Response:
    response = web.Response(text="set")
    response.set_cookie("flavour", "oat")
    return response


ROUTES: dict[str, Handler] = {
    "/slow": _slow,
    "/echo": _echo,
    "/gzipped": _gzipped,
    "/cut": _cut_short,
    "/redirect": _redirect,
    "/cookie": _cookie,
}


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[str]:
    """The routes above on a free loopback port; yields the base URL."""
    app = web.Application()
    for path, handler in ROUTES.items():
        app.router.add_route("*", path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def client(**limits: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=AiohttpTransport(httpx.Limits(**limits)))


def served(test: Callable[[str], Awaitable[None]]) -> Callable[[], None]:
    """A test run on its own event loop, given the URL of a fresh server."""

    def run() -> None:
        async def main() -> None:
            async with serving() as url:
                await test(url)

        asyncio.run(main())

    run.__name__ = test.__name__
    return run


@served
async def test_requests_answers_and_bodies_go_through(url: str) -> None:
    async with client() as http:
        response = await http.post(f"{url}/echo?q=a%20b&x=%2F", content=b"hello")
        assert response.status_code == 200
        assert response.json()["raw_path"] == "/echo?q=a%20b&x=%2F"  # sent as encoded
        assert response.json()["body"] == "hello"
        assert response.http_version == "HTTP/1.1"
        zipped = await http.get(f"{url}/gzipped")
        assert zipped.text == "zipped " * 100  # httpx decodes what aiohttp left encoded
        redirect = await http.get(f"{url}/redirect")
        assert redirect.status_code == 302  # httpx decides on redirects, aiohttp follows none


@served
async def test_cookies_are_httpx_s_alone(url: str) -> None:
    async with client() as http:
        await http.get(f"{url}/cookie")
        assert (await http.get(f"{url}/echo")).json()["cookie"] == ["flavour=oat"]  # once


@served
async def test_connections_are_kept_alive_unless_none_may_be(url: str) -> None:
    async with client(max_keepalive_connections=5) as http:
        ports = {(await http.get(f"{url}/echo")).json()["port"] for _ in range(3)}
        assert len(ports) == 1
        transport = http._transport
        assert isinstance(transport, AiohttpTransport)
        assert (transport.in_flight, transport.idle_connections()) == (0, 1)
    async with client(max_keepalive_connections=0) as http:
        ports = {(await http.get(f"{url}/echo")).json()["port"] for _ in range(3)}
        assert len(ports) == 3


@served
async def test_a_full_pool_gives_pool_timeout(url: str) -> None:
    async with client(max_connections=1) as http:
        holder = asyncio.create_task(http.get(f"{url}/slow", params={"s": "0.5"}))
        await asyncio.sleep(0.1)
        with pytest.raises(httpx.PoolTimeout):
            await http.get(f"{url}/echo", timeout=httpx.Timeout(5.0, pool=0.05))
        assert (await holder).status_code == 200
        assert (await http.get(f"{url}/echo")).status_code == 200  # the turn came back


@served
async def test_timeouts_and_failures_are_httpx_s(url: str) -> None:
    async with client() as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"{url}/slow", params={"s": "1"}, timeout=httpx.Timeout(5.0, read=0.05))
        with pytest.raises(httpx.ReadError):
            await http.get(f"{url}/cut")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            nobody = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(httpx.ConnectError):
            await http.get(nobody)
        transport = http._transport
        assert isinstance(transport, AiohttpTransport)
        assert transport.in_flight == 0  # every failure gave its turn back
        assert (await http.get(f"{url}/echo")).status_code == 200
