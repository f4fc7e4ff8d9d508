"""The corral command as a subprocess: run, health, send, events, config check."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import click
import httpx
import msgspec
import pytest
import redis
from click.testing import CliRunner, Result

import corral
from corral import cli
from corral._wire import GROUP, record_key, stream_key
from corral.actors import BUILTIN
from corral.cli import main
from corral.config import BusSection, Config, DaemonSection, ManagerSection
from corral.daemon import Daemon
from corral.errors import InvalidMessage
from corral.messages.base import Request, message
from corral.messages.cache import CacheSet
from corral.messages.state import StateExpired, StateExpireDue
from corral.messages.system import Ping
from corral.messages.transaction import TransactionExpired, TransactionExpireIdle
from corral.messages.websocket import WsAttach, WsAttached, WsDetach, WsJoinRoom, WsTick
from tests.redis_server import RedisServer
from tests.support import (
    Done,
    Work,
    corral_command,
    read_until,
    run_corral,
    start_corral,
    wait_until,
)


def write_config(tmp_path: Path, redis_url: str, extra: str = "") -> Path:
    path = tmp_path / "corral.toml"
    path.write_text(
        f'[bus]\nbackend = "redis"\nurl = "{redis_url}"\nnamespace = "cli"\n'
        "[daemon]\nport = 0\nheartbeat_interval = 0.2\nheartbeat_ttl = 1.0\nclaim_idle = 1.0\n"
        '[managers.cache_like]\nclass_path = "tests.support:Worker"\n'
        'depends_on = ["system"]\n'
        '[managers.worker]\nclass_path = "tests.support:Worker"\n'
        'depends_on = ["cache_like"]\n' + extra
    )
    return path


def served_url(log: str) -> str:
    match = re.search(r"serving (http://\S+) ", log)
    assert match, log
    return match.group(1)


@pytest.fixture
def daemon(redis_server: RedisServer) -> Iterator[Daemon]:
    config = Config().replace(
        bus=BusSection(backend="redis", url=redis_server.url, namespace="cli"),
        daemon=DaemonSection(port=0, heartbeat_interval=0.2),
        managers={"worker": ManagerSection(class_path="tests.support:Worker")},
    )
    with Daemon(config) as running:
        yield running


def test_run_serves_health_and_stops_in_reverse_order_on_sigterm(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    process = start_corral("run", "-c", str(write_config(tmp_path, redis_server.url)))
    try:
        log = read_until(process, "running 3 managers")
        url = served_url(log)
        healthy = run_corral("health", "--url", url)
        assert healthy.returncode == 0, healthy.stderr
        assert healthy.stdout.startswith("healthy")
        assert "worker" in healthy.stdout
        metrics = httpx.get(f"{url}/metrics").text
        for name in ("system", "cache_like", "worker"):
            assert f'corral_manager_up{{manager="{name}"}} 1.0' in metrics
        assert "corral_bus_up 1.0" in metrics
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert process.stderr is not None
        rest = process.stderr.read()
        stops = re.findall(r"manager (\w+) stopped", rest)
        assert stops == ["worker", "cache_like", "system"]
        assert "stopped cleanly" in rest
    finally:
        process.kill()
        process.wait()


def test_redis_restarted_under_a_running_daemon(
    fresh_redis_server: RedisServer, tmp_path: Path
) -> None:
    process = start_corral("run", "-c", str(write_config(tmp_path, fresh_redis_server.url)))
    try:
        url = served_url(read_until(process, "running 3 managers"))

        def status() -> str:
            return str(httpx.get(f"{url}/health", timeout=5).json()["status"])

        assert status() == "healthy"
        fresh_redis_server.stop()
        wait_until(lambda: status() == "degraded", timeout=15)
        assert run_corral("health", "--url", url).returncode == 1
        fresh_redis_server.start()
        wait_until(lambda: status() == "healthy", timeout=20)
        with corral.connect(fresh_redis_server.url, namespace="cli") as remote:
            wait_until(lambda: _answers(remote), timeout=15)
    finally:
        process.kill()
        process.wait()


def _answers(remote: corral.Client) -> bool:
    try:
        return remote.ask(Work(), timeout=2).name == "worker"
    except corral.errors.CorralError:
        return False


def test_health_exit_codes(daemon: Daemon, redis_server: RedisServer) -> None:
    as_json = run_corral("health", "--url", daemon.url, "--json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["managers"]["worker"]["state"] == "running"
    nobody = run_corral("health", "--url", "http://127.0.0.1:9")
    assert nobody.returncode == 3
    assert "no daemon answering at http://127.0.0.1:9" in nobody.stderr


def test_health_exit_code_when_unhealthy(redis_server: RedisServer) -> None:
    config = Config().replace(
        bus=BusSection(backend="redis", url=redis_server.url, namespace="cli"),
        daemon=DaemonSection(port=0),
        managers={
            "worker": ManagerSection(
                class_path="tests.support:Worker", critical=True, restart="temporary"
            )
        },
    )
    with Daemon(config) as running:
        with corral.connect(redis_server.url, namespace="cli") as remote:
            remote.tell(Work(action="crash"))
        wait_until(lambda: running.system.health().status == "unhealthy")
        result = run_corral("health", "--url", running.url)
        assert result.returncode == 2
        assert result.stdout.startswith("unhealthy")
        assert "last error: RuntimeError: boom" in result.stdout


def test_send_builds_validates_and_prints_the_reply(
    daemon: Daemon, redis_server: RedisServer
) -> None:
    url = ["--url", redis_server.url, "-c", os.devnull, "--import", "tests.support"]
    env = {"CORRAL_BUS_NAMESPACE": "cli"}
    ping = run_corral("send", "system.ping", "payload=hello", *url, env=env)
    assert ping.returncode == 0, ping.stderr
    assert ping.stdout.strip() == 'system.pong payload="hello"'
    work = run_corral("send", "test.work", "action=refuse", "--json", *url, env=env)
    assert work.returncode == 1
    assert "error: not_found: nothing here" in work.stderr
    done = run_corral("send", "test.work", "seconds=0.01", "action=sleep", "--json", *url, env=env)
    assert json.loads(done.stdout)["fields"]["name"] == "worker"
    unknown = run_corral("send", "cache.gett", *url, env=env)
    assert unknown.returncode == 2
    assert "unknown message 'cache.gett' (did you mean cache.get?); known: " in unknown.stderr
    assert "system.ping" in unknown.stderr
    internal = run_corral("send", "ws.tick", *url, env=env)
    assert internal.returncode == 2
    assert "unknown message 'ws.tick'; known: " in internal.stderr
    assert "ws.tick" not in internal.stderr.partition("known: ")[2]
    bad = run_corral("send", "test.work", "seconds=soon", *url, env=env)
    assert bad.returncode == 2
    assert "test.work.seconds: expected float, got str" in bad.stderr
    no_field = run_corral("send", "system.ping", "colour=red", *url, env=env)
    assert "system.ping has no field 'colour'; fields: payload: bytes" in no_field.stderr


INTERNAL = (
    WsTick,
    WsAttach,
    WsAttached,
    WsDetach,
    StateExpireDue,
    StateExpired,
    TransactionExpireIdle,
    TransactionExpired,
)


def test_messages_lists_the_public_wire_types_only() -> None:
    imports = [f"--import=corral.messages.{area}" for area in ("websocket", "state", "transaction")]
    result = run_corral("messages", "-c", os.devnull, *imports)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if not line.startswith(" ")}
    assert {"ws.join_room", "state.get", "transaction.begin", "system.ping"} <= listed
    assert listed.isdisjoint(cls.type_name for cls in INTERNAL)
    assert all(cls.internal for cls in INTERNAL)
    assert not WsJoinRoom.internal


def test_events_prints_what_is_published(daemon: Daemon, redis_server: RedisServer) -> None:
    process = start_corral(
        "events",
        "supervisor.child.*",
        "--json",
        "--url",
        redis_server.url,
        "-c",
        os.devnull,
        env={"CORRAL_BUS_NAMESPACE": "cli"},
    )
    try:
        read_until(process, "following 'supervisor.child.*'")
        with corral.connect(redis_server.url, namespace="cli") as remote:
            deadline = time.monotonic() + 20
            assert process.stdout is not None
            remote.tell(Work(action="crash"))
            line = process.stdout.readline()
            while '"failed"' not in line and time.monotonic() < deadline:
                line = process.stdout.readline()
            event = json.loads(line)
            assert event["topic"] == "supervisor.child.failed"
            assert event["type"] == "supervisor.child_changed"
            assert event["fields"]["child"] == "worker"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
        process.wait()


def test_events_never_prints_a_reply(daemon: Daemon, redis_server: RedisServer) -> None:
    process = start_corral(
        "events", "*", "--json", "--url", redis_server.url, "-c", os.devnull,
        env={"CORRAL_BUS_NAMESPACE": "cli"},
    )  # fmt: skip
    try:
        read_until(process, "following '*'")
        assert process.stdout is not None
        with corral.connect(redis_server.url, namespace="cli") as remote:
            for n in range(5):
                assert remote.ask(Ping(payload=b"%d" % n)).payload == b"%d" % n
            remote.tell(Work(action="crash"))  # an event, published after the replies
            topics: list[str] = []
            while not topics or topics[-1] != "supervisor.child.failed":
                topics.append(json.loads(process.stdout.readline())["topic"])
        assert not [topic for topic in topics if topic.startswith("reply.")], topics
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_events_stops_cleanly_on_sigint_and_sigterm_even_started_in_the_background(
    redis_server: RedisServer, signum: int
) -> None:
    # A shell starts background jobs with SIGINT ignored, and Python then raises no
    # KeyboardInterrupt: ``corral events`` must stop all the same.
    ignoring_sigint = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    command = corral_command("events", "x.*", "--url", redis_server.url, "-c", os.devnull)
    process = subprocess.Popen(
        [sys.executable, "-c", ignoring_sigint, *command[1:]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        read_until(process, "following 'x.*'")
        process.send_signal(signum)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
        process.communicate()


def test_config_check_masks_secrets_and_names_sources(tmp_path: Path) -> None:
    path = tmp_path / "corral.toml"
    path.write_text('[codec]\nsigning_keys = ["hush"]\n[bus]\nurl = "redis://u:pw@db:6379/0"\n')
    result = run_corral(
        "config", "check", "-c", str(path), env={"CORRAL_SYSTEM_ASK_TIMEOUT": "2.5"}
    )
    assert result.returncode == 0, result.stderr
    assert "hush" not in result.stdout
    assert "pw@" not in result.stdout
    assert f'url = "redis://u:***@db:6379/0"  # file {path}' in result.stdout
    assert "ask_timeout = 2.5  # env CORRAL_SYSTEM_ASK_TIMEOUT" in result.stdout
    assert "max_restarts = 5  # default" in result.stdout


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "[managers.cache]\nnonsense = 1\n",
            "managers.cache.nonsense: not an option of the cache manager",
        ),
        (
            '[managers.ratelimit]\nrules = { ip = "100 per fortnight" }\n',
            "managers.ratelimit.rules.ip.limit: expected a limit like '100/minute' "
            "or '5/10 seconds', got '100 per fortnight'",
        ),
        (
            '[managers.auth]\nsigning_key = "short"\n',
            "managers.auth.signing_key: HS256 needs a secret of at least 32 bytes",
        ),
        ("[managers.state]\nhistory_limit = 0\n", "managers.state.history_limit: must be >= 1"),
        ("[managers.nosuch]\n", "managers.nosuch: unknown manager"),
        (
            '[managers.worker]\nclass_path = "tests.nowhere:Worker"\n',
            "managers.worker.class_path: cannot load 'tests.nowhere:Worker'",
        ),
        (
            '[managers.cache]\ndepends_on = ["db"]\n',
            "managers.cache.depends_on: no manager named 'db'",
        ),
        (
            '[managers.cache.backends.main]\ntype = "redis"\nurl = "http://db:6379/0"\n',
            "managers.cache.backends.main.url: unsupported scheme 'http': use one of redis, "
            "rediss, unix, redis+sentinel, rediss+sentinel (got 'http://db:6379/0')",
        ),
        (
            '[managers.state]\nredis_url = "htp://u:pw@db:6379/0"\n',
            "managers.state.redis_url: unsupported scheme 'htp': use one of redis, rediss, "
            "unix, redis+sentinel, rediss+sentinel (got 'htp://db:6379/0')",
        ),
        (
            '[bus]\nbackend = "redis"\nurl = "http://db:6379/0"\n',
            "bus.url: unsupported scheme 'http': use one of redis, rediss, unix, "
            "redis+sentinel, rediss+sentinel (got 'http://db:6379/0')",
        ),
    ],
)
def test_config_check_refuses_what_run_refuses(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "corral.toml"
    path.write_text(text)
    check = run_corral("config", "check", "-c", str(path))
    assert check.returncode == 2, check.stdout
    assert problem in check.stderr
    assert "pw@" not in check.stderr
    run = run_corral("run", "-c", str(path))
    assert run.returncode == 2, run.stderr
    assert problem in run.stderr
    assert "pw@" not in run.stderr


def test_every_built_in_manager_enabled_by_an_empty_table(tmp_path: Path) -> None:
    path = tmp_path / "corral.toml"
    path.write_text("".join(f"[managers.{name}]\n" for name in BUILTIN))
    check = run_corral("config", "check", "-c", str(path))
    assert check.returncode == 0, check.stderr
    for name in BUILTIN:
        assert f"[managers.{name}]\n" in check.stdout
    process = start_corral("run", "-c", str(path))
    try:
        log = read_until(process, f"running {len(BUILTIN)} managers")
        assert re.search(rf"running {len(BUILTIN)} managers in \d+ ms: {', '.join(BUILTIN)}\n", log)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


def test_run_flags_beat_the_file_and_unknown_corral_variables_are_warnings(
    tmp_path: Path,
) -> None:
    path = tmp_path / "corral.toml"
    path.write_text(
        '[daemon]\nhost = "192.0.2.1"\nport = 1\ndashboard_token = "a-token-of-16-chars-or-more"\n'
        '[log]\nlevel = "ERROR"\nformat = "plain"\n'
    )
    # Kubernetes sets these in every pod of a namespace with a Service named "corral".
    kubernetes = {"CORRAL_PORT": "tcp://10.0.0.7:8650", "CORRAL_SERVICE_HOST": "10.0.0.7"}
    args = ["-c", str(path), "--host", "127.0.0.1", "--port", "0", "--log-level", "INFO"]
    process = start_corral("run", *args, "--log-format", "json", env=kubernetes)
    try:
        lines = [
            json.loads(line) for line in read_until(process, "running 1 managers").splitlines()
        ]
        warned = [line["message"] for line in lines if line["level"] == "warning"]
        assert warned == [
            "env CORRAL_PORT: not a corral setting, ignored",
            "env CORRAL_SERVICE_HOST: not a corral setting, ignored",
        ]
        served = [line["message"] for line in lines if line["message"].startswith("serving ")]
        url = served_url(served[0])
        assert url.startswith("http://127.0.0.1:")
        assert not url.endswith(":1")
        assert httpx.get(f"{url}/health").json()["status"] == "healthy"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()
    check = run_corral("config", "check", "-c", str(path), env=kubernetes)
    assert check.returncode == 0, check.stderr
    assert check.stderr == (
        "corral: warning: env CORRAL_PORT: not a corral setting, ignored\n"
        "corral: warning: env CORRAL_SERVICE_HOST: not a corral setting, ignored\n"
    )
    flagged = run_corral("config", "check", "-c", str(path), "--port", "8651")
    assert flagged.returncode == 0, flagged.stderr
    assert "port = 8651  # flag --port\n" in flagged.stdout
    assert f'host = "192.0.2.1"  # file {path}\n' in flagged.stdout
    for command in (["run"], ["config", "check"]):
        bad_port = run_corral(*command, *args[:4], "--port", "70000")
        assert bad_port.returncode == 2
        assert "flag --port: daemon.port: must be <= 65535, got 70000" in bad_port.stderr


def test_empty_manager_tables_enable_the_managers(tmp_path: Path) -> None:
    path = tmp_path / "corral.toml"
    path.write_text("[managers.cache]\n[managers.state]\n[managers.pool]\nenabled = false\n")
    check = run_corral("config", "check", "-c", str(path))
    assert check.returncode == 0, check.stderr
    assert "[managers.cache]\nenabled = true  # default\n" in check.stdout
    assert "[managers.state]\nenabled = true  # default\n" in check.stdout
    assert f"[managers.pool]\nenabled = false  # file {path}\n" in check.stdout
    process = start_corral("run", "-c", str(path))
    try:
        log = read_until(process, "running 3 managers")
        assert re.search(r"running 3 managers in \d+ ms: system, cache, state\n", log), log
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


def test_a_request_a_killed_daemon_had_started_is_refused_by_another_not_run_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    config = str(write_config(tmp_path, redis_server.url))
    daemons: dict[str, subprocess.Popen[str]] = {}
    for _ in range(2):
        process = start_corral("run", "-c", config)
        log = read_until(process, "running 3 managers")
        match = re.search(r"daemon (\w+) serves remote requests", log)
        assert match, log
        daemons[match.group(1)] = process
    try:
        with corral.connect(redis_server.url, namespace="cli") as remote:
            outcome: list[object] = []

            def slow_request() -> None:
                try:
                    outcome.append(remote.ask(Work(action="sleep", seconds=1.0), timeout=15))
                except corral.errors.CorralError as exc:
                    outcome.append(exc)

            caller = threading.Thread(target=slow_request)
            caller.start()
            holder = wait_until(lambda: _holder(redis_server.url, stream_key("cli", "worker")))
            # Taken is not started: the holder records the start right before the handler.
            wait_until(lambda: _started(redis_server.url, "cli", "worker"))
            victim = daemons[holder]
            victim.kill()
            assert victim.wait(timeout=10) == -signal.SIGKILL
            caller.join(20)
            assert not caller.is_alive()  # never hangs
            (reply,) = outcome
            # The other daemon claimed it, found it started, and said so rather than
            # running it a second time.
            assert isinstance(reply, corral.errors.ManagerUnavailable), reply
            assert reply.details["outcome"] == "unknown"
    finally:
        for process in daemons.values():
            process.kill()
            process.wait()


def _holder(url: str, stream: str) -> str | None:
    """The daemon id (consumer) holding a pending request on ``stream``, if any."""
    with redis.Redis.from_url(url) as client:
        pending = client.xpending(stream, GROUP)
    consumers = pending.get("consumers") or []
    if not consumers:
        return None
    name = consumers[0]["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _started(url: str, namespace: str, manager: str) -> bool:
    """Whether a daemon has recorded the start of a request to ``manager``."""
    pattern = record_key(namespace, manager, b"") + "*"  # any request id
    with redis.Redis.from_url(url) as client:
        return any(True for _ in client.scan_iter(match=pattern))


def test_timeouts_and_bounds_are_checked_before_anything_is_sent(tmp_path: Path) -> None:
    runner = CliRunner()  # in process: every case below fails before any connection

    def corral_(*args: str) -> Result:
        return runner.invoke(main, list(args), catch_exceptions=False)

    url = ["--url", "redis://127.0.0.1:1/0", "-c", os.devnull]
    for value in ("nan", "inf", "-inf", "-1", "1e999", "86401"):
        sent = corral_("send", "system.ping", "--timeout", value, *url)
        assert sent.exit_code == 2, sent.output
        assert "Invalid value for '--timeout': must be >= 0 and <= 86400 s" in sent.stderr
    ban = ("ratelimit.ban", "level=ip", "identifier=1.2.3.4", "duration=1e999")
    banned = corral_("send", *ban, *url)
    assert banned.exit_code == 2
    assert "ratelimit.ban.duration: must be >= 0 and <= 315360000 s, got inf" in banned.stderr
    cost = corral_("send", "ratelimit.check", "ip=1.2.3.4", "cost=99999999999999999999999", *url)
    assert cost.exit_code == 2
    assert "ratelimit.check.cost: must be >= 0 and <= 1000000000" in cost.stderr
    config = tmp_path / "corral.toml"
    config.write_text("[system]\nask_timeout = inf\n")
    checked = corral_("config", "check", "-c", str(config))
    assert checked.exit_code == 2
    assert f"{config}: system.ask_timeout: must be <= 86400, got inf" in checked.stderr
    listed = corral_("messages", "-c", os.devnull)
    assert listed.exit_code == 0, listed.output
    assert "    ttl: float (> 0, <= 315360000 s) | None (optional)" in listed.stdout
    assert "    duration: float (>= 0, <= 315360000 s) (optional)" in listed.stdout
    assert "    cost: int (>= 0, <= 1000000000) (optional)" in listed.stdout
    assert "Every float is finite" in listed.stderr


def _command_paths(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [path]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            paths += _command_paths(command, (*path, name))
        else:
            paths.append((*path, name))
    return paths


@pytest.mark.parametrize("path", _command_paths(cli.main), ids=" ".join)
def test_h_is_help_on_every_command(path: tuple[str, ...]) -> None:
    runner = CliRunner()
    short = runner.invoke(cli.main, [*path, "-h"], prog_name="corral")
    assert short.exit_code == 0, short.output
    assert short.output.startswith(f"Usage: {' '.join(('corral', *path))} ")
    assert short.output == runner.invoke(cli.main, [*path, "--help"], prog_name="corral").output


@message("test.typed")
class Typed(Request[Done]):
    """One field of each kind ``corral send`` reads from the command line."""

    manager = "worker"
    count: int = 0
    ratio: float = 0.0
    flag: bool = False
    label: str = ""
    mode: Literal["fast", "slow"] = "fast"
    limit: int | None = None
    data: Any = None
    tags: list[str] = msgspec.field(default_factory=list)
    raw: bytes = b""


def test_send_reads_each_value_as_its_field_declares() -> None:
    pairs = (
        "count=01234", "ratio=2", "flag=true", "label=007", "mode=slow", "limit=null",
        "data=01234", 'tags=["a", "b"]', "raw=bytes",
    )  # fmt: skip
    assert cli.build_message("test.typed", pairs) == Typed(
        count=1234, ratio=2.0, flag=True, label="007", mode="slow", limit=None,
        data="01234", tags=["a", "b"], raw=b"bytes",
    )  # fmt: skip
    assert cli.build_message("test.typed", ("limit=7",)) == Typed(limit=7)
    # ``data`` may hold any value: FIELD=VALUE gives it the text, FIELD:=JSON a JSON value.
    assert cli.build_message("test.typed", ("data=1234",)) == Typed(data="1234")
    assert cli.build_message("test.typed", ("data:=1234",)) == Typed(data=1234)
    assert cli.build_message("test.typed", ('data:={"a": [1, null]}',)) == Typed(
        data={"a": [1, None]}
    )
    with pytest.raises(InvalidMessage, match=r"test\.typed\.count: expected int, got str"):
        cli.build_message("test.typed", ("count=many",))
    with pytest.raises(InvalidMessage, match=r"data:=\{: not JSON"):
        cli.build_message("test.typed", ("data:={",))


def test_send_takes_a_whole_message_as_one_json_object() -> None:
    assert cli.build_message("cache.set", ('{"key": "k", "value": "01234"}',)) == CacheSet(
        key="k", value="01234"
    )
    assert cli.build_message("system.ping", ('{"payload": "hi"}',)) == Ping(payload=b"hi")
    with pytest.raises(InvalidMessage, match=r"cache\.set needs key"):
        cli.build_message("cache.set", ('{"value": 1}',))
    with pytest.raises(InvalidMessage, match="either one JSON object or FIELD=VALUE pairs"):
        cli.build_message("cache.set", ('{"key": "k"}', "value=1"))


def test_send_suggests_the_field_meant() -> None:
    with pytest.raises(InvalidMessage, match=r"no field 'paylod' \(did you mean payload\?\)"):
        cli.build_message("system.ping", ("paylod=x",))


def test_send_and_events_take_the_namespace_and_say_where_they_looked(
    daemon: Daemon, redis_server: RedisServer
) -> None:
    url = ["--url", redis_server.url, "-c", os.devnull]
    found = run_corral("send", "system.ping", "payload=x", *url, "--namespace", "cli")
    assert found.returncode == 0, found.stderr
    lost = run_corral("send", "system.ping", "payload=x", *url, "--namespace", "elsewhere")
    assert lost.returncode == 1
    assert (
        f"no corral daemon is serving system at {redis_server.url} in namespace 'elsewhere'"
        in lost.stderr
    )
    process = start_corral("events", "x.*", *url, "--namespace", "cli")
    try:
        read_until(process, f"following 'x.*' at {redis_server.url} in namespace 'cli'")
    finally:
        process.kill()
        process.wait()


def test_config_check_prints_toml_that_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "corral.toml"
    path.write_text(
        '[bus]\nurl = "redis://u:pw@db:6379/0"\n'
        '[managers.worker]\nclass_path = "tests.support:Worker"\n'
        'note = "tab\\t, delete\\u007f, quote\\", \\u00e9"\n'
        'nested = { a = { b = [1, 2.5], "odd key" = true } }\n'
    )
    check = run_corral("config", "check", "-c", str(path))
    assert check.returncode == 0, check.stderr
    listed = tomllib.loads(check.stdout)
    worker = listed["managers"]["worker"]
    assert worker["note"] == 'tab\t, delete\x7f, quote", \u00e9'
    assert worker["nested"] == {"a": {"b": [1, 2.5], "odd key": True}}
    assert "placement" not in worker  # not set: said in a comment
    assert "# placement: not set  # default" in check.stdout
    assert listed["bus"]["url"] == "redis://u:***@db:6379/0"
    again = tmp_path / "again.toml"
    again.write_text(check.stdout)
    recheck = run_corral("config", "check", "-c", str(again))
    assert recheck.returncode == 0, recheck.stderr
    assert tomllib.loads(recheck.stdout) == listed
