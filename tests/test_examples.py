"""The examples run as their README section says."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from corral.config import BusSection, Config, DaemonSection, ManagerSection
from corral.daemon import Daemon
from corral.messages.state import StateRegister
from tests.redis_server import RedisServer


@pytest.fixture
def daemon(redis_server: RedisServer) -> Iterator[Daemon]:
    config = Config().replace(
        bus=BusSection(backend="redis", url=redis_server.url, namespace="ex"),
        daemon=DaemonSection(port=0),
        managers={"cache": ManagerSection(), "state": ManagerSection()},
    )
    with Daemon(config) as running:
        yield running


def exercise(app_module: str) -> None:
    module = importlib.import_module(app_module)
    client = module.app.test_client()
    assert client.get("/cache/a").status_code == 404
    assert client.put("/cache/a", json={"value": {"n": 1}}).status_code == 201
    assert client.get("/cache/a").get_json() == {"key": "a", "value": {"n": 1}}
    assert client.delete("/cache/a").get_json() == {"deleted": 1}
    assert client.get("/health").get_json() == {"status": "healthy"}


def test_flask_embedded() -> None:
    exercise("examples.flask_embedded")
    importlib.import_module("examples.flask_embedded").system.stop()


def test_flask_remote(
    daemon: Daemon, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_URL", redis_server.url)
    monkeypatch.setenv("CORRAL_NAMESPACE", "ex")
    sys.modules.pop("examples.flask_remote", None)
    exercise("examples.flask_remote")
    importlib.import_module("examples.flask_remote").client.close()


def test_subscriber(daemon: Daemon, redis_server: RedisServer) -> None:
    daemon.system.ask(StateRegister(state_id="u1", state_type="User"))
    result = subprocess.run(
        [sys.executable, "-m", "examples.subscriber", "state.changed.*", "--url", redis_server.url,
         "--namespace", "ex", "--from-offset", "0", "--count", "1"],
        capture_output=True, text=True, timeout=30, env=dict(os.environ), check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0] == "following 'state.changed.*'"
    assert lines[1].startswith("state.changed.User.u1 StateChanged(state_id='u1'")
