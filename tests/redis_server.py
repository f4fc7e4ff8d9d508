"""A private redis-server for tests, on a free loopback port.

::

    with RedisServer() as server:                  # extra args: RedisServer("--appendonly", "yes")
        client = redis.Redis.from_url(server.url)
        server.restart()                           # same port, same data directory
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

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

    def _command(self) -> list[str]:
        return [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", "redis.log",
            *self.args,
        ]  # fmt: skip

    def _spawn(self) -> bool:
        (self.dir / "redis.log").unlink(missing_ok=True)
        self.process = subprocess.Popen(self._command(), cwd=self.dir, stdin=subprocess.DEVNULL)
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


class SentinelServer(RedisServer):
    """A redis-server in Sentinel mode watching ``master_port`` as service ``service``."""

    def __init__(self, master_port: int, *, service: str = "corral", quorum: int = 2) -> None:
        self.master_port = master_port
        self.service = service
        self.quorum = quorum
        super().__init__()

    def _command(self) -> list[str]:
        config = self.dir / "sentinel.conf"
        if not config.exists():  # Sentinel rewrites its file: keep what it learnt on restart
            config.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile redis.log\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.service} 2000\n"
                f"sentinel failover-timeout {self.service} 10000\n"
            )
        return [self.executable, str(config), "--sentinel"]


class SentinelGroup:
    """A master, a replica and three sentinels on free loopback ports.

    ``url`` is the ``redis+sentinel://`` URL of the group; ``master()`` asks the
    sentinels which server is the master now.
    """

    SERVICE = "corral"

    def __init__(self) -> None:
        self.servers = [RedisServer()]
        self.servers.append(RedisServer("--replicaof", "127.0.0.1", str(self.servers[0].port)))
        self.sentinels = [SentinelServer(self.servers[0].port, service=self.SERVICE)]
        self.sentinels += [SentinelServer(self.servers[0].port, service=self.SERVICE)
                           for _ in range(2)]  # fmt: skip
        self.wait_until_settled()

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.SERVICE}/0"

    def master(self) -> RedisServer:
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            with contextlib.suppress(OSError, ValueError):
                port = _sentinel_master_port(sentinel.port, self.SERVICE)
                return next(s for s in self.servers if s.port == port)
        raise RuntimeError("no sentinel names a master")

    def replica(self) -> RedisServer:
        master = self.master()
        return next(s for s in self.servers if s is not master)

    def wait_until_settled(self, timeout: float = 30.0) -> None:
        """Until every sentinel knows the master, the replica and the other sentinels,
        and the replica is in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                settled = True
                for sentinel in self.sentinels:
                    with redis.Redis(port=sentinel.port, protocol=2) as client:
                        info = client.sentinel_master(self.SERVICE)
                        settled &= (
                            int(info["num-other-sentinels"]) == len(self.sentinels) - 1
                            and int(info["num-slaves"]) >= 1
                            and "s_down" not in info["flags"]
                            and "o_down" not in info["flags"]
                        )
                with redis.Redis(port=self.replica().port, protocol=2) as client:
                    settled &= client.info("replication")["master_link_status"] == "up"
                if settled:
                    return
            except (redis.RedisError, OSError, RuntimeError, KeyError):
                pass
            time.sleep(0.1)
        raise RuntimeError("the Sentinel group did not settle")

    def flushall(self) -> None:
        with redis.Redis(port=self.master().port, protocol=2) as client:
            client.flushall()
            client.wait(1, 2000)

    def close(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.close()


def _sentinel_master_port(port: int, service: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(f"SENTINEL get-master-addr-by-name {service}\r\n".encode())
        answer = sock.recv(256).decode()
    # *2 $9 127.0.0.1 $4 6379
    return int(answer.split("\r\n")[4])


class ClusterGroup:
    """A Redis Cluster of 3 masters and 3 replicas on free loopback ports."""

    def __init__(self, masters: int = 3) -> None:
        self.servers = [
            RedisServer(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                # Fail over whatever the replica's data age: test masters are often idle.
                "--cluster-replica-validity-factor",
                "0",
                port=_free_cluster_port(),
            )
            for _ in range(masters * 2)
        ]
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RedisServerNotFound(INSTALL_HINT)
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in self.servers),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.wait_until_ok()

    @property
    def url(self) -> str:
        return self.servers[0].url

    def node_url(self, index: int) -> str:
        return self.servers[index].url

    def masters(self) -> list[RedisServer]:
        found = []
        for server in self.servers:
            if not server.running:
                continue
            with (
                contextlib.suppress(redis.RedisError, OSError),
                redis.Redis(port=server.port, protocol=2) as client,
            ):
                if client.execute_command("ROLE")[0] in (b"master", "master"):
                    found.append(server)
        return found

    def wait_until_ok(self, timeout: float = 30.0) -> None:
        """Until every running node sees the cluster ok with every slot served, and every
        replica is in sync with its master."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ok = True
                for server in self.servers:
                    if not server.running:
                        continue
                    with redis.Redis(port=server.port, protocol=2) as client:
                        info = client.cluster("info")
                        ok &= info["cluster_state"] == "ok"
                        ok &= int(info["cluster_slots_ok"]) == 16384
                        replication = client.info("replication")
                        if replication["role"] == "slave":  # synced, so it can take over
                            ok &= replication["master_link_status"] == "up"
                if ok:
                    return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError("the cluster did not become ok")

    def flushall(self) -> None:
        for server in self.masters():
            with redis.Redis(port=server.port, protocol=2) as client:
                client.flushall()

    def close(self) -> None:
        for server in self.servers:
            server.close()


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = random.randrange(20_000, 55_000)
        with socket.socket() as first, socket.socket() as bus:
            try:
                first.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port
