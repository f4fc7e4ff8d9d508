"""Real ``corral run`` processes for multi-daemon tests: start several on one config,
read their logs, signal them, and wait for them to exit.

::

    with DaemonGroup(tmp_path, config_toml, count=3) as group:
        client = corral.connect(redis_url, namespace="ns")
        group.signal(0, signal.SIGTERM)
        assert group.wait(0) == 0
        assert "stopped cleanly" in group.log(0)
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from corral._closing import Closing
from tests.support import start_corral

__all__ = ["DaemonGroup", "DaemonProcess", "redis_daemons_config"]

_SERVING = re.compile(r"serving (http://[\d.]+:\d+)")
_DAEMON_ID = re.compile(r"daemon (\w+) serves remote requests")


class DaemonProcess:
    """One ``corral run``: its stderr collected line by line in the background."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.process = start_corral("run", "--config", str(config), env=env)
        self.lines: list[str] = []
        self.http_url = ""
        self.daemon_id = ""
        """Its id among the daemons (the consumer name on the request streams)."""
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line)
                found = _SERVING.search(line)
                if found:
                    self.http_url = found.group(1)
                named = _DAEMON_ID.search(line)
                if named:
                    self.daemon_id = named.group(1)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 30.0) -> str:
        """Wait until a log line holds ``needle``; return the log so far."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(needle in line for line in self.lines):
                remaining = deadline - time.monotonic()
                ended = self.process.poll() is not None and not self._reader.is_alive()
                if remaining <= 0 or ended:
                    raise AssertionError(f"{needle!r} not logged; got:\n{''.join(self.lines)}")
                self._changed.wait(min(remaining, 0.2))
            return "".join(self.lines)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def health(self) -> tuple[int, dict[str, Any]]:
        """``GET /health?fresh=1``: the HTTP status and the document, asked of every actor."""
        response = httpx.get(f"{self.http_url}/health?fresh=1", timeout=10)
        return response.status_code, response.json()

    def wait(self, timeout: float = 30.0) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()


class DaemonGroup(Closing):
    """``count`` daemons started from one TOML config, each on its own HTTP port."""

    def __init__(
        self, directory: Path, config: str, *, count: int = 3, env: dict[str, str] | None = None
    ) -> None:
        self.config = directory / "corral.toml"
        self.config.write_text(config)
        self.env = env
        self.daemons: list[DaemonProcess] = []
        for _ in range(count):
            self.add()

    def add(self) -> DaemonProcess:
        """Start one more daemon on the same config and wait until it serves."""
        daemon = DaemonProcess(self.config, self.env)
        self.daemons.append(daemon)
        try:
            daemon.wait_for(" managers in ")
            if 'backend = "redis"' in self.config.read_text():
                daemon.wait_for("serves remote requests")
        except AssertionError:
            self.close()
            raise
        return daemon

    def __getitem__(self, index: int) -> DaemonProcess:
        return self.daemons[index]

    def signal(self, index: int, signum: int = signal.SIGTERM) -> None:
        self.daemons[index].signal(signum)

    def wait(self, index: int, timeout: float = 30.0) -> int:
        return self.daemons[index].wait(timeout)

    def by_id(self, daemon_id: str) -> DaemonProcess:
        return next(d for d in self.daemons if d.daemon_id == daemon_id)

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.close()


def redis_daemons_config(url: str, namespace: str, managers: str = "", extra: str = "") -> str:
    """A TOML config for daemons sharing ``url`` under ``namespace``; ``managers`` is appended."""
    return (
        f'[bus]\nbackend = "redis"\nurl = "{url}"\nnamespace = "{namespace}"\n'
        f"[daemon]\nport = 0\n{extra}\n{managers}\n"
    )
