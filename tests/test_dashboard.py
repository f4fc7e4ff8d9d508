"""The dashboard: the page, the event stream, and headless Chromium watching a live daemon."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from corral.config import Config, DaemonSection, ManagerSection
from corral.daemon import Daemon
from corral.messages.system import SupervisorChildChanged
from tests.support import wait_until

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,800",
    "--remote-debugging-port=0",
]


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    running = Daemon(
        Config().replace(
            daemon=DaemonSection(port=0),
            managers={
                "auth": ManagerSection(class_path="corral.actors.auth:AuthManager"),
                "websocket": ManagerSection(
                    class_path="corral.actors.websocket:WebSocketManager", depends_on=["auth"]
                ),
            },
        )
    )
    with running:
        yield running


def test_the_page_is_self_contained(daemon: Daemon) -> None:
    page = httpx.get(daemon.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for external in ("src=", "href=", "@import", "http://", "https://"):
        assert external not in page.text


def test_events_stream_as_server_sent_events(daemon: Daemon) -> None:
    with httpx.stream("GET", daemon.url + "/events", timeout=5) as stream:
        lines = stream.iter_lines()
        assert next(lines) == ": connected"
        daemon.system.publish(
            "supervisor.child.failed", SupervisorChildChanged(child="cache", change="failed")
        )
        data = next(line for line in lines if line.startswith("data: "))
    event = json.loads(data.removeprefix("data: "))
    assert event["topic"] == "supervisor.child.failed"
    assert event["fields"]["child"] == "cache" and event["type"] == "supervisor.child_changed"


class DevTools:
    """Just enough of the Chrome DevTools Protocol: evaluate, screenshot."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv(timeout=10))
            if reply.get("id") == call_id:
                assert "error" not in reply, reply
                result: dict[str, Any] = reply["result"]
                return result

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed (apt-get install chromium)"
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process, profile
    finally:
        process.terminate()
        process.wait(10)


def test_headless_chromium_sees_every_manager_and_a_live_event(
    daemon: Daemon, chromium: tuple[subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    _, profile = chromium
    port_file = profile / "DevToolsActivePort"
    wait_until(lambda: port_file.exists() and port_file.read_text().strip(), timeout=20)
    port = int(port_file.read_text().split()[0])
    targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
    page = next(t for t in targets if t["type"] == "page")
    with ws_connect(page["webSocketDebuggerUrl"], max_size=None) as socket:
        tools = DevTools(socket)
        tools.call("Page.enable")
        tools.call("Page.navigate", url=daemon.url + "/")
        shown = {"system", "auth", "websocket"}
        rows = (
            "Object.fromEntries([...document.querySelectorAll('#managers tr')]"
            ".map(r => [r.id.slice(8), r.dataset.status]))"
        )
        statuses = wait_until(
            lambda: (found := tools.evaluate(rows)) and set(found) == shown and found, timeout=15
        )
        assert statuses == dict.fromkeys(shown, "healthy")
        wait_until(
            lambda: (
                tools.evaluate("document.getElementById('stream-state').textContent")
                == "events: live"
            ),
            timeout=10,
        )
        daemon.system.publish(
            "supervisor.child.restarted",
            SupervisorChildChanged(child="billing", change="restarted", restarts=3),
        )
        events = "document.getElementById('events').textContent"
        wait_until(lambda: "billing restarted" in (tools.evaluate(events) or ""), timeout=10)
        time.sleep(1.2)  # one more poll, so that the message rates show
        shot = tools.call("Page.captureScreenshot", format="png")
    screenshot = tmp_path / "dashboard.png"
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    assert screenshot.stat().st_size > 10_000
