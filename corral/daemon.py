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
- ``GET /metrics``: Prometheus text format: per manager and message type, messages
  handled, errors and handler time (a histogram), remote request latency; per
  manager, state, restarts and mailbox; the bus, remote requests, junk refused, build
  info, ``process_*`` and ``python_*``; and the families each manager declares
  (``metric_families``, see :mod:`corral.metrics`). Counters outlive restarts;
  ``docs/metrics.md`` lists every family;
- ``GET /``: the dashboard of the whole namespace (:mod:`corral.dashboard`), behind
  ``daemon.dashboard_token`` when one is set;
- the routes each configured manager offers through its ``Manager.mount`` hook, called
  before any manager starts: the ``websocket`` manager's ``/ws`` and ``/corral.js``, the
  ``auth`` manager's ``/.well-known/jwks.json``.

When the bus is on Redis it also serves remote requests from ``corral.connect()``
(:mod:`corral.remote`)::

    daemon = Daemon(load_config("corral.toml"))
    daemon.start()
    print(daemon.url)       # http://127.0.0.1:8650
    daemon.stop()
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import platform
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
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
from corral.config import MANAGER_FIELDS, Config, parse_options
from corral.errors import ConfigError, CorralError
from corral.manager import HttpMount, Manager
from corral.messages.system import ChildStatus, Reconfigure, SystemHealth
from corral.metrics import REQUEST_SECONDS, Counter, Family, Gauge, Histogram, ManagerMetrics
from corral.remote import RequestServer
from corral.supervisor import ChildSpec
from corral.system import System

__all__ = ["Daemon", "declared_families", "health_document"]

log = logging.getLogger("corral.daemon")


class Daemon:
    """A System served over HTTP (and to remote clients when the bus is on Redis)."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        on_escalate: Callable[[str], None] | None = None,
        daemon_id: str = "",
    ) -> None:
        self.config = config or Config()
        self.daemon_id = daemon_id or secrets.token_hex(6)
        """Names this daemon in its heartbeats and log lines."""
        if self.config.bus.backend == "redis":
            check_writable(self.config.bus.url, setting="bus.url")
        self.started_at = time.monotonic()
        on_redis = self.config.bus.backend == "redis"
        self.system = System(self.config, on_escalate=on_escalate, singletons_by_lease=on_redis)
        self.remote: RequestServer | None = None
        self.draining = False
        self.problems: dict[str, str] = {}
        """What degrades the daemon besides its managers, by source (``vault``: the last
        refresh of the configuration failed); set and cleared by whoever runs it."""
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
                daemon_id=self.daemon_id,
            )
        self.registry = CollectorRegistry()
        self.registry.register(_SystemCollector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.app = web.Application()
        self.app.router.add_get("/livez", self._livez)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/metrics", self._metrics)
        dashboard.mount(self)
        self._mount_managers()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = self.config.daemon.port

    def _mount_managers(self) -> None:
        """Let each configured manager offer its routes (``Manager.mount``), before any
        of them starts: what a hook shares reaches that manager's actors here."""
        supervisor = self.system.supervisor
        metrics = supervisor.metrics()
        for spec in supervisor.specs:
            http = HttpMount(
                name=spec.name,
                options=spec.options,
                app=self.app,
                system=self.system,
                redis_url=spec.redis_url or "",
                namespace=spec.namespace or self.config.bus.namespace,
                signing_keys=self.system.codec.keys,
                replay_window=self.system.codec.replay_window,
                metrics=metrics[spec.name],
            )
            spec.manager.mount(http)
            if http.shared is not None:
                supervisor.mounted[spec.name] = http.shared

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
        """Take what can change while running from ``config`` (``corral run`` on SIGHUP and
        its Vault refresh): the log section (applied by the caller), and the managers'
        options, which a manager takes live when it can (rate-limit rules, room policies)
        and is otherwise restarted with (a signing key). Returns the settings reloaded and
        those that need the daemon restarted, as dotted keys. Raises
        :class:`~corral.errors.ConfigError` for options their manager refuses.
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
            fields = {f for f in settings if f in MANAGER_FIELDS}
            manager = self._manager_class(name)
            if old is None or new is None or fields or manager is None:
                restart.extend(keys)  # manager None: not run here (enabled = false)
                continue
            options = self._parsed_options(manager, name, new.options)
            try:
                answer = self.system.ask(Reconfigure(target=name, options=options))
            except CorralError as exc:  # down or restarting: it starts with the new options
                log.warning("manager %s could not take its new options now: %s", name, exc)
                answer = None
            if answer is not None and answer.applied:
                self.system.supervisor.update_options(name, new.options)
            else:
                log.info("restarting manager %s for its new %s", name, ", ".join(settings))
                self.system.supervisor.restart_with(name, new.options)
            reloaded.extend(keys)
        self.config = _with_reloaded(self.config, config, reloaded)
        return reloaded, restart

    def _manager_class(self, name: str) -> type[Manager[Any]] | None:
        """The class of the manager this daemon runs as ``name``; None if it runs none."""
        return next((s.manager for s in self.system.supervisor.specs if s.name == name), None)

    @staticmethod
    def _parsed_options(
        manager: type[Manager[Any]], name: str, options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``options`` parsed as the manager's ``Options`` (as at start: text from the
        environment or Vault becomes the option's type), as plain values for a message."""
        if manager.Options is None:
            return dict(options)
        parsed = parse_options(manager.Options, options, manager=name)
        return {key: _plain(getattr(parsed, key)) for key in options}

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
        if document["status"] == "healthy" and not (bus_ok and remote_ok and not self.problems):
            document["status"] = "degraded"
        document["problems"] = dict(self.problems)
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


def _plain(value: Any) -> Any:
    """``value`` with ``str`` subclasses (config ``Text``) as plain ``str``, at any depth."""
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    return value


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
    document["metrics"] = health.metrics if health is not None else {}
    document["dependencies"] = health.dependencies if health is not None else {}
    return document


class _SystemCollector(Collector):
    """Every corral family at scrape time, without asking any actor.

    Counters come from the supervisor's records (which outlive restarts), states from
    its latest probes; each manager adds the families it declares (``metric_families``).
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.declared = declared_families(daemon.system.supervisor.specs)

    def collect(self) -> Iterator[Metric]:
        daemon = self.daemon
        supervisor = daemon.system.supervisor
        document, _ = daemon.health()
        build = GaugeMetricFamily(
            "corral_build_info", "corral's version and Python's", labels=["version", "python"]
        )
        build.add_metric([__version__, platform.python_version()], 1.0)
        yield build
        yield _one_hot(
            "corral_system_status",
            "1 for the daemon's status as /health says it, 0 for the others",
            [],
            [([], document["status"])],
            ("healthy", "degraded", "unhealthy", "draining"),
        )
        yield GaugeMetricFamily(
            "corral_ready", "1 when /readyz says ready", value=float(daemon.ready()[0])
        )
        yield from self._managers(supervisor.snapshot(), supervisor.metrics())
        yield from self._bus()
        yield from self._remote()
        rejected = CounterMetricFamily(
            "corral_rejected",
            "Input from outside refused as junk, by where it came and what was wrong",
            labels=["source", "kind"],
        )
        for (source, kind), count in sorted(REJECTED.counts().items()):
            rejected.add_metric([source, kind], count)
        yield rejected

    def _managers(
        self, health: SystemHealth, counted: dict[str, ManagerMetrics]
    ) -> Iterator[Metric]:
        manager = ["manager"]
        up = GaugeMetricFamily("corral_manager_up", "1 while the manager runs", labels=manager)
        restarts = CounterMetricFamily(
            "corral_manager_restarts", "Restarts of the manager", labels=manager
        )
        started = GaugeMetricFamily(
            "corral_manager_start_time_seconds",
            "Unix time the running instance of the manager started",
            labels=manager,
        )
        depth = GaugeMetricFamily(
            "corral_mailbox_depth", "Messages waiting in the manager's mailbox", labels=manager
        )
        capacity = GaugeMetricFamily(
            "corral_mailbox_capacity", "Messages the manager's mailbox holds", labels=manager
        )
        overloaded = CounterMetricFamily(
            "corral_mailbox_overloaded",
            "Messages refused (Overloaded) because the mailbox stayed full",
            labels=manager,
        )
        unhandled = CounterMetricFamily(
            "corral_unhandled_messages",
            "Messages the manager has no handler for (answered with an error)",
            labels=manager,
        )
        by_type = ["manager", "type"]
        handled = CounterMetricFamily(
            "corral_messages_handled", "Messages handled, by message type", labels=by_type
        )
        errors = CounterMetricFamily(
            "corral_message_errors",
            "Messages answered with an error (NotFound, Conflict, ...), by message type",
            labels=by_type,
        )
        seconds = HistogramMetricFamily(
            "corral_handler_seconds", "Time spent in the handler, by message type", labels=by_type
        )
        wall = time.time()
        capacities = {spec.name: spec.mailbox_size for spec in self.daemon.system.supervisor.specs}
        statuses = []
        for name, child in health.managers.items():
            running = child.state == "running"
            up.add_metric([name], float(running))
            statuses.append(([name], child.status))
            restarts.add_metric([name], child.restarts)
            if running:
                started.add_metric([name], wall - child.uptime_s)
            depth.add_metric([name], child.mailbox_depth)
            capacity.add_metric([name], capacities[name])
            metrics = counted[name]
            overloaded.add_metric([name], metrics.overloaded)
            unhandled.add_metric([name], metrics.unhandled)
            for type_name, stats in sorted(metrics.handlers.items()):
                handled.add_metric([name, type_name], stats.handled)
                errors.add_metric([name, type_name], stats.errors)
                seconds.add_metric(
                    [name, type_name], _buckets(stats.seconds.cumulative()), stats.seconds.sum
                )
        yield up
        yield _one_hot(
            "corral_manager_status",
            "1 for the manager's health status (from the latest probe), 0 for the others",
            manager,
            statuses,
            ("healthy", "degraded", "unhealthy"),
        )
        yield from (restarts, started, depth, capacity, overloaded, unhandled)
        yield from (handled, errors, seconds)
        requests = HistogramMetricFamily(
            "corral_request_seconds",
            "Remote requests, from reading one off its stream to publishing its reply, "
            "by message type",
            labels=by_type,
        )
        for name, metrics in counted.items():
            for labels, buckets, total in metrics.histograms(REQUEST_SECONDS):
                requests.add_metric([name, *labels], _buckets(buckets), total)
        yield requests
        for family in self.declared:
            yield _declared(family, counted)

    def _bus(self) -> Iterator[Metric]:
        bus = self.daemon.system.bus
        stats = bus.stats()
        for key, meaning in (
            ("published", "Events published on the bus"),
            ("delivered", "Events delivered to this daemon's subscriptions"),
            ("dropped", "Events dropped: a subscription's queue was full, or Redis cut it"),
            ("rejected", "Bus messages refused (undecodable, forged, replayed)"),
            ("reconnects", "Reconnections of the bus to Redis"),
        ):
            yield CounterMetricFamily(f"corral_bus_{key}", meaning, value=stats[key])
        yield GaugeMetricFamily(
            "corral_bus_up", "1 while the bus is connected", value=float(bus.healthy)
        )

    def _remote(self) -> Iterator[Metric]:
        remote = self.daemon.remote
        if remote is None:
            return
        counts = remote.counts
        for key, (name, meaning) in REMOTE_COUNTS.items():
            yield CounterMetricFamily(f"corral_remote_{name}", meaning, value=counts[key])
        yield GaugeMetricFamily(
            "corral_remote_in_flight",
            "Remote requests taken and not answered yet",
            value=remote.in_flight,
        )
        yield GaugeMetricFamily(
            "corral_remote_connected",
            "1 while the request server reaches Redis",
            value=float(remote.connected),
        )
        yield GaugeMetricFamily(
            "corral_remote_singletons_held",
            "Singleton managers whose lease this daemon holds",
            value=len(remote.held),
        )


REMOTE_COUNTS = {
    "served": ("replies", "Replies to remote requests published (from a run record too)"),
    "expired": ("expired", "Remote requests dropped unanswered: past their caller's deadline"),
    "rejected": ("rejected", "Remote request entries refused (corral_rejected_total has why)"),
    "claimed": ("claimed", "Remote requests claimed from daemons that stopped answering"),
    "dropped": ("dropped_tells", "Remote tells that failed (nobody to tell the error to)"),
    "errors": ("reply_failures", "Batches of replies that could not be sent to Redis"),
    "unknown_outcome": (
        "unknown_outcome",
        "Remote requests not run again: a daemon that stopped had started them",
    ),
    "answered_from_record": (
        "answered_from_record",
        "Remote requests answered from the record of an earlier run",
    ),
    "quarantined": (
        "quarantined",
        "Remote requests refused because the same one crashed its manager",
    ),
}
"""The request server's counters, by key: the ``corral_remote_<name>_total`` family each
goes to, and what it counts."""


def declared_families(specs: list[ChildSpec]) -> list[Family]:
    """The families the managers of ``specs`` declare, once each, by name.

    Two declarations of one name must agree (two managers of one class do); else
    ConfigError, naming both managers.
    """
    found: dict[str, tuple[Family, str]] = {}
    for spec in specs:
        for family in spec.manager.metric_families:
            known = found.get(family.name)
            if known is None:
                found[family.name] = (family, spec.name)
            elif known[0] != family:
                raise ConfigError(
                    f"managers {known[1]} and {spec.name} declare the metric family "
                    f"{family.name} differently"
                )
    return [family for family, _ in found.values()]


def _declared(family: Family, counted: dict[str, ManagerMetrics]) -> Metric:
    labels = ["manager", *family.labels]
    name = family.name.removesuffix("_total")
    if isinstance(family, Histogram):
        histogram = HistogramMetricFamily(name, family.help, labels=labels)
        for manager, metrics in counted.items():
            for values, buckets, total in metrics.histograms(family):
                histogram.add_metric([manager, *values], _buckets(buckets), total)
        return histogram
    assert isinstance(family, Counter | Gauge)
    kind = CounterMetricFamily if isinstance(family, Counter) else GaugeMetricFamily
    metric = kind(name, family.help, labels=labels)
    for manager, metrics in counted.items():
        for values, value in metrics.samples(family):
            metric.add_metric([manager, *values], value)
    return metric


def _buckets(cumulative: list[tuple[float, int]]) -> list[tuple[str, float]]:
    return [
        ("+Inf" if bound == math.inf else str(bound), float(count)) for bound, count in cumulative
    ]


def _one_hot(
    name: str,
    meaning: str,
    labels: list[str],
    series: Sequence[tuple[list[str], str]],
    states: tuple[str, ...],
) -> Metric:
    """A gauge with a ``status`` label: 1 for each series' state, 0 for the other states."""
    gauge = GaugeMetricFamily(name, meaning, labels=[*labels, "status"])
    for values, current in series:
        for state in states:
            gauge.add_metric([*values, state], float(state == current))
    return gauge
