"""Logs of ``corral run``: with ``log.format = "json"``, every line it prints is one JSON
object, configuration errors included."""

from __future__ import annotations

import datetime
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from corral._logging import early_format
from tests.operations import BusyDaemon
from tests.support import read_until, run_corral, start_corral

FIELDS = {"time", "level", "logger", "message", "pid"}


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON object, failing on the first that is not one."""
    found = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(record, dict), line
        assert record.keys() >= FIELDS, line
        assert datetime.datetime.fromisoformat(record["time"]).tzinfo is not None, line
        found.append(record)
    assert found, "no line at all"
    return found


def test_every_line_under_traffic_is_one_json_object(busy_daemon: BusyDaemon) -> None:
    records = json_lines(busy_daemon.daemon.log)
    process = busy_daemon.daemon.process
    assert {record["pid"] for record in records} == {process.pid}
    assert {record.get("daemon") for record in records} == {busy_daemon.daemon.daemon_id}
    # What a manager logs while it handles a remote request carries the request.
    reused = next(r for r in records if "reused" in r["message"])
    assert reused["manager"] == "auth"
    assert reused["message_type"] == "auth.refresh"
    assert len(reused["correlation_id"]) == 32
    # Junk is logged (once) as a warning; libraries say nothing under WARNING.
    assert any(r["message"].startswith("rejected remote input") for r in records)
    chatty = [r for r in records if not r["logger"].startswith(("corral", "py.warnings"))]
    assert all(r["level"] in ("warning", "error", "critical") for r in chatty), chatty


def test_a_daemon_logs_json_until_it_stops() -> None:
    process = start_corral("run", "--log-format", "json")
    try:
        log = read_until(process, "running 1 managers")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert process.stderr is not None
        records = json_lines(log + process.stderr.read())
    finally:
        process.kill()
        process.wait()
    assert records[-1]["message"] == "stopped cleanly"
    assert any(r["message"] == "manager system stopped" for r in records)


@pytest.mark.parametrize(
    ("config", "args", "env", "says"),
    [
        ('[log]\nformat = "json"\n[supervisor]\nmax_restarts = -1\n', (), {},
         "supervisor.max_restarts: must be >= 0"),
        ("[log\nformat = ", (), {"CORRAL_LOG_FORMAT": "json"}, "invalid TOML"),
        ("", ("--log-format", "json"), {"CORRAL_SUPERVISOR_MAX_RESTARTS": "many"},
         "env CORRAL_SUPERVISOR_MAX_RESTARTS: supervisor.max_restarts: expected int"),
        ("", ("--log-format", "json", "--port", "eighty"), {}, "'eighty' is not a valid integer"),
        ('[log]\nformat = "json"\n[managers.nothing]\n', (), {},
         "managers.nothing: unknown manager"),
    ],
    ids=["bad-value-in-file", "broken-toml", "bad-env", "bad-flag", "unknown-manager"],
)  # fmt: skip
def test_configuration_errors_are_json_lines_too(
    tmp_path: Path, config: str, args: tuple[str, ...], env: dict[str, str], says: str
) -> None:
    path = tmp_path / "corral.toml"
    path.write_text(config)
    ran = run_corral("run", "-c", str(path), *args, env=env)
    assert ran.returncode == 2, ran.stderr
    records = json_lines(ran.stderr)
    assert any(says in r["message"] and r["level"] == "critical" for r in records), records


def test_the_format_before_the_config_is_read(tmp_path: Path) -> None:
    plain, json_file, broken = (tmp_path / name for name in ("p.toml", "j.toml", "b.toml"))
    plain.write_text('[log]\nformat = "plain"\n')
    json_file.write_text('[log]\nformat = "json"\n')
    broken.write_text("[log\n")
    env = {"CORRAL_LOG_FORMAT": "json"}
    assert early_format("plain", str(json_file), env) == "plain"  # the flag first
    assert early_format(None, str(plain), env) == "plain"  # then the file
    assert early_format(None, str(broken), env) == "json"  # then the environment
    assert early_format(None, None, {"CORRAL_CONFIG": str(json_file)}) == "json"
    assert early_format(None, None, {}) == "plain"
