"""One external service as the pool's event loop sees it: base URLs, client, retries, probes.

Everything here runs on the pool's asyncio loop thread, and only there, so it
needs no locks::

    service = Service(
        "billing", options, latency_window=1000, metrics=ManagerMetrics(), clock=SystemClock()
    )
    await service.start()
    response = await service.request(Call(method="GET", path="/invoices", idempotent=True))
    await service.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from corral._breaker import BreakerState, CircuitBreaker
from corral._redis import REDIS_ERRORS, AsyncRedis, connect_async
from corral.actors.pool._discovery import Instance, registered, resolve
from corral.actors.pool._metrics import (
    ATTEMPTS,
    BREAKER_STATE,
    BREAKER_STATES,
    BREAKER_TRANSITIONS,
    CALL_SECONDS,
    CONNECTIONS,
    ERRORS,
    IN_FLIGHT,
    MAX_CONNECTIONS,
    REQUESTS,
    RESPONSES,
    RETRIES,
)
from corral.actors.pool._options import ServiceOptions
from corral.actors.pool._policy import parse_retry_after, retry_delay
from corral.actors.pool._transport import AiohttpTransport
from corral.clock import Clock
from corral.errors import BackendUnavailable, RequestError, Timeout
from corral.messages.pool import HttpResponse, PoolBreakerChanged
from corral.messages.system import HealthStatus
from corral.metrics import Counter, ManagerMetrics

__all__ = ["Call", "Endpoint", "Service"]

log = logging.getLogger(__name__)

_parsed_url = functools.lru_cache(maxsize=1024)(httpx.URL)
"""An endpoint's URL with a call's path, parsed once: httpx parses a URL given as text
on every request."""


def _url_of(url: str, params: dict[str, Any]) -> httpx.URL:
    """``url`` (an endpoint's with a call's path) with ``params`` merged into its query, as
    httpx would merge them, the recent ones parsed once (httpx parses the whole URL again
    to merge them, on every request)."""
    if not params:
        return _parsed_url(url)
    try:
        # The values' types are in the key: True and 1 are equal, but not in a query.
        return _url_with_params(url, tuple((k, type(v), v) for k, v in params.items()))
    except TypeError:  # a list of values: not hashable
        return _parsed_url(url).copy_merge_params(params)


@functools.lru_cache(maxsize=1024)
def _url_with_params(url: str, params: tuple[tuple[str, type, Any], ...]) -> httpx.URL:
    return _parsed_url(url).copy_merge_params({k: v for k, _, v in params})


class _NoCookies(httpx.Cookies):
    """A service's cookie jar, which keeps nothing.

    A service's client is shared by every caller of the pool: a cookie set in the
    response to one caller must not go out with the requests of the others. (It also
    spares each response httpx's cookie extraction.)
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


ProbeStatus = Literal["unknown", "healthy", "unhealthy"]


@dataclass(frozen=True, slots=True)
class Call:
    """A checked request, ready to send: the path joins each base URL."""

    method: str
    path: str
    idempotent: bool
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    timeout: float | None = None


class Endpoint:
    """One instance of a service: its breaker, probe status and calls in flight."""

    def __init__(
        self,
        instance: Instance,
        options: ServiceOptions,
        on_transition: Callable[[Endpoint, BreakerState, BreakerState], None],
        clock: Clock,
    ) -> None:
        self.url = instance.url.rstrip("/")
        self.host = instance.host
        self.server_name = instance.server_name
        self.prober: asyncio.Task[None] | None = None
        self.breaker = CircuitBreaker(
            options.breaker_threshold,
            options.breaker_open_seconds,
            probes=options.breaker_probes,
            on_transition=lambda old, new: on_transition(self, old, new),
            clock=clock.monotonic,
        )
        self.outstanding = 0
        self.requests = 0
        self.probe: ProbeStatus = "unknown"
        self.probe_error = ""

    def headers(self, given: dict[str, str] | None = None) -> dict[str, str]:
        """A call's headers, with the name this instance's address stands for as ``Host``."""
        return {**(given or {}), "Host": self.host} if self.host else dict(given or {})

    def extensions(self) -> dict[str, Any] | None:
        """The TLS server name of an instance reached at an address found for a name."""
        return {"sni_hostname": self.server_name} if self.server_name else None

    @property
    def up(self) -> bool:
        return self.breaker.state != "open" and self.probe != "unhealthy"

    def details(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "breaker": self.breaker.state,
            "probe": self.probe,
            "outstanding": self.outstanding,
            "requests": self.requests,
            "consecutive_failures": self.breaker.failures,
        }
        if self.probe_error:
            found["probe_error"] = self.probe_error
        return found


class _Failed(Exception):
    """An attempt that got no response: ``kind`` names the error class in the statistics."""

    def __init__(self, kind: str, cause: Exception, *, retryable: bool) -> None:
        super().__init__(f"{kind}: {type(cause).__name__}: {cause}")
        self.kind = kind
        self.cause = cause
        self.retryable = retryable


class _TooLarge(Exception):
    pass


class Service:
    """A named service: one ``httpx.AsyncClient`` (one pool, shared by its base URLs).

    It counts in ``metrics``, its manager's store (kept across restarts); ``latencies``
    keeps the last ``latency_window`` calls' times, for the percentiles of ``stats()``.
    """

    def __init__(
        self,
        name: str,
        options: ServiceOptions,
        *,
        latency_window: int,
        metrics: ManagerMetrics,
        clock: Clock,
        registry: tuple[str, str] | None = None,
        on_breaker: Callable[[PoolBreakerChanged], None] = lambda _event: None,
    ) -> None:
        self.name = name
        self.options = options
        self.metrics = metrics
        self.clock = clock
        self.on_breaker = on_breaker
        """Told of every breaker transition (the manager publishes them)."""
        self.registry = registry
        """The Redis URL and key of the announced instances (``discovery = "registry"``)."""
        self._redis: AsyncRedis | None = None
        self.discovery_error = ""
        self._rotation = 0
        self._client: httpx.AsyncClient | None = None
        self._aiohttp: AiohttpTransport | None = None
        """The client's transport, unless it is httpx's own."""
        self._discoverer: asyncio.Task[None] | None = None
        self.endpoints: list[Endpoint] = []
        if options.discovery == "static":
            self._use([Instance(url) for url in options.base_urls])
        self.latencies: deque[float] = deque(maxlen=latency_window)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        options = self.options
        auth: httpx.Auth | None = None
        if options.username:
            auth = httpx.BasicAuth(options.username, options.password)
        headers = dict(options.headers)
        if options.bearer_token:
            headers["Authorization"] = f"Bearer {options.bearer_token}"
        limits = httpx.Limits(
            max_connections=options.max_connections,
            max_keepalive_connections=options.max_keepalive,
            keepalive_expiry=options.keepalive_expiry,
        )
        tls = options.ssl_context()
        if options.transport == "aiohttp" or (options.transport == "auto" and not options.http2):
            self._aiohttp = AiohttpTransport(limits, tls)
        self._client = httpx.AsyncClient(
            verify=tls,
            auth=auth,
            headers=headers,
            http2=options.http2,
            limits=limits,
            timeout=self._timeout(math.inf),
            trust_env=False,
            transport=self._aiohttp,
        )
        self._client._cookies = _NoCookies()  # httpx takes a jar, not a policy
        if options.discovery != "static":
            await self.discover()
            self._discoverer = asyncio.create_task(
                self._discover_forever(), name=f"discover {self.name}"
            )
        for endpoint in self.endpoints:
            self._start_probe(endpoint)

    async def close(self) -> None:
        tasks = [e.prober for e in self.endpoints if e.prober is not None]
        if self._discoverer is not None:
            tasks.append(self._discoverer)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    # -- discovery ------------------------------------------------------------------------

    async def discover(self) -> None:
        """Find the instances again; on failure keep those found last (and say why)."""
        options = self.options
        try:
            if self.registry is not None:
                url, key = self.registry
                if self._redis is None:
                    self._redis = connect_async(url, setting="managers.pool.redis_url")
                instances = await registered(self._redis, key)
            else:
                instances = await resolve(options.base_urls, options.dns_server)
        except REDIS_ERRORS as exc:  # Redis away, or no answer from DNS (an OSError)
            if not self.discovery_error:
                log.warning("pool: %s: discovery failed, keeping %d instances: %s",
                            self.name, len(self.endpoints), exc)  # fmt: skip
            self.discovery_error = f"{type(exc).__name__}: {exc}"
            self._count_error("discovery")
            return
        self.discovery_error = ""
        before = {e.url for e in self.endpoints}
        self._use(instances)
        after = {e.url for e in self.endpoints}
        if before != after:
            log.info("pool: %s instances: %s", self.name, ", ".join(sorted(after)) or "none")

    async def _discover_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.discovery_interval)
            await self.discover()

    def _use(self, instances: list[Instance]) -> None:
        """Make ``instances`` the endpoints, keeping the state of those already known."""
        known = {endpoint.url: endpoint for endpoint in self.endpoints}
        endpoints = []
        for instance in instances:
            endpoint = known.pop(instance.url.rstrip("/"), None)
            if endpoint is None:
                endpoint = Endpoint(instance, self.options, self._breaker_moved, self.clock)
                if self._client is not None:
                    self._start_probe(endpoint)
            endpoints.append(endpoint)
        for gone in known.values():
            if gone.prober is not None:
                gone.prober.cancel()
        self.endpoints = endpoints

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "Service.start() first"
        return self._client

    # -- calls ----------------------------------------------------------------------------

    async def request(self, call: Call) -> HttpResponse:
        """Send ``call`` with this service's retries and breakers; see the manager's docstring."""
        self.metrics.add(REQUESTS, self.name)
        started = time.monotonic()
        deadline = started + call.timeout if call.timeout is not None else math.inf
        retry_until = min(deadline, started + self.options.retry_max_time)
        attempt = 0
        avoid: Endpoint | None = None
        while True:
            attempt += 1
            endpoint = self._choose(avoid)
            if endpoint is None:
                self._count_error("breaker_open")
                raise self._unavailable(attempt)
            outcome: HttpResponse | _Failed
            try:
                outcome = await self._attempt(endpoint, call, deadline, attempt, started)
            except _Failed as failed:
                outcome = failed
            delay = self._retry_delay(call, outcome, attempt)
            if delay is None or time.monotonic() + delay > retry_until:
                return self._finish(outcome, attempt, started)
            # An open breaker is not retried: the next attempt needs a base URL to go to.
            if not any(e.breaker.available() and e.probe != "unhealthy" for e in self.endpoints):
                return self._finish(outcome, attempt, started)
            self.metrics.add(RETRIES, self.name)
            avoid = endpoint
            await asyncio.sleep(delay)

    async def _attempt(
        self, endpoint: Endpoint, call: Call, deadline: float, attempt: int, started: float
    ) -> HttpResponse:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            endpoint.breaker.record(None)
            raise self._timeout_error(call, "the call's timeout ran out", endpoint)
        self.metrics.add(ATTEMPTS, self.name)
        endpoint.requests += 1
        endpoint.outstanding += 1
        breaker_outcome: bool | None = False
        try:
            status, headers, body = await self._send(endpoint, call, remaining)
            breaker_outcome = status < 500
            return HttpResponse(
                status=status,
                headers=headers,
                body=body,
                elapsed=time.monotonic() - started,
                attempts=attempt,
                url=endpoint.url,
            )
        except httpx.PoolTimeout as exc:
            breaker_outcome = None  # our own pool is full: says nothing of the service
            raise self._timeout_error(call, f"no free connection ({exc})", endpoint) from None
        except httpx.ConnectTimeout as exc:
            raise _Failed("connect_timeout", exc, retryable=True) from None
        except httpx.TimeoutException as exc:
            raise self._timeout_error(call, f"{type(exc).__name__}: {exc}", endpoint) from None
        except httpx.ConnectError as exc:
            raise _Failed("connect", exc, retryable=True) from None
        except httpx.TransportError as exc:
            raise _Failed("transport", exc, retryable=True) from None
        except httpx.HTTPError as exc:
            raise _Failed("protocol", exc, retryable=False) from None
        except _TooLarge as exc:
            breaker_outcome = None
            self._count_error("too_large")
            raise RequestError(
                f"service {self.name!r}: {exc}",
                {
                    "service": self.name,
                    "url": endpoint.url,
                    "max_response_bytes": self.options.max_response_bytes,
                },
            ) from None
        finally:
            endpoint.outstanding -= 1
            endpoint.breaker.record(breaker_outcome)

    async def _send(
        self, endpoint: Endpoint, call: Call, remaining: float
    ) -> tuple[int, dict[str, str], bytes]:
        limit = self.options.max_response_bytes
        async with self.client.stream(
            call.method,
            _url_of(endpoint.url + call.path, call.params),
            headers=endpoint.headers(call.headers) or None,
            content=call.content,
            timeout=self._timeout(remaining),
            extensions=endpoint.extensions(),
        ) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _TooLarge(f"response of {declared} bytes exceeds {limit}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise _TooLarge(f"response exceeds {limit} bytes")
                chunks.append(chunk)
            return response.status_code, dict(response.headers), b"".join(chunks)

    def _retry_delay(
        self, call: Call, outcome: HttpResponse | _Failed, attempt: int
    ) -> float | None:
        """Seconds before the next attempt, or None when this outcome is final."""
        if not call.idempotent or attempt >= self.options.retry_attempts:
            return None
        if isinstance(outcome, _Failed):
            return retry_delay(self.options, attempt) if outcome.retryable else None
        if outcome.status not in self.options.retry_statuses:
            return None
        asked = parse_retry_after(outcome.headers.get("retry-after"))
        return asked if asked is not None else retry_delay(self.options, attempt)

    def _finish(
        self, outcome: HttpResponse | _Failed, attempt: int, started: float
    ) -> HttpResponse:
        if isinstance(outcome, _Failed):
            self._count_error(outcome.kind)
            raise BackendUnavailable(
                f"service {self.name!r}: {outcome}",
                {"service": self.name, "error": outcome.kind, "attempts": attempt},
            )
        elapsed = time.monotonic() - started
        self.metrics.add(RESPONSES, self.name, f"{outcome.status // 100}xx")
        self.metrics.observe(CALL_SECONDS, elapsed, self.name)
        self.latencies.append(elapsed)
        return outcome

    def _count_error(self, kind: str) -> None:
        self.metrics.add(ERRORS, self.name, kind)

    def _timeout(self, remaining: float) -> httpx.Timeout:
        o = self.options
        return httpx.Timeout(
            connect=min(o.connect_timeout, remaining),
            read=min(o.read_timeout, remaining),
            write=min(o.write_timeout, remaining),
            pool=min(o.pool_timeout, remaining),
        )

    def _timeout_error(self, call: Call, why: str, endpoint: Endpoint) -> Timeout:
        self._count_error("timeout")
        return Timeout(
            f"service {self.name!r}: {call.method} {call.path} timed out: {why}",
            {"service": self.name, "url": endpoint.url},
        )

    # -- load balancing -------------------------------------------------------------------

    def _choose(self, avoid: Endpoint | None) -> Endpoint | None:
        """The base URL for the next attempt, its breaker's permission taken; None if none."""
        usable = [e for e in self.endpoints if e.probe != "unhealthy" and e.breaker.available()]
        if avoid is not None and len(usable) > 1:
            usable = [e for e in usable if e is not avoid]
        if not usable:
            return None
        count = len(self.endpoints)
        order = {id(e): (self.endpoints.index(e) - self._rotation) % count for e in usable}
        if self.options.balance == "least_outstanding":
            chosen = min(usable, key=lambda e: (e.outstanding, order[id(e)]))
        else:
            chosen = min(usable, key=lambda e: order[id(e)])
        self._rotation = (self.endpoints.index(chosen) + 1) % count
        chosen.breaker.allow()
        return chosen

    def _unavailable(self, attempt: int) -> BackendUnavailable:
        states = {e.url: e.breaker.state for e in self.endpoints}
        if not self.endpoints:
            why = f"no instance found ({self.options.discovery} discovery"
            why += f": {self.discovery_error})" if self.discovery_error else ")"
        elif all(state == "open" for state in states.values()):
            wait = min(e.breaker.seconds_until_half_open() for e in self.endpoints)
            why = f"circuit breaker open (next probe in {wait:.1f}s)"
        elif all(e.probe == "unhealthy" for e in self.endpoints):
            why = "no healthy base URL (health probes failing)"
        else:
            why = "no base URL available (breakers open or probes failing)"
        return BackendUnavailable(
            f"service {self.name!r} unavailable: {why}",
            {
                "service": self.name,
                "breakers": states,
                "probes": {e.url: e.probe for e in self.endpoints},
                "attempts": attempt - 1,
            },
        )

    # -- health ---------------------------------------------------------------------------

    def _breaker_moved(self, endpoint: Endpoint, old: BreakerState, new: BreakerState) -> None:
        self.metrics.add(BREAKER_TRANSITIONS, self.name)
        (log.warning if new == "open" else log.info)(
            "pool: %s %s breaker %s -> %s", self.name, endpoint.url, old, new
        )
        failures = endpoint.breaker.failures
        self.on_breaker(
            PoolBreakerChanged(
                service=self.name, url=endpoint.url, old=old, new=new, failures=failures
            )
        )

    def _start_probe(self, endpoint: Endpoint) -> None:
        if self.options.health_path:
            endpoint.prober = asyncio.create_task(
                self._probe_forever(endpoint), name=f"probe {endpoint.url}"
            )

    async def _probe_forever(self, endpoint: Endpoint) -> None:
        while True:
            await self.probe(endpoint)
            await asyncio.sleep(self.options.health_interval)

    async def probe(self, endpoint: Endpoint) -> None:
        """GET the health path once; below 400 is healthy."""
        try:
            response = await self.client.get(
                endpoint.url + self.options.health_path,
                headers=endpoint.headers(),
                timeout=self.options.health_timeout,
                extensions=endpoint.extensions(),
            )
        except httpx.HTTPError as exc:
            status: ProbeStatus = "unhealthy"
            endpoint.probe_error = f"{type(exc).__name__}: {exc}"
        else:
            status = "healthy" if response.status_code < 400 else "unhealthy"
            endpoint.probe_error = "" if status == "healthy" else f"HTTP {response.status_code}"
        if status != endpoint.probe:
            log.info("pool: %s %s is %s", self.name, endpoint.url, status)
        endpoint.probe = status

    def status(self) -> HealthStatus:
        up = sum(endpoint.up for endpoint in self.endpoints)
        if up == 0:
            return "unhealthy"
        return "healthy" if up == len(self.endpoints) and not self.discovery_error else "degraded"

    def details(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "status": self.status(),
            "urls": {endpoint.url: endpoint.details() for endpoint in self.endpoints},
        }
        if self.options.discovery != "static":
            found["discovery"] = self.options.discovery
        if self.discovery_error:
            found["discovery_error"] = self.discovery_error
        return found

    def stats(self) -> dict[str, Any]:
        in_use, idle = self._connections()
        latencies = sorted(self.latencies)
        metrics, name = self.metrics, self.name
        return {
            "requests": int(metrics.value(REQUESTS, name)),
            "attempts": int(metrics.value(ATTEMPTS, name)),
            "retries": int(metrics.value(RETRIES, name)),
            "in_flight": sum(e.outstanding for e in self.endpoints),
            "responses": self._counted(RESPONSES),
            "errors": self._counted(ERRORS),
            "breakers": {e.url: e.breaker.state for e in self.endpoints},
            "breaker_transitions": int(metrics.value(BREAKER_TRANSITIONS, name)),
            "latency_ms": {
                name: _rank(latencies, p) * 1000.0
                for name, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
            },
            "connections_in_use": in_use,
            "connections_idle": idle,
            "max_connections": self.options.max_connections,
        }

    def update_gauges(self) -> None:
        """Set this service's gauges (breaker states, calls in flight, connections)."""
        metrics, name = self.metrics, self.name
        for endpoint in self.endpoints:
            current = endpoint.breaker.state
            for state in BREAKER_STATES:
                metrics.set(BREAKER_STATE, float(state == current), name, endpoint.url, state)
        metrics.set(IN_FLIGHT, sum(e.outstanding for e in self.endpoints), name)
        in_use, idle = self._connections()
        metrics.set(CONNECTIONS, in_use, name, "in_use")
        metrics.set(CONNECTIONS, idle, name, "idle")
        metrics.set(MAX_CONNECTIONS, self.options.max_connections, name)

    def _counted(self, family: Counter) -> dict[str, int]:
        """A counter's series of this service, by its second label."""
        return {
            labels[1]: int(value)
            for labels, value in self.metrics.samples(family)
            if labels[0] == self.name
        }

    def _connections(self) -> tuple[int, int]:
        if self._aiohttp is not None:
            return self._aiohttp.in_flight, self._aiohttp.idle_connections()
        # httpx does not expose its pool: read httpcore's (public) list through the transport.
        pool: Any = getattr(getattr(self._client, "_transport", None), "_pool", None)
        connections: list[Any] = list(getattr(pool, "connections", []))
        idle = sum(1 for c in connections if c.is_idle())
        in_use = sum(1 for c in connections if not c.is_idle() and not c.is_closed())
        return in_use, idle


def _rank(ordered: list[float], p: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]
