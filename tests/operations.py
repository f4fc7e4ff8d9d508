"""A real ``corral run`` with every built-in manager, JSON logs and some traffic, as an
operator sees it: its ``/metrics``, its stderr. Shared by the metrics, logs and deploy
tests (a session fixture in ``conftest.py``)::

    with BusyDaemon(tmp_path) as busy:
        busy.scrape()              # /metrics, parsed
        busy.daemon.lines          # every line it printed so far
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
import websockets

import corral
from corral._closing import Closing
from corral.errors import Unauthorized
from corral.messages.auth import AuthIssue, AuthRefresh, AuthValidate
from corral.messages.cache import CacheGet, CacheSet
from corral.messages.pool import HttpRequest
from corral.messages.ratelimit import RatelimitCheck
from corral.messages.state import StateRegister, StateUpdate, StateWrite
from corral.messages.transaction import (
    TransactionBegin,
    TransactionCommit,
    TransactionRollback,
    TransactionWrite,
)
from corral.messages.websocket import WsEmitToRoom
from tests.daemons import DaemonProcess
from tests.redis_server import RedisServer
from tests.support import Samples, metric, scrape, wait_until

__all__ = ["BUILT_IN_MANAGERS", "BusyDaemon", "promtool"]

SECRET = "operations-signing-secret-of-32-bytes"
NAMESPACE = "ops"
BUILT_IN_MANAGERS = ("cache", "state", "transaction", "ratelimit", "auth", "pool", "websocket")


def promtool() -> str:
    """The path of ``promtool``, or the test fails saying how to get it."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: `make promtool` installs it (Debian package prometheus; "
            "as root: apt-get install prometheus)",
            pytrace=False,
        )
    return found


class _Service(BaseHTTPRequestHandler):
    """The pool's service: 200 on /ok, 503 elsewhere."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/ok" else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        return


def config_toml(redis_url: str, service_url: str) -> str:
    """Every built-in manager on one Redis bus, logging JSON lines."""
    return f"""
[bus]
backend = "redis"
url = "{redis_url}"
namespace = "{NAMESPACE}"

[daemon]
port = 0

[supervisor]
probe_interval = 0.5

[log]
format = "json"

[managers.cache]
[managers.state]
[managers.transaction]
depends_on = ["state"]

[managers.ratelimit]
rules.ip = "3/minute"

[managers.auth]
signing_key = "{SECRET}"
refresh_grace = 0

[managers.pool.services.web]
base_urls = ["{service_url}"]
retry_attempts = 1

[managers.websocket]
depends_on = ["auth"]
room_policies = {{ "news" = "clients" }}
"""


class BusyDaemon(Closing):
    """Its own redis-server, an HTTP service for the pool, the daemon, then traffic."""

    def __init__(self, directory: Path) -> None:
        self.redis = RedisServer()
        self.service = ThreadingHTTPServer(("127.0.0.1", 0), _Service)
        threading.Thread(target=self.service.serve_forever, daemon=True).start()
        host, port = self.service.server_address[:2]
        self.service_url = f"http://{host!s}:{port}"
        self.config = directory / "corral.toml"
        self.config.write_text(config_toml(self.redis.url, self.service_url))
        self.daemon = DaemonProcess(self.config)
        try:
            self.daemon.wait_for("serves remote requests")
            self.traffic()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return self.daemon.http_url

    def scrape(self) -> Samples:
        return scrape(self.url)

    def traffic(self) -> None:
        """A bit of everything each manager does, errors and refusals included; returns
        once the liveness probes have seen it (so the gauges are set)."""
        with corral.connect(self.redis.url, namespace=NAMESPACE) as remote:
            remote.ask(CacheSet(key="k", value=1))
            remote.ask(CacheGet(key="k"))
            remote.ask(CacheGet(key="missing"))
            remote.ask(StateRegister(state_id="order:1", state_type="Order"))
            remote.ask(StateUpdate(state_id="order:1", data={"paid": True}))
            tx = remote.ask(TransactionBegin()).transaction_id
            write = StateWrite(state_id="order:2", transition="create", state_type="Order")
            remote.ask(TransactionWrite(transaction_id=tx, write=write))
            remote.ask(TransactionCommit(transaction_id=tx))
            remote.ask(
                TransactionRollback(transaction_id=remote.ask(TransactionBegin()).transaction_id)
            )
            allowed = [remote.ask(RatelimitCheck(ip="10.0.0.1")).allowed for _ in range(5)]
            assert allowed == [True, True, True, False, False]
            tokens = remote.ask(AuthIssue(subject="ada"))
            token = tokens.access_token
            remote.ask(AuthValidate(token=token))
            with contextlib.suppress(Unauthorized):
                remote.ask(AuthValidate(token="not-a-token"))
            refresh = remote.ask(AuthIssue(subject="bob")).refresh_token
            assert refresh is not None
            remote.ask(AuthRefresh(token=refresh))
            with contextlib.suppress(Unauthorized):  # logged by the manager, in context
                remote.ask(AuthRefresh(token=refresh))
            assert remote.ask(HttpRequest(service="web", path="/ok")).status == 200
            assert remote.ask(HttpRequest(service="web", path="/down")).status == 503
            asyncio.run(self._websocket(remote, token))
        with redis.Redis.from_url(self.redis.url) as client:  # junk on a request stream
            client.xadd(f"{NAMESPACE}:{{req:cache}}:stream", {"m": b"junk"})
        wait_until(self._probed, timeout=15)

    async def _websocket(self, remote: corral.Client, token: str) -> None:
        address = self.url.removeprefix("http://")
        async with websockets.connect(f"ws://{address}/ws?token={token}") as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"
            await ws.send(json.dumps({"type": "join", "room": "news"}))
            assert json.loads(await ws.recv())["type"] == "joined"
            await asyncio.to_thread(remote.ask, WsEmitToRoom(room="news", event="hi"))
            assert json.loads(await ws.recv())["event"] == "hi"
            await asyncio.to_thread(wait_until, self._socket_counted, 15)

    def _socket_counted(self) -> bool:
        return self.scrape().get(metric("corral_websocket_connections", manager="websocket")) == 1

    def _probed(self) -> bool:
        samples = self.scrape()
        return (
            samples.get(metric("corral_rejected_total", source="remote", kind="undecodable")) == 1
            and metric("corral_cache_leases", manager="cache") in samples
        )

    def close(self) -> None:
        self.daemon.close()
        self.service.shutdown()
        self.redis.close()
