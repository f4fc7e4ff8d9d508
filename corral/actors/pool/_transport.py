"""An httpx transport over aiohttp's client: the pool's API stays httpx, its HTTP/1.1 is aiohttp's.

httpx's own transport (httpcore) spends about 3 ms of CPU per request under
concurrency, which made 100 concurrent 50 ms calls take 300 ms or more; aiohttp's
client does the same work in a fraction of that (``bench/pool.py``). The pool's
services use this transport unless ``transport = "httpx"`` or ``http2 = true``::

    transport = AiohttpTransport(httpx.Limits(max_connections=100, max_keepalive_connections=20))
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get("http://127.0.0.1:8000/ok")

What httpx promises holds: at most ``max_connections`` requests in flight, each waiting
at most the request's ``pool`` timeout for its turn (``httpx.PoolTimeout``), then
``connect`` to connect (``httpx.ConnectTimeout``) and ``read`` between reads
(``httpx.ReadTimeout``); refused or failed connections are ``httpx.ConnectError``, a
connection lost mid-response ``httpx.ReadError``, anything else aiohttp refuses
``httpx.RemoteProtocolError``. The body is streamed as it comes, still encoded (httpx
decodes it); aiohttp keeps no cookies, follows no redirects and reads no proxy settings
(httpx does all of that, or not, itself). Keep-alive connections expire after
``keepalive_expiry``; with ``max_keepalive_connections = 0`` none is kept, any other
number keeps up to ``max_connections`` idle. aiohttp has no write timeout: ``write``
goes unused.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import aiohttp
import httpx
from yarl import URL

__all__ = ["AiohttpTransport"]


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx's requests with one ``aiohttp.ClientSession`` (see the module docstring)."""

    def __init__(self, limits: httpx.Limits, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls or httpx.create_ssl_context(trust_env=False)  # what httpx verifies with
        self.max_connections = limits.max_connections or 100
        self._keepalive = (limits.max_keepalive_connections or 0) > 0 and bool(
            limits.keepalive_expiry
        )
        self._keepalive_expiry = limits.keepalive_expiry or 0.0
        self._turns = asyncio.Semaphore(self.max_connections)
        self._session: aiohttp.ClientSession | None = None
        self.in_flight = 0
        """Requests sent whose response is not closed yet: each holds a connection."""

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on the loop that sends, on first use
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                limit_per_host=0,
                force_close=not self._keepalive,
                keepalive_timeout=self._keepalive_expiry if self._keepalive else None,
                ssl=self._tls,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
            )
        return self._session

    def idle_connections(self) -> int:
        """Keep-alive connections waiting for a request (read from aiohttp's connector)."""
        if self._session is None:
            return 0
        idle = getattr(self._session.connector, "_conns", {})
        return sum(len(connections) for connections in idle.values())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        if not self._turns.locked():
            await self._turns.acquire()  # at once
        else:
            try:
                await asyncio.wait_for(self._turns.acquire(), timeouts.get("pool"))
            except TimeoutError:
                raise httpx.PoolTimeout(
                    f"no free connection in {timeouts.get('pool')} s "
                    f"(max_connections = {self.max_connections})"
                ) from None
        self.in_flight += 1
        try:
            response = await self._client().request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=[
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
                ],
                data=await request.aread() or None,
                allow_redirects=False,
                server_hostname=request.extensions.get("sni_hostname"),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=timeouts.get("connect"),
                    sock_read=timeouts.get("read"),
                ),
            )
        except BaseException as exc:
            self._done()
            _raise_as_httpx(exc, while_reading=False)
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_Body(response, self._done),
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode(),
            },
        )

    def _done(self) -> None:
        self.in_flight -= 1
        self._turns.release()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Body(httpx.AsyncByteStream):
    """A response body as aiohttp reads it; closing it gives the connection back."""

    def __init__(self, response: aiohttp.ClientResponse, done: Callable[[], None]) -> None:
        self.response = response
        self.done = done
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.content.iter_any():
                yield chunk
        except BaseException as exc:
            _raise_as_httpx(exc, while_reading=True)

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.response.release()  # back to the pool when read to its end, else closed
            self.done()


def _raise_as_httpx(exc: BaseException, *, while_reading: bool) -> NoReturn:
    """Raise the httpx exception for what aiohttp (or asyncio) raised; others as they are."""
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
        connecting = isinstance(exc, aiohttp.ConnectionTimeoutError)
        if connecting and not while_reading:
            raise httpx.ConnectTimeout(str(exc) or "connect timeout") from exc
        raise httpx.ReadTimeout(str(exc) or "read timeout") from exc
    if isinstance(exc, aiohttp.ClientConnectorError) and not while_reading:
        raise httpx.ConnectError(str(exc)) from exc
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | OSError):
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
    if isinstance(exc, aiohttp.ClientError):
        raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}") from exc
    raise exc
