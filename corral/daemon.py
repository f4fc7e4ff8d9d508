"""The daemon behind ``corral run``: the System, its HTTP face, and remote requests.

On one host:port (default 127.0.0.1:8650) it serves:

- ``GET /livez``: 200 while the process and its event loop run (never waits on an
  actor): Kubernetes' liveness probe;
- ``GET /readyz``: 200 when started, its Redis reachable and not draining, else 503
  with the reasons: the readiness probe;
- ``GET /health``: ``{"status", "managers": {name: {"status", "details", "metrics",
  "dependencies", ...}}, "bus", "remote", ...}`` from the supervisor's latest probes,
  in milliseconds (``?fresh=1`` asks every actor now); 200 when healthy or degraded,
  503 when unhealthy or draining (stopping: load balancers should send nothing more);
- ``GET /metrics``: Prometheus text format (messages handled, errors, handler
  latency histogram, mailbox depth, restarts, bus counters, per manager, and every
  numeric metric a manager reports in its Health);
- ``GET /``: the dashboard of the whole namespace (:mod:`corral.dashboard`), behind
  ``daemon.dashboard_token`` when one is set;
- room for more routes on the same port (the WebSocket endpoint and dashboard
  add themselves through :attr:`Daemon.app`).

When the bus is on Redis it also serves remote requests from ``corral.connect()``
(:mod:`corral.remote`)::

    daemon = Daemon(load_config("corral.toml"))
    daemon.start()
    print(daemon.url)       # http://127.0.0.1:8650
    daemon.stop()
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from corral import __version__, dashboard
from corral._junk import REJECTED
from corral._redis import check_writable
from corral.actors import websocket
from corral.actors.base import LATENCY_BUCKETS
from corral.config import Config, ManagerSection
from corral.errors import ConfigError, CorralError
from corral.messages.system import ChildStatus, Reconfigure, SystemHealth
from corral.remote import RequestServer
from corral.system import System

__all__ = ["Daemon", "health_document"]

log = logging.getLogger("corral.daemon")

_STANDARD_METRICS = frozenset(
    {"handled", "errors", "handler_seconds", "latency_counts", "mailbox_depth", "uptime_s"}
)


class Daemon:
    """A System served over HTTP (and to remote clients when the bus is on Redis)."""

    def __init__(
        self, config: Config | None = None, *, on_escalate: Callable[[str], None] | None = None
    ) -> None:
        self.config = config or Config()
        if self.config.bus.backend == "redis":
            check_writable(self.config.bus.url, setting="bus.url")
        self.started_at = time.monotonic()
        on_redis = self.config.bus.backend == "redis"
        self.system = System(self.config, on_escalate=on_escalate, singletons_by_lease=on_redis)
        self.remote: RequestServer | None = None
        self.draining = False
        self.stopped = False
        if on_redis:
            daemon = self.config.daemon
            self.remote = RequestServer(
                self.system,
                self.config.bus.url,
                codec=self.system.codec,
                namespace=self.config.bus.namespace,
                heartbeat_interval=daemon.heartbeat_interval,
                heartbeat_ttl=daemon.heartbeat_ttl,
                claim_idle=daemon.claim_idle,
                lease_ttl=daemon.lease_ttl,
            )
        self.registry = CollectorRegistry()
        self.registry.register(_SystemCollector(self))
        self.app = web.Application()
        self.app.router.add_get("/livez", self._livez)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/metrics", self._metrics)
        dashboard.mount(self)
        websocket.mount(self)  # before the system starts: the manager looks for its gateway
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = self.config.daemon.port

    @property
    def url(self) -> str:
        return f"http://{self.config.daemon.host}:{self.port}"

    def start(self) -> None:
        """Start the managers, then listen; raises ConfigError if the port is taken."""
        self.system.start()
        try:
            self._listen()
        except OSError as exc:
            self.system.stop()
            daemon = self.config.daemon
            raise ConfigError(
                f"daemon: cannot listen on {daemon.host}:{daemon.port}: {exc}"
            ) from exc
        if self.remote is not None:
            self._explain_placement()
            self.remote.start()

    def _explain_placement(self) -> None:
        for spec in self.system.supervisor.specs:
            if spec.manager.__module__.startswith("corral."):
                continue  # built-in managers keep their shared state in Redis
            if spec.placement == "singleton":
                log.info(
                    "manager %s is a singleton: one daemon of namespace %r runs it at a time",
                    spec.name,
                    self.config.bus.namespace,
                )
            else:
                log.info(
                    'manager %s runs on every daemon (placement = "any"): what it keeps in '
                    'memory is per daemon; set placement = "singleton" for one instance',
                    spec.name,
                )

    def _listen(self) -> None:
        runner = web.AppRunner(self.app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, self.config.daemon.host, self.config.daemon.port)
        self._loop.run_until_complete(site.start())
        sockets = getattr(site._server, "sockets", None)
        if sockets:  # the real port when 0 was asked
            self.port = sockets[0].getsockname()[1]
        self._runner = runner
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="corral-http", daemon=True
        )
        self._thread.start()
        log.info("serving %s (/health, /metrics)", self.url)

    def stop(self, *, drain: bool = True) -> None:
        """Drain, stop the managers in reverse order, stop serving.

        Draining (``daemon.drain_timeout`` at most): stop taking remote requests, so that
        the other daemons take them, and answer those already taken. ``/health`` says
        ``draining`` meanwhile. Stopping again does nothing.
        """
        if self.stopped:
            return
        self.stopped = True
        self.draining = True
        if self.remote is not None:
            self.remote.drain(self.config.daemon.drain_timeout if drain else 0)
        self.system.stop()
        if self.remote is not None:
            self.remote.stop()
        if self._runner is not None and self._thread is not None:
            future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
            future.result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    def reload(self, config: Config) -> tuple[list[str], list[str]]:
        """Take what can change while running from ``config`` (``corral run`` on SIGHUP):
        the log section (applied by the caller), and the options of managers that take
        new ones (rate-limit rules, room policies). Returns the settings reloaded and
        those that need a restart, as dotted keys.
        """
        reloaded: list[str] = []
        restart: list[str] = []
        changed = self.config.changes(config)
        by_manager: dict[str, list[str]] = {}
        for key in changed:
            section, _, rest = key.partition(".")
            if section == "log":
                reloaded.append(key)
            elif section == "managers":
                name, _, setting = rest.partition(".")
                by_manager.setdefault(name, []).append(setting)
            else:
                restart.append(key)
        for name, settings in by_manager.items():
            keys = [f"managers.{name}.{setting}" for setting in settings]
            old, new = self.config.managers.get(name), config.managers.get(name)
            fields = {f for f in settings if f in _MANAGER_FIELDS}
            if old is None or new is None or fields:
                restart.extend(keys)
                continue
            try:
                answer = self.system.ask(Reconfigure(target=name, options=dict(new.options)))
            except CorralError as exc:
                log.warning("manager %s refused its new options: %s", name, exc)
                restart.extend(keys)
                continue
            if answer.applied:
                self.system.supervisor.update_options(name, new.options)
                reloaded.extend(keys)
            else:
                restart.extend(keys)
        self.config = _with_reloaded(self.config, config, reloaded)
        return reloaded, restart

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.stop()

    def health(self, *, fresh: bool = False) -> tuple[dict[str, Any], int]:
        """The /health document and its HTTP status.

        From the supervisor's latest probes (``supervisor.probe_interval`` old at most),
        so that it answers at once whatever the actors are doing; ``fresh`` asks every
        actor now instead, waiting up to a second for a busy one.
        """
        health = self.system.health(timeout=1.0) if fresh else self.system.supervisor.snapshot()
        document = health_document(health)
        bus_ok = self.system.bus.healthy
        remote_ok = self.remote is None or self.remote.connected
        if document["status"] == "healthy" and not (bus_ok and remote_ok):
            document["status"] = "degraded"
        if self.draining:
            document["status"] = "draining"
        document["bus"] = {
            "backend": self.config.bus.backend,
            "healthy": bus_ok,
            **self.system.bus.stats(),
        }
        if self.remote is not None:
            document["remote"] = {
                "daemon_id": self.remote.daemon_id,
                "connected": self.remote.connected,
                "draining": self.remote.draining,
                "in_flight": self.remote.in_flight,
                "singletons_held": sorted(self.remote.held),
                **self.remote.counts,
            }
        document["version"] = __version__
        document["uptime_s"] = round(time.monotonic() - self.started_at, 3)
        return document, 503 if document["status"] in ("unhealthy", "draining") else 200

    async def _health(self, request: web.Request) -> web.Response:
        fresh = request.query.get("fresh", "") not in ("", "0", "false")
        if fresh:
            document, status = await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(self.health, fresh=True)
            )
        else:
            document, status = self.health()
        return _json(document, status)

    def ready(self) -> tuple[bool, list[str]]:
        """Whether this daemon should get traffic, and why not."""
        reasons = []
        if self.draining:
            reasons.append("draining")
        if not self.system.supervisor.running:
            reasons.append("starting" if self.system.supervisor.escalated is None else "escalated")
        if not self.system.bus.healthy:
            reasons.append("bus: Redis unreachable")
        if self.remote is not None and not self.remote.connected:
            reasons.append("remote requests: Redis unreachable")
        return not reasons, reasons

    async def _livez(self, _request: web.Request) -> web.Response:
        return _json({"status": "alive"}, 200)

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready, reasons = self.ready()
        return _json({"status": "ready" if ready else "not ready", "reasons": reasons},
                     200 if ready else 503)  # fmt: skip

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(
            None, generate_latest, self.registry
        )
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


_MANAGER_FIELDS = frozenset(f.name for f in dataclasses.fields(ManagerSection)) - {"options"}
"""The keys of a manager's table that are its spec (a change needs a restart)."""


def _with_reloaded(current: Config, new: Config, reloaded: list[str]) -> Config:
    """``current`` with the log section and the managers whose options were reloaded from
    ``new``."""
    managers = dict(current.managers)
    for key in reloaded:
        if key.startswith("managers."):
            name = key.split(".")[1]
            managers[name] = new.managers[name]
    return current.replace(log=new.log, managers=managers)


def _json(document: dict[str, Any], status: int) -> web.Response:
    return web.Response(
        text=json.dumps(document, default=str), status=status, content_type="application/json"
    )


def health_document(health: SystemHealth) -> dict[str, Any]:
    """SystemHealth as the seed's JSON shape: ``{"status", "managers": {name: {...}}}``."""
    return {
        "status": health.status,
        "escalated": health.escalated,
        "managers": {name: _child_document(child) for name, child in health.managers.items()},
    }


def _child_document(child: ChildStatus) -> dict[str, Any]:
    document: dict[str, Any] = {
        "status": child.status,
        "state": child.state,
        "critical": child.critical,
        "restarts": child.restarts,
        "last_error": child.last_error,
        "mailbox_depth": child.mailbox_depth,
        "uptime_s": round(child.uptime_s, 3),
    }
    health = child.health
    document["details"] = health.details if health is not None else {}
    document["metrics"] = (
        {k: v for k, v in health.metrics.items() if k != "latency_counts"}
        if health is not None
        else {}
    )
    document["dependencies"] = health.dependencies if health is not None else {}
    return document


class _SystemCollector(Collector):
    """Reads the managers' counters at scrape time (one parallel health probe)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        health = self.daemon.system.supervisor.snapshot()
        up = GaugeMetricFamily(
            "corral_manager_up", "1 when the manager is running", labels=["manager"]
        )
        healthy = GaugeMetricFamily(
            "corral_manager_healthy", "0 unhealthy, 1 degraded, 2 healthy", labels=["manager"]
        )
        restarts = CounterMetricFamily(
            "corral_restarts", "Restarts of the manager", labels=["manager"]
        )
        handled = CounterMetricFamily(
            "corral_messages_handled", "Messages handled", labels=["manager"]
        )
        errors = CounterMetricFamily(
            "corral_errors", "Requests answered with an error", labels=["manager"]
        )
        depth = GaugeMetricFamily("corral_mailbox_depth", "Messages waiting", labels=["manager"])
        latency = HistogramMetricFamily(
            "corral_handler_seconds", "Time spent in message handlers", labels=["manager"]
        )
        extra = GaugeMetricFamily(
            "corral_manager_metric",
            "A numeric metric a manager reports",
            labels=["manager", "name"],
        )
        level = {"unhealthy": 0, "degraded": 1, "healthy": 2}
        for name, child in health.managers.items():
            up.add_metric([name], 1.0 if child.state == "running" else 0.0)
            healthy.add_metric([name], level[child.status])
            restarts.add_metric([name], child.restarts)
            depth.add_metric([name], child.mailbox_depth)
            metrics = child.health.metrics if child.health is not None else {}
            handled.add_metric([name], metrics.get("handled", 0))
            errors.add_metric([name], metrics.get("errors", 0))
            counts = metrics.get("latency_counts")
            if counts:
                cumulative, buckets = 0, []
                for bound, count in zip([*LATENCY_BUCKETS, float("inf")], counts, strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
                latency.add_metric([name], buckets, metrics.get("handler_seconds", 0.0))
            for key, value in metrics.items():
                if key not in _STANDARD_METRICS and isinstance(value, int | float):
                    extra.add_metric([name, key], float(value))
        yield from (up, healthy, restarts, handled, errors, depth, latency, extra)
        stats = self.daemon.system.bus.stats()
        for key in ("published", "delivered", "dropped", "rejected", "reconnects"):
            yield CounterMetricFamily(f"corral_bus_{key}", f"Bus messages {key}", value=stats[key])
        rejected = CounterMetricFamily(
            "corral_rejected",
            "Input from outside refused as junk, by where it came and what was wrong",
            labels=["source", "kind"],
        )
        for (source, kind), count in sorted(REJECTED.counts().items()):
            rejected.add_metric([source, kind], count)
        yield rejected
        yield GaugeMetricFamily(
            "corral_bus_healthy",
            "1 when the bus is connected",
            value=float(self.daemon.system.bus.healthy),
        )
