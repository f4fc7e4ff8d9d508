"""Messages of the ``pool`` manager: HTTP and JSON-RPC calls to the services a system depends on.

The pool holds one connection pool per named service (``[managers.pool.services.<name>]``)
and answers each call when its response arrives::

    reply = system.ask(HttpRequest(service="billing", method="GET", path="/invoices/7"))
    reply.status, reply.json()

    total = system.ask(
        JsonRpcCall(service="odoo", method="call", params={"service": "common", ...})
    ).result

A response is an answer whatever its status: a 404 or a 503 comes back as an
``HttpResponse`` (after the retries its service allows). Errors are for calls that
got no usable response: ``BackendUnavailable`` (connection failed, circuit breaker
open, no healthy base URL), ``Timeout``, ``RequestError`` (response over the size
limit), ``InvalidMessage`` (unknown service, bad path, body that is not JSON).
"""

from __future__ import annotations

import json as _json
from typing import Annotated, Any, Literal

import msgspec

from corral.messages.base import Count, Event, Range, Reply, Request, TimeLimit, message

__all__ = [
    "BreakerState",
    "HttpMethod",
    "HttpRequest",
    "HttpResponse",
    "JsonRpcCall",
    "JsonRpcResult",
    "PoolAnnounce",
    "PoolBreakerChanged",
    "PoolInstances",
    "PoolStatistics",
    "PoolStats",
    "PoolWithdraw",
    "breaker_topic",
]

HttpMethod = Literal["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"]

Seconds = Annotated[float, Range(ge=0, unit="s")]
"""A measured time: 0 seconds or more."""


@message("pool.http_request")
class HttpRequest(Request["HttpResponse"]):
    """One HTTP call to ``service``: ``path`` (with its query in ``params``) joined to a base URL.

    Give ``json`` (any JSON value but null) or ``body`` (raw bytes), not both.
    ``timeout`` (seconds, at most a day) bounds the whole call, retries included; None
    leaves the service's own timeouts. Only idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE), or
    requests with an ``idempotency_key`` (sent as the ``Idempotency-Key`` header),
    are retried.
    """

    manager = "pool"
    service: str
    method: HttpMethod = "GET"
    path: str = "/"
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    json: Any = None
    body: bytes | None = None
    timeout: TimeLimit | None = None
    idempotency_key: str | None = None


@message("pool.http_response")
class HttpResponse(Reply):
    """The response: status, headers (repeated ones joined by ", "), body, seconds, attempts.

    ``url`` is the base URL that answered.
    """

    status: int
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    body: bytes = b""
    elapsed: Seconds = 0.0
    attempts: Count = 1
    url: str = ""

    def json(self) -> Any:
        """The body parsed as JSON."""
        return _json.loads(self.body)


@message("pool.json_rpc_call")
class JsonRpcCall(Request["JsonRpcResult"]):
    """A JSON-RPC 2.0 call, POSTed to the service's ``jsonrpc_path`` (``/jsonrpc`` by default).

    A JSON-RPC error comes back as a corral error carrying ``remote_code``,
    ``remote_message`` and ``remote_data`` in its details: -32601 (method not
    found) as ``NotFound``; an access error (Odoo's ``AccessDenied``/``AccessError``)
    as ``Unauthorized``; anything else as ``RequestError``.
    """

    manager = "pool"
    service: str
    method: str
    params: Any = None
    path: str = ""
    timeout: TimeLimit | None = None
    idempotency_key: str | None = None


@message("pool.json_rpc_result")
class JsonRpcResult(Reply):
    result: Any = None
    elapsed: Seconds = 0.0
    attempts: Count = 1


@message("pool.stats", idempotent=True)
class PoolStats(Request["PoolStatistics"]):
    """The statistics of one service, or of every service when ``service`` is empty."""

    manager = "pool"
    service: str = ""


@message("pool.statistics")
class PoolStatistics(Reply):
    """Per service: requests, errors by class, retries, breakers, latency, connections."""

    services: dict[str, Any] = msgspec.field(default_factory=dict)


AnnounceTtl = Annotated[float, Range(gt=0, le=86_400, unit="s")]


@message("pool.instances")
class PoolInstances(Reply):
    """The instances of ``service`` announced and not expired, after the change."""

    service: str
    instances: Count = 0


@message("pool.announce", idempotent=True)
class PoolAnnounce(Request[PoolInstances]):
    """Announce an instance of ``service`` at ``url`` (a base URL) for ``ttl`` seconds, to
    every pool whose service has ``discovery = "registry"``; announce again before it runs
    out, or the instance drops out::

        system.ask(PoolAnnounce(service="billing", url="http://10.0.0.7:8000", ttl=30))
    """

    manager = "pool"
    service: str
    url: str
    ttl: AnnounceTtl = 30.0


@message("pool.withdraw", idempotent=True)
class PoolWithdraw(Request[PoolInstances]):
    """Take the instance of ``service`` at ``url`` out of the registry at once."""

    manager = "pool"
    service: str
    url: str


BreakerState = Literal["closed", "open", "half_open"]


@message("pool.breaker_changed")
class PoolBreakerChanged(Event):
    """Published on ``pool.breaker.<service>`` when the breaker of one of the service's base
    URLs changes state (``failures``: the consecutive failures that led there)::

        for delivery in system.subscribe("pool.breaker.*"):
            alert(delivery.message.service, delivery.message.url, delivery.message.new)
    """

    service: str
    url: str
    old: BreakerState
    new: BreakerState
    failures: Count = 0


def breaker_topic(service: str) -> str:
    """Where the :class:`PoolBreakerChanged` events of ``service`` are published."""
    return f"pool.breaker.{service}"
