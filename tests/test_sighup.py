"""SIGHUP: a running daemon takes new log settings and rate-limit rules, dropping nothing."""

from __future__ import annotations

import signal
import threading
import uuid
from pathlib import Path

import corral
from corral.config import Config, DaemonSection, ManagerSection
from corral.daemon import Daemon
from corral.errors import CorralError
from corral.messages.ratelimit import RatelimitCheck
from corral.messages.system import Ping
from tests.daemons import DaemonGroup, redis_daemons_config
from tests.redis_server import RedisServer


def _config(url: str, namespace: str, limit: str, level: str, port: int = 0) -> str:
    return redis_daemons_config(
        url,
        namespace,
        f'[log]\nlevel = "{level}"\n[managers.ratelimit.rules]\nip = "{limit}"\n',
    ).replace("port = 0", f"port = {port}")


def test_sighup_changes_the_log_level_and_a_rule_without_dropping_a_request(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    namespace = f"hup{uuid.uuid4().hex[:8]}"
    url = redis_server.url
    with (
        DaemonGroup(tmp_path, _config(url, namespace, "2/minute", "INFO"), count=1) as group,
        corral.connect(url, namespace=namespace) as remote,
    ):
        decisions = [remote.ask(RatelimitCheck(ip="10.0.0.1")).allowed for _ in range(3)]
        assert decisions == [True, True, False]

        failures: list[BaseException] = []
        answered = 0
        done = threading.Event()

        def keep_asking() -> None:
            nonlocal answered
            while not done.is_set():
                try:
                    remote.ask(Ping(payload=b"p"))
                    answered += 1
                except CorralError as exc:
                    failures.append(exc)

        caller = threading.Thread(target=keep_asking)
        caller.start()
        group.config.write_text(_config(url, namespace, "100/minute", "DEBUG", port=1))
        group.signal(0, signal.SIGHUP)
        log = group[0].wait_for("SIGHUP: these take effect on restart only")
        assert "reloaded log.level, managers.ratelimit.rules" in log
        assert "take effect on restart only: daemon.port" in log
        group[0].wait_for("DEBUG corral: SIGHUP: logging at DEBUG")
        assert remote.ask(RatelimitCheck(ip="10.0.0.1")).allowed  # the new rule
        done.set()
        caller.join(10)
        assert failures == [] and answered > 0
        assert group[0].process.poll() is None
        assert "Traceback" not in group[0].log


def test_sighup_with_a_broken_config_changes_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    namespace = f"hup{uuid.uuid4().hex[:8]}"
    url = redis_server.url
    with (
        DaemonGroup(tmp_path, _config(url, namespace, "1/minute", "INFO"), count=1) as group,
        corral.connect(url, namespace=namespace) as remote,
    ):
        group.config.write_text(_config(url, namespace, "100 per fortnight", "INFO"))
        group.signal(0, signal.SIGHUP)
        group[0].wait_for("SIGHUP: the configuration is not valid, nothing changed")
        assert remote.ask(RatelimitCheck(ip="10.0.0.2")).allowed
        assert not remote.ask(RatelimitCheck(ip="10.0.0.2")).allowed  # still 1/minute
        assert group[0].process.poll() is None


def test_a_reload_leaves_the_options_of_a_manager_not_run_here_for_the_next_start() -> None:
    before = Config().replace(
        daemon=DaemonSection(port=0), managers={"cache": ManagerSection(enabled=False)}
    )
    after = before.replace(
        managers={"cache": ManagerSection(enabled=False, options={"default_backend": "memory"})}
    )
    with Daemon(before) as daemon:
        assert daemon.reload(after) == ([], ["managers.cache.default_backend"])
        assert daemon.system.supervisor.names == ["system"]
