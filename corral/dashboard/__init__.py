"""The operator's dashboard: one self-contained page, served by every daemon.

It shows every daemon of the namespace and its managers (status, state, restarts,
mailbox depth, message rate and each manager's own figures), per-manager request
rates and mailbox depths over the last 15 minutes, a restart timeline, and the
events the daemons publish, each with its daemon. The page loads nothing from
elsewhere (charts are SVG drawn by its own script), so it works on an offline machine.

Routes, behind ``daemon.dashboard_token`` when one is set (:mod:`._access`):

- ``GET /``: the page (the login form without the token);
- ``POST /dashboard/login``, ``POST /dashboard/logout``: set or drop the token cookie;
- ``GET /dashboard/api/daemons``: every live daemon's status document;
- ``GET /dashboard/api/series``: every live daemon's samples (:mod:`._series`);
- ``GET /dashboard/api/events?cursor=...``: the events after the cursor, and the next
  cursor (without one: the last :data:`~._events.EVENTS_KEPT` of each kind).

Each daemon samples its managers every 5 s into a ring buffer, keeps its recent
events per kind, and, on a Redis bus, shares its status, samples and events with the
namespace (:mod:`._shared`), so any daemon's page shows them all. The daemon mounts it::

    from corral import dashboard
    dashboard.mount(daemon)         # done by the Daemon itself
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import time
import uuid
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from corral import __version__
from corral._redis import REDIS_ERRORS, describe
from corral.dashboard._access import PAGE_HEADERS, TokenGate
from corral.dashboard._events import Cursor, RecentEvents
from corral.dashboard._figures import figures
from corral.dashboard._series import SAMPLE_STEP, WINDOW, Series
from corral.dashboard._shared import Field, SharedView

if TYPE_CHECKING:
    from corral.daemon import Daemon

__all__ = ["STATUS_INTERVAL", "Dashboard", "mount", "page"]

log = logging.getLogger(__name__)

STATUS_INTERVAL = 2.0
"""Seconds between two refreshes of a daemon's status document in Redis."""

TICK = 1.0
"""Seconds between two rounds of the dashboard's work: sampling when due, sharing."""

_dumps = functools.partial(json.dumps, default=str)


@cache
def page() -> bytes:
    """The dashboard's HTML (styles and script inline)."""
    return resources.files(__name__).joinpath("index.html").read_bytes()


class Dashboard:
    """The dashboard of one daemon: its samples, its events, and its routes."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        config = daemon.config
        remote = daemon.remote
        self.daemon_id = remote.daemon_id if remote is not None else uuid.uuid4().hex[:12]
        self.namespace = config.bus.namespace
        self.started = time.time()
        self.host = socket.gethostname()
        self.series = Series()
        self.events = RecentEvents(self.daemon_id)
        daemon.system.bus.on_publish(self.events.record)
        self.shared = (
            SharedView(config.bus.url, self.namespace, self.daemon_id)
            if config.bus.backend == "redis"
            else None
        )
        self.gate = TokenGate(config.daemon.dashboard_token)
        self.problem = ""
        """Why Redis could not be written or read last time, or empty."""
        self._shared_up_to = Cursor()
        self._series_shared = False
        self._task: asyncio.Task[None] | None = None

    # -- routes ---------------------------------------------------------------------------

    def mount(self, app: web.Application) -> None:
        """Add the dashboard's routes to ``app``, and its work to the app's lifetime."""
        guard = self.gate.guard
        app.router.add_get("/", guard(self._page, page=True))
        app.router.add_post("/dashboard/login", self.gate.login)
        app.router.add_post("/dashboard/logout", self.gate.logout)
        app.router.add_get("/dashboard/api/daemons", guard(self._daemons))
        app.router.add_get("/dashboard/api/series", guard(self._series))
        app.router.add_get("/dashboard/api/events", guard(self._events))
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._stop)

    async def _page(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=page(), content_type="text/html", charset="utf-8", headers=PAGE_HEADERS
        )

    async def _daemons(self, _request: web.Request) -> web.StreamResponse:
        documents = {self.daemon_id: self.status_document()}
        problem = await self._gather(documents, "status")
        return self._answer({"daemons": list(documents.values())}, problem)

    async def _series(self, _request: web.Request) -> web.StreamResponse:
        documents = {self.daemon_id: self.series.document()}
        problem = await self._gather(documents, "series")
        return self._answer({"window": WINDOW, "step": SAMPLE_STEP, "daemons": documents}, problem)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        try:
            cursor = Cursor.parse(request.query.get("cursor", ""))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        problem = self.problem
        if self.shared is None:
            found, after = self.events.since(cursor)
        else:
            try:
                found, after = await self.shared.events(cursor)
            except REDIS_ERRORS as exc:
                found, after, problem = [], cursor, describe(exc)
        return self._answer({"events": found, "cursor": str(after)}, problem)

    def _answer(self, document: dict[str, Any], problem: str) -> web.Response:
        shown = {
            "namespace": self.namespace,
            "self": self.daemon_id,
            "now": time.time(),
            "problem": problem,
            "login": not self.gate.open,
            **document,
        }
        return web.json_response(shown, dumps=_dumps)

    async def _gather(self, documents: dict[str, Any], field: Field) -> str:
        """Add the other live daemons' documents to ``documents``; why not, or empty."""
        if self.shared is None:
            return self.problem
        try:
            others = [i for i in await self.shared.daemon_ids() if i != self.daemon_id]
            found = await self.shared.documents(others, field)
        except REDIS_ERRORS as exc:
            return describe(exc)
        for daemon_id in others:
            document = found.get(daemon_id)
            if document is None and field == "status":
                document = {"id": daemon_id, "status": "unknown", "managers": {}, "missing": True}
            if document is not None:
                document["id"] = daemon_id
                documents[daemon_id] = document
        return self.problem

    # -- what this daemon tells ----------------------------------------------------------

    def status_document(self) -> dict[str, Any]:
        """This daemon and its managers, as every dashboard of the namespace shows them."""
        health, _ = self.daemon.health()
        kinds = {spec.name: spec.manager.name for spec in self.daemon.system.supervisor.specs}
        managers = {}
        for name, child in health["managers"].items():
            kind = kinds.get(name) or name
            managers[name] = {
                "kind": kind,
                "status": child["status"],
                "state": child["state"],
                "critical": child["critical"],
                "restarts": child["restarts"],
                "mailbox_depth": child["mailbox_depth"],
                "rate": self.series.latest_rate(name),
                "last_error": child["last_error"],
                "uptime_s": child["uptime_s"],
                "figures": figures(kind, child["details"], child["metrics"]),
            }
        return {
            "id": self.daemon_id,
            "host": self.host,
            "pid": os.getpid(),
            "version": __version__,
            "listen": self.daemon.url,
            "started": round(self.started, 3),
            "uptime_s": health["uptime_s"],
            "status": health["status"],
            "bus": {"backend": health["bus"]["backend"], "healthy": health["bus"]["healthy"]},
            "updated": round(time.time(), 3),
            "managers": managers,
        }

    # -- the daemon's lifetime -----------------------------------------------------------

    async def _start(self, _app: web.Application) -> None:
        self._task = asyncio.create_task(self._run(), name="corral-dashboard")

    async def _stop(self, _app: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.shared is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await self.shared.forget()
            await self.shared.close()

    async def _run(self) -> None:
        """Sample every :data:`SAMPLE_STEP`; share every :data:`TICK` (status less often).

        A round that fails for another reason than Redis is logged (its traceback once),
        and the next round runs as usual: the dashboard never stops the daemon.
        """
        next_sample = next_status = 0.0
        failed_before = False
        while True:
            now = time.time()
            try:
                if now >= next_sample:
                    self.series.sample(now, self.daemon.system.supervisor.snapshot())
                    self._series_shared = False
                    next_sample = now + SAMPLE_STEP
                if self.shared is not None:
                    with_status = now >= next_status
                    if await self._share(with_status=with_status) and with_status:
                        next_status = now + STATUS_INTERVAL
            except Exception as exc:
                log.error("dashboard: a round failed: %r", exc, exc_info=not failed_before)
                failed_before = True
            await asyncio.sleep(TICK)

    async def _share(self, *, with_status: bool) -> bool:
        """Write this daemon's new events (and status and samples) to Redis; True if done."""
        assert self.shared is not None
        events, after = self.events.since(self._shared_up_to)
        status = self.status_document() if with_status else None
        series = None if self._series_shared else self.series.document()
        try:
            await self.shared.publish(status, series, events)
        except REDIS_ERRORS as exc:
            if not self.problem:
                log.warning("dashboard: cannot share this daemon's status: %s", describe(exc))
            self.problem = describe(exc)
            return False
        if self.problem:
            log.info("dashboard: sharing this daemon's status again")
        self.problem = ""
        self._shared_up_to = after
        self._series_shared = True
        return True


def mount(daemon: Daemon) -> Dashboard:
    """Serve the dashboard on the daemon's app (``daemon.app``)."""
    dashboard = Dashboard(daemon)
    dashboard.mount(daemon.app)
    return dashboard
