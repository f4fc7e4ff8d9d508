"""A private redis-server for tests, on a free loopback port.

::

    with RedisServer() as server:                  # extra args: RedisServer("--appendonly", "yes")
        client = redis.Redis.from_url(server.url)
        server.restart()                           # same port, same data directory
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

INSTALL_HINT = (
    "redis-server is not on PATH: install it (Debian/Ubuntu: `sudo apt-get install "
    "redis-server`, macOS: `brew install redis`, or `make redis-server`)"
)


class RedisServerNotFound(RuntimeError):
    """No redis-server binary on PATH."""


class RedisServer:
    """A redis-server subprocess bound to 127.0.0.1, without persistence unless asked.

    ``args`` are appended to the command line and override the defaults
    (``--save '' --appendonly no``). The server starts at once and answers PING
    when the constructor returns.
    """

    START_TIMEOUT = 10.0

    def __init__(self, *args: str, port: int | None = None) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RedisServerNotFound(INSTALL_HINT)
        self.executable = executable
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="corral-redis-"))
        self.port = port or _free_port()
        self._fixed_port = port is not None
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server (on the same port as before) and wait until it answers PING."""
        if self.running:
            return
        for _ in range(3):
            if self._spawn():
                return
            if self._fixed_port or "Address already in use" not in self.log():
                break
            self.port = _free_port()  # another process took the port meanwhile
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{self.log()}")

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM) and wait for the process to exit."""
        self._signal_and_wait(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the process (SIGKILL): clients see their connections reset."""
        self._signal_and_wait(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open but nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Kill the server and remove its directory."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} {'running' if self.running else 'stopped'}>"

    def _spawn(self) -> bool:
        command = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", "redis.log",
            *self.args,
        ]  # fmt: skip
        (self.dir / "redis.log").unlink(missing_ok=True)
        self.process = subprocess.Popen(command, cwd=self.dir, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if _answers_ping(self.port):
                return True
            time.sleep(0.005)
        self.kill()
        return False

    def _signal_and_wait(self, signum: int) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        process.wait(timeout=10)


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(16)
            # A password-protected server answers NOAUTH: it is up all the same.
            return answer.startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
