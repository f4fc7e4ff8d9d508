"""The browser client (/corral.js) in headless Chromium against two real ``corral run`` daemons."""

from __future__ import annotations

import re
import signal
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

import corral
from corral.messages.auth import AuthIssue
from corral.messages.websocket import WsEmitToRoom, WsRoomInfo
from tests.browser import DevTools
from tests.daemons import DaemonGroup, redis_daemons_config
from tests.redis_server import RedisServer
from tests.support import wait_until

SECRET = "browser-client-signing-secret-32b"
MANAGERS = f"""
[managers.auth]
signing_key = "{SECRET}"
access_ttl = 3
leeway = 0.0
[managers.websocket]
depends_on = ["auth"]
presence_ttl = 1.0
refresh_window = 2.0
room_policies = {{ "feed" = "clients" }}
"""

DOCUMENTED = re.search(
    r"^```html\n(.*?)^```$",
    (Path(__file__).resolve().parent.parent / "docs" / "websocket.md").read_text(),
    re.MULTILINE | re.DOTALL,
)
assert DOCUMENTED, "docs/websocket.md shows the browser client in an html block"

PAGE = (
    '<!doctype html><meta charset="utf-8"><title>corral.js</title>\n'
    "<script>window.logged = []; console.log = (...args) => logged.push(args);</script>\n"
    + DOCUMENTED.group(1)
    + """<script>
  window.events = [];
  for (const name of ["open", "refreshed", "gap", "error"]) {
    client.on(name, () => events.push(name));
  }
  client.on("close", (event) => events.push("close " + event.code));
</script>"""
)
"""The page of docs/websocket.md with the daemons' addresses, recording what it logs."""


class WebApp:
    """What a web application does for the client: serve its page (``page``, at ``/``) and
    issue the user's access tokens (at ``/token``)."""

    def __init__(self, client: corral.Client) -> None:
        self.issued = 0
        self.page = ""
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/token":
                    tokens = client.ask(AuthIssue(subject="user:tab", refresh=False))
                    app.issued += 1
                    self.answer("text/plain", tokens.access_token)
                else:
                    self.answer("text/html; charset=utf-8", app.page)

            def answer(self, content_type: str, text: str) -> None:
                body = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def namespace() -> str:
    return f"js{uuid.uuid4().hex[:8]}"


@pytest.fixture
def remote(redis_server: RedisServer, namespace: str) -> Iterator[corral.Client]:
    with corral.connect(redis_server.url, namespace=namespace) as client:
        yield client


@pytest.fixture
def web_app(remote: corral.Client) -> Iterator[WebApp]:
    app = WebApp(remote)
    yield app
    app.close()


def test_every_daemon_serves_the_client_with_a_validator(
    redis_server: RedisServer, tmp_path: Path, namespace: str
) -> None:
    config = redis_daemons_config(redis_server.url, namespace, MANAGERS)
    with DaemonGroup(tmp_path, config, count=1) as group:
        served = httpx.get(group[0].http_url + "/corral.js")
        assert served.status_code == 200
        assert served.headers["content-type"] == "text/javascript; charset=utf-8"
        assert "class Corral" in served.text
        again = httpx.get(
            group[0].http_url + "/corral.js", headers={"If-None-Match": served.headers["etag"]}
        )
        assert again.status_code == 304 and again.content == b""


def test_the_client_survives_a_sigkill_recovers_what_it_missed_and_refreshes_in_band(
    redis_server: RedisServer,
    tmp_path: Path,
    namespace: str,
    remote: corral.Client,
    web_app: WebApp,
    browser: DevTools,
) -> None:
    config = redis_daemons_config(
        redis_server.url, namespace, MANAGERS, extra="heartbeat_interval = 0.2\nheartbeat_ttl = 1.0"
    )
    with DaemonGroup(tmp_path, config, count=2) as group:
        first, second = (f"ws://{d.http_url.removeprefix('http://')}/ws" for d in group.daemons)
        web_app.page = (
            PAGE.replace("http://127.0.0.1:8080", group[0].http_url)
            .replace("ws://127.0.0.1:8080/ws", first)
            .replace("ws://127.0.0.1:8081/ws", second)
        )
        browser.call("Page.navigate", url=web_app.url + "/")

        def room_count() -> int:
            return int(remote.ask(WsRoomInfo(room="feed")).count)

        wait_until(lambda: room_count() == 1, timeout=20)
        assert browser.evaluate("client.url") == first

        def emit(numbers: range) -> None:
            for n in numbers:
                remote.ask(WsEmitToRoom(room="feed", event="tick", data={"n": n}))

        def logged() -> list[tuple[int, int]]:
            """(n, offset) of each message the page's handler logged."""
            return [
                (entry[1]["n"], entry[2])
                for entry in browser.evaluate("logged")
                if entry[0] == "tick"
            ]

        def received() -> list[int]:
            return [n for n, _offset in logged()]

        emit(range(10))
        wait_until(lambda: len(received()) == 10, timeout=10)

        group.signal(0, signal.SIGKILL)
        group.wait(0)
        emit(range(10, 20))  # while the page has no daemon, or just found the other one
        wait_until(lambda: len(received()) >= 20, timeout=30)
        assert received() == list(range(20))  # all of them, in order, none twice
        offsets = [offset for _n, offset in logged()]
        assert offsets == list(range(offsets[0], offsets[0] + 20))
        assert browser.evaluate("client.url") == second
        assert browser.evaluate("client.state") == "open"
        assert browser.evaluate("events.filter((e) => e === 'open').length") == 2
        assert "gap" not in browser.evaluate("events")

        # Access tokens live 3 s: the daemon asks for a fresh one before closing the socket.
        wait_until(lambda: "refreshed" in browser.evaluate("events"), timeout=15)
        emit(range(20, 22))
        wait_until(lambda: len(received()) == 22, timeout=10)
        events = browser.evaluate("events")
        assert events.count("open") == 2 and "close 4401" not in events, events
        assert web_app.issued >= 3  # the first connection, the reconnection, the refresh
