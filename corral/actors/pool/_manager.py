"""The ``pool`` manager: HTTP and JSON-RPC calls to named services, never blocking its mailbox.

::

    [managers.pool.services.billing]
    base_urls = ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    health_path = "/healthz"

    reply = system.ask(HttpRequest(service="billing", method="GET", path="/invoices"))

How a request travels: the handler checks the message (service known, path,
params, headers, JSON body) on the actor's thread and raises ``InvalidMessage``
at once for a bad one. It then takes over the caller's reply
(:class:`~corral.manager.DeferredReply`) and hands the call to the
manager's asyncio loop, which runs in its own thread with one
``httpx.AsyncClient`` per service; the handler returns and the mailbox moves on.
The loop answers the caller when the response arrives, so a hundred slow calls
run at once, bounded only by each service's ``max_connections``.

Why an asyncio loop rather than a worker pool: one thread holds any number of
waiting calls, httpx's async pool enforces the connection limits, and breakers,
probes and statistics live on that one thread without locks.

Per call: the circuit breakers of the service's base URLs come first (an open
breaker fails the call at once with ``BackendUnavailable``, and is never
retried), then load balancing (round robin or least outstanding, skipping
URLs whose breaker is open or whose health probe fails), then retries for
idempotent calls on connection errors and ``retry_statuses`` (honouring
``Retry-After``), moving to another base URL when there is one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import re
from collections.abc import Coroutine
from typing import Any

from corral._redis import REDIS_ERRORS, SyncRedis, connect, describe
from corral.actors.pool._discovery import ANNOUNCE, WITHDRAW, registry_key
from corral.actors.pool._loop import LoopThread
from corral.actors.pool._metrics import FAMILIES
from corral.actors.pool._options import PoolOptions, url_problem
from corral.actors.pool._service import Call, Service
from corral.errors import (
    BackendUnavailable,
    ConfigError,
    CorralError,
    InvalidMessage,
    ManagerUnavailable,
    NotFound,
    RequestError,
    Unauthorized,
)
from corral.manager import DeferredReply, Manager, handles
from corral.messages.base import MAX_TIMEOUT, Reply
from corral.messages.pool import (
    HttpRequest,
    JsonRpcCall,
    JsonRpcResult,
    PoolAnnounce,
    PoolBreakerChanged,
    PoolInstances,
    PoolStatistics,
    PoolStats,
    PoolWithdraw,
    breaker_topic,
)
from corral.messages.system import Health, HealthStatus

__all__ = ["PoolManager"]

log = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_HEADER_VALUE = re.compile(r"[\r\n\x00]")
_BAD_PATH = re.compile(r"[\s?#\x00-\x1f\x7f]")
_SCALARS = (str, int, float, bool, type(None))
_ACCESS_ERRORS = ("AccessDenied", "AccessError")


class _LoopFailure:
    """Told to the actor when a call on the loop hit a bug: it crashes, and is restarted."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class PoolManager(Manager[PoolOptions]):
    """Connection pools to named HTTP services, with retries, breakers and health probes."""

    name = "pool"
    metric_families = FAMILIES
    stop_grace = 2.0
    """Seconds calls in flight get to finish when the manager stops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loop: LoopThread | None = None
        self.services: dict[str, Service] = {}
        self._rpc_ids = itertools.count(1)

    # -- lifecycle ------------------------------------------------------------------------

    def on_start(self) -> None:
        settings = self.options
        self.registry_url = settings.redis_url or self.corral_context.redis_url
        self._registry_client: SyncRedis | None = None
        for name, options in settings.services.items():
            if options.discovery == "registry" and not self.registry_url:
                raise ConfigError(
                    f"managers.pool.services.{name}.discovery: the registry lives in Redis "
                    "(set managers.pool.redis_url, or run the bus on Redis)"
                )
        self.loop = LoopThread(f"corral-{self.corral_context.name}-loop")
        self.services = {
            name: Service(
                name,
                options,
                latency_window=settings.latency_window,
                metrics=self.corral_metrics,
                registry=(self.registry_url, self._registry_key(name))
                if options.discovery == "registry"
                else None,
                on_breaker=self._publish_later,
                clock=self.corral_context.clock,
            )
            for name, options in settings.services.items()
        }
        for service in self.services.values():
            self.loop.call(service.start(), timeout=5.0)

    def _actor_loop_teardown(self) -> None:
        # Runs on every way out (stop, crash, failed start), unlike on_stop.
        super()._actor_loop_teardown()
        if self.loop is not None:
            self.loop.stop(
                grace=self.stop_grace if self.corral_failure is None else 0.0,
                timeout=2.0,
                cleanup=self._close_services,
            )
            self.loop = None

    async def _close_services(self) -> None:
        for service in self.services.values():
            await service.close()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _LoopFailure):
            raise RuntimeError(
                f"{self.corral_context.name}: a call failed unexpectedly"
            ) from message.error
        return super().on_receive(message)

    # -- handlers -------------------------------------------------------------------------

    @handles(HttpRequest)
    def http_request(self, msg: HttpRequest) -> None:
        service = self._service(msg.service)
        headers = _checked_headers(msg.headers)
        if msg.json is not None and msg.body is not None:
            raise InvalidMessage("give json or body, not both", path="body")
        content = msg.body
        if msg.json is not None:
            content = _json_bytes(msg.json, "json")
            headers.setdefault("Content-Type", "application/json")
        if msg.idempotency_key is not None:
            headers["Idempotency-Key"] = msg.idempotency_key
        call = Call(
            method=msg.method,
            path=_checked_path(msg.path, "path"),
            idempotent=msg.method in IDEMPOTENT_METHODS or msg.idempotency_key is not None,
            params=_checked_params(msg.params),
            headers=headers,
            content=content,
            timeout=_checked_timeout(msg.timeout),
        )
        self._reply_later(service.request(call))

    @handles(JsonRpcCall)
    def json_rpc_call(self, msg: JsonRpcCall) -> None:
        service = self._service(msg.service)
        if msg.params is not None and not isinstance(msg.params, list | dict):
            raise InvalidMessage("JSON-RPC params must be a list or a map", path="params")
        request_id = next(self._rpc_ids)
        payload: dict[str, Any] = {"jsonrpc": "2.0", "method": msg.method, "id": request_id}
        if msg.params is not None:
            payload["params"] = msg.params
        headers = {"Content-Type": "application/json"}
        if msg.idempotency_key is not None:
            headers["Idempotency-Key"] = msg.idempotency_key
        call = Call(
            method="POST",
            path=_checked_path(msg.path or service.options.jsonrpc_path, "path"),
            idempotent=msg.idempotency_key is not None,
            headers=headers,
            content=_json_bytes(payload, "params"),
            timeout=_checked_timeout(msg.timeout),
        )
        self._reply_later(_json_rpc(service, call, request_id))

    @handles(PoolStats)
    def pool_stats(self, msg: PoolStats) -> None:
        chosen = [self._service(msg.service)] if msg.service else list(self.services.values())
        self._reply_later(_statistics(chosen))

    @handles(PoolAnnounce)
    def announce(self, msg: PoolAnnounce) -> PoolInstances:
        url = _checked_instance(msg.service, msg.url)
        count = self._registry(ANNOUNCE, msg.service, url, str(math.ceil(msg.ttl * 1000)))
        return PoolInstances(service=msg.service, instances=count)

    @handles(PoolWithdraw)
    def withdraw(self, msg: PoolWithdraw) -> PoolInstances:
        url = _checked_instance(msg.service, msg.url)
        return PoolInstances(
            service=msg.service, instances=self._registry(WITHDRAW, msg.service, url)
        )

    def _publish_later(self, event: PoolBreakerChanged) -> None:
        """Publish ``event`` off the pool's loop (a publication may wait on Redis)."""
        asyncio.get_running_loop().run_in_executor(None, self._publish, event)

    def _publish(self, event: PoolBreakerChanged) -> None:
        try:
            self.router.publish(breaker_topic(event.service), event)
        except CorralError as exc:  # the bus being down changes nothing for the calls
            log.warning("pool: could not publish %s's breaker change: %s", event.service, exc)

    def _registry_key(self, service: str) -> str:
        return registry_key(self.corral_context.namespace, service)

    def _registry(self, script: str, service: str, *args: str) -> int:
        if not self.registry_url:
            raise BackendUnavailable(
                "the instance registry lives in Redis: set managers.pool.redis_url, "
                "or run the bus on Redis"
            )
        if self._registry_client is None:
            self._registry_client = connect(self.registry_url, setting="managers.pool.redis_url")
        try:
            return int(self._registry_client.eval(script, 1, self._registry_key(service), *args))
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(f"the instance registry: {describe(exc)}") from None

    def _service(self, name: str) -> Service:
        service = self.services.get(name)
        if service is None:
            known = ", ".join(sorted(self.services)) or "none configured"
            raise InvalidMessage(f"unknown service {name!r} (services: {known})", path="service")
        return service

    # -- replying later -------------------------------------------------------------------

    def _reply_later(self, work: Coroutine[Any, Any, Reply]) -> None:
        loop = self.loop
        if loop is None or not loop.alive:
            work.close()
            raise RuntimeError(f"{self.corral_context.name}: its event loop is gone")
        reply = self.defer_reply()
        loop.spawn(self._answer(reply, work))

    async def _answer(self, reply: DeferredReply, work: Coroutine[Any, Any, Reply]) -> None:
        try:
            reply.resolve(await work)
        except CorralError as exc:
            reply.fail(exc)
        except BaseException as exc:
            stopping = ManagerUnavailable(
                f"manager {self.corral_context.name!r} stopped before the call completed",
                {"manager": self.corral_context.name},
            )
            if isinstance(exc, Exception):
                log.error("pool: a call failed unexpectedly", exc_info=exc)
                stopping = ManagerUnavailable(
                    f"manager {self.corral_context.name!r} failed: {type(exc).__name__}: {exc}",
                    {"manager": self.corral_context.name},
                )
                self.corral_mailbox.try_tell(_LoopFailure(exc))
            reply.fail(stopping)
            if not isinstance(exc, Exception):
                raise

    # -- health ---------------------------------------------------------------------------

    def health(self) -> Health:
        loop = self.loop
        if loop is None or not loop.alive:
            return Health(status="unhealthy", details={"error": "event loop not running"})
        try:
            report = loop.call(_health_report(self.services), timeout=1.0)
        except TimeoutError as exc:
            return Health(status="unhealthy", details={"error": str(exc)})
        details, metrics, dependencies = report
        return Health(
            status=_overall(list(dependencies.values())),
            details=details,
            metrics=metrics,
            dependencies=dict(dependencies),
        )


_SERVICE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def _checked_instance(service: str, url: str) -> str:
    """The base URL an instance announces, checked as ``base_urls`` entries are."""
    if not _SERVICE_NAME.match(service):
        raise InvalidMessage(
            "a service name is 1-128 of letters, digits and _ . : -", path="service"
        )
    problem = url_problem(url)
    if problem:
        raise InvalidMessage(f"{problem}, got {url[:200]!r}", path="url")
    return url.rstrip("/")


def _overall(statuses: list[HealthStatus]) -> HealthStatus:
    """Unhealthy when no service can be reached; degraded when some cannot, or only in part.

    A service that is down is the service's problem, not the pool's: restarting
    the pool would not bring it back, so one down service only degrades the pool.
    """
    if statuses and all(status == "unhealthy" for status in statuses):
        return "unhealthy"
    return "healthy" if all(status == "healthy" for status in statuses) else "degraded"


async def _health_report(
    services: dict[str, Service],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, HealthStatus]]:
    details = {name: service.details() for name, service in services.items()}
    metrics: dict[str, Any] = {}
    for name, service in services.items():
        service.update_gauges()
        _flatten(metrics, name, service.stats())
    dependencies: dict[str, HealthStatus] = {
        name: service.status() for name, service in services.items()
    }
    return details, metrics, dependencies


def _flatten(into: dict[str, Any], prefix: str, value: Any) -> None:
    """Nested statistics as flat numeric keys (``billing.latency_ms.p99``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(into, f"{prefix}.{key}", item)
    elif isinstance(value, int | float):
        into[prefix] = value


async def _statistics(services: list[Service]) -> PoolStatistics:
    return PoolStatistics(services={s.name: {**s.stats(), **s.details()} for s in services})


async def _json_rpc(service: Service, call: Call, request_id: int) -> JsonRpcResult:
    response = await service.request(call)
    where = {"service": service.name, "status": response.status}
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or ("result" not in body and "error" not in body):
        error = BackendUnavailable if response.status >= 500 else RequestError
        raise error(
            f"service {service.name!r} answered HTTP {response.status} without a JSON-RPC body",
            where,
        )
    if body.get("id") not in (request_id, None):
        raise BackendUnavailable(
            f"service {service.name!r} answered JSON-RPC id {body.get('id')!r}, "
            f"expected {request_id}",
            where,
        )
    remote = body.get("error")
    if remote is not None:
        raise _json_rpc_error(service.name, remote)
    return JsonRpcResult(
        result=body["result"], elapsed=response.elapsed, attempts=response.attempts
    )


def _json_rpc_error(service: str, remote: Any) -> CorralError:
    """A JSON-RPC error object as a typed corral error carrying the remote code and message."""
    remote = remote if isinstance(remote, dict) else {"message": str(remote)}
    code = remote.get("code")
    message = str(remote.get("message", ""))
    data = remote.get("data")
    details = {"service": service, "remote_code": code, "remote_message": message}
    if data is not None:
        details["remote_data"] = data
    name = str(data.get("name", "")) if isinstance(data, dict) else ""
    text = f"service {service!r}: JSON-RPC error {code}: {message}"
    if code == -32601:
        return NotFound(text, details)
    if any(marker in name for marker in _ACCESS_ERRORS):
        return Unauthorized(text, details)
    return RequestError(text, details)


# -- checks on the actor's thread, before any I/O -------------------------------------------


def _checked_path(path: str, field: str) -> str:
    if not path.startswith("/"):
        raise InvalidMessage(f"must start with '/', got {path!r:.80}", path=field)
    if _BAD_PATH.search(path):
        raise InvalidMessage(
            "no spaces, control characters, '?' or '#' (put the query in params)", path=field
        )
    return path


def _checked_params(params: dict[str, Any]) -> dict[str, Any]:
    for key, value in params.items():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, _SCALARS) or (
                isinstance(item, float) and not math.isfinite(item)
            ):
                raise InvalidMessage(
                    "a query parameter is a string, number, bool, null or a list of them",
                    path=f"params.{key}",
                )
    return params


def _checked_headers(headers: dict[str, str]) -> dict[str, str]:
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise InvalidMessage(f"not a valid header name: {name!r:.80}", path="headers")
        if _BAD_HEADER_VALUE.search(value):
            raise InvalidMessage(
                "header values must not hold CR, LF or NUL", path=f"headers.{name}"
            )
    return dict(headers)


def _checked_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:  # as the codec checks
        raise InvalidMessage(f"must be > 0 and <= {MAX_TIMEOUT} s, got {timeout}", path="timeout")
    return timeout


def _json_bytes(value: Any, field: str) -> bytes:
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise InvalidMessage(f"not serializable as JSON: {exc}", path=field) from None
