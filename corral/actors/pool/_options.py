"""The pool manager's options: ``[managers.pool]`` and one ``services.<name>`` table per service.

::

    [managers.pool.services.billing]
    base_urls = ["http://billing-1:8000", "http://billing-2:8000"]
    balance = "least_outstanding"
    max_connections = 50
    retry_attempts = 4
    health_path = "/healthz"
"""

from __future__ import annotations

import importlib.util
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from corral.actors.pool._discovery import nameserver
from corral.config import REDIS_URL, Section
from corral.errors import ConfigError

__all__ = ["Backoff", "Balance", "Discovery", "PoolOptions", "ServiceOptions", "Transport"]

Balance = Literal["round_robin", "least_outstanding"]
Backoff = Literal["exponential", "linear", "fixed"]
Transport = Literal["auto", "aiohttp", "httpx"]
Discovery = Literal["static", "dns", "registry"]

_POSITIVE = {"gt": 0}
_NON_NEGATIVE = {"ge": 0}
_COUNT = {"ge": 1}


@dataclass(frozen=True, kw_only=True, repr=False)
class ServiceOptions(Section):
    """One external HTTP service: where it is, how to reach it, how hard to try."""

    base_urls: list[str] = field(default_factory=list)
    discovery: Discovery = "static"
    """Where the instances are (:mod:`corral.actors.pool._discovery`): the ``base_urls``
    as they are, their host names resolved again (``dns``), or what instances announced
    in Redis (``registry``, where ``base_urls`` may stay empty)."""
    discovery_interval: float = field(default=10.0, metadata={"gt": 0, "le": 86_400})
    dns_server: str = ""
    """For ``dns``: the nameserver to ask (``host[:port]``); empty: the system's resolver."""
    balance: Balance = "round_robin"
    # Connection pool (httpx.Limits) and timeouts (httpx.Timeout), per attempt.
    max_connections: int = field(default=100, metadata=_COUNT)
    max_keepalive: int = field(default=20, metadata=_NON_NEGATIVE)
    keepalive_expiry: float = field(default=5.0, metadata=_NON_NEGATIVE)
    connect_timeout: float = field(default=5.0, metadata=_POSITIVE)
    read_timeout: float = field(default=30.0, metadata=_POSITIVE)
    write_timeout: float = field(default=30.0, metadata=_POSITIVE)
    pool_timeout: float = field(default=5.0, metadata=_POSITIVE)
    http2: bool = False
    transport: Transport = "auto"
    """Who speaks HTTP under httpx's API: ``aiohttp`` (:mod:`corral.actors.pool._transport`,
    several times less CPU per request), or httpx's own ``httpx`` (HTTP/2 too); ``auto``:
    aiohttp, or httpx when ``http2`` is on."""
    # TLS, for https:// base URLs.
    verify: bool = True
    """Check the service's certificate (and host name); false only for a test service."""
    ca_file: str = ""
    """A PEM bundle of the CAs to trust for this service instead of the usual ones."""
    client_cert: str = ""
    """A PEM certificate (chain) to present: mutual TLS. Its key too, unless ``client_key``."""
    client_key: str = ""
    """The PEM private key of ``client_cert``, when it is a file of its own."""
    headers: dict[str, str] = field(default_factory=dict)
    bearer_token: str = field(default="", metadata={"secret": True})
    username: str = ""
    password: str = field(default="", metadata={"secret": True})
    max_response_bytes: int = field(default=10 * 1024 * 1024, metadata=_COUNT)
    # Retries: only idempotent calls, on connection errors and ``retry_statuses``.
    retry_attempts: int = field(default=3, metadata=_COUNT)
    """Attempts in all, the first one included; 1 turns retries off."""
    retry_backoff: Backoff = "exponential"
    retry_delay: float = field(default=0.1, metadata={"ge": 0, "le_field": "retry_max_delay"})
    retry_max_delay: float = field(default=5.0, metadata=_NON_NEGATIVE)
    retry_jitter: float = field(default=0.5, metadata={"ge": 0, "le": 1})
    """Each delay is shortened by up to this fraction, at random."""
    retry_max_time: float = field(default=30.0, metadata=_POSITIVE)
    """No retry starts later than this many seconds after the call began."""
    retry_statuses: list[int] = field(default_factory=lambda: [429, 502, 503, 504])
    # Circuit breaker, per base URL.
    breaker_threshold: int = field(default=5, metadata=_COUNT)
    """Consecutive failures (connection errors, timeouts, 5xx) that open the breaker."""
    breaker_open_seconds: float = field(default=30.0, metadata=_POSITIVE)
    breaker_probes: int = field(default=1, metadata=_COUNT)
    """Calls let through at once while half-open; one success closes the breaker."""
    # Health probes: GET ``health_path`` on every base URL each ``health_interval`` seconds.
    health_path: str = ""
    health_interval: float = field(default=10.0, metadata=_POSITIVE)
    health_timeout: float = field(default=2.0, metadata=_POSITIVE)
    jsonrpc_path: str = "/jsonrpc"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.base_urls and self.discovery != "registry":
            self._fail("base_urls", 'needs at least one URL (or discovery = "registry")')
        if self.dns_server:
            if self.discovery != "dns":
                self._fail("dns_server", 'has no use without discovery = "dns"')
            try:
                nameserver(self.dns_server)
            except ValueError as exc:
                self._fail("dns_server", f"expected an address and an optional port: {exc}")
            if importlib.util.find_spec("dns") is None:
                self._fail("dns_server", "needs dnspython: pip install 'corral[discovery]'")
        for index, url in enumerate(self.base_urls):
            problem = url_problem(url)
            if problem:
                self._fail("base_urls", f"{problem}, got {url!r}", path=f"[{index}]")
        for name in ("health_path", "jsonrpc_path"):
            path = getattr(self, name)
            if path and not path.startswith("/"):
                self._fail(name, f"must start with '/', got {path!r}")
        if self.http2 and self.transport == "aiohttp":
            self._fail("http2", 'aiohttp speaks HTTP/1.1 only: set transport = "httpx"')
        if self.http2 and importlib.util.find_spec("h2") is None:
            self._fail("http2", "needs the h2 package: pip install 'corral[http2]'")
        if self.password and not self.username:
            self._fail("password", "needs a username", related="username")
        if self.ca_file and not self.verify:
            self._fail("ca_file", "has no use with verify = false", related="verify")
        if self.client_key and not self.client_cert:
            self._fail("client_key", "needs client_cert", related="client_cert")
        for name in ("ca_file", "client_cert", "client_key"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                self._fail(name, f"no such file: {path!r}")
        if self.ca_file or self.client_cert:
            self.ssl_context()  # a file that is no PEM bundle, or a key that does not fit

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS settings of this service's connections, for both transports."""
        if self.ca_file:
            try:
                context = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                self._fail("ca_file", f"cannot load it as PEM certificates: {exc}")
        else:  # what httpx trusts by default (certifi), whichever transport sends
            context = httpx.create_ssl_context(verify=self.verify, trust_env=False)
        if self.client_cert:
            try:
                context.load_cert_chain(self.client_cert, self.client_key or None)
            except (OSError, ssl.SSLError) as exc:
                self._fail("client_cert", f"cannot load it (with its key): {exc}")
        return context


def url_problem(url: str) -> str:
    """What is wrong with ``url`` as a service's base URL; "" when nothing."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return f"not a URL ({exc})"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return "expected an http:// or https:// URL"
    if parsed.query or parsed.fragment:
        return "a base URL takes no query or fragment"
    return ""


@dataclass(frozen=True, kw_only=True, repr=False)
class PoolOptions(Section):
    """``[managers.pool]``: the services (each a table of :class:`ServiceOptions`)."""

    services: dict[str, ServiceOptions] = field(default_factory=dict)
    redis_url: str = field(default="", metadata=REDIS_URL)
    """Where the ``registry`` of announced instances lives (default: the system's Redis)."""
    latency_window: int = field(default=1000, metadata=_COUNT)
    """How many recent latencies per service the percentiles are taken over."""

    def __post_init__(self) -> None:
        super().__post_init__()
        parsed: dict[str, ServiceOptions] = {}
        for name, table in self.services.items():
            parsed[name] = _service(name, table)
        object.__setattr__(self, "services", parsed)


def _service(name: str, table: Any) -> ServiceOptions:
    if isinstance(table, ServiceOptions):
        return table
    if not isinstance(table, Mapping):
        raise ConfigError(
            f"services.{name}: expected table, got {type(table).__name__}",
            {"field": "services", "problem": "expected table"},
        )
    known = ServiceOptions.__dataclass_fields__
    unknown = sorted(key for key in table if key not in known)
    if unknown:
        raise ConfigError(
            f"services.{name}.{unknown[0]}: not an option of a service "
            f"(options: {', '.join(sorted(known))})",
            {"field": "services", "problem": "unknown option"},
        )
    try:
        return ServiceOptions(**table)
    except ConfigError as exc:
        raise ConfigError(f"services.{name}.{exc.message}", exc.details) from None
