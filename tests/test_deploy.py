"""The recipes in deploy/, each checked with the real tool where it installs here.

- Prometheus config and alert rules: ``promtool check config``, ``check rules`` and
  ``test rules`` (their unit tests, deploy/prometheus/alerts.test.yml);
- the Grafana dashboard: its structure, each expression through ``promtool`` (as a
  recording rule) and every metric it names present on a live daemon;
- the systemd unit: ``systemd-analyze verify`` (where systemd is installed), and a stop
  timeout above what a drain takes;
- the compose file: ``docker compose config`` or ``docker-compose config`` when either
  is installed, and always its structure (a Sentinel group and two daemons) by a YAML
  parse; its daemons' config through corral's own loader;
- the Dockerfile: a slim, non-root final stage whose HEALTHCHECK, run against a live
  daemon, passes (and fails against a port nobody serves).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from corral.config import DaemonSection, SupervisorSection, load_config
from tests.operations import BUILT_IN_MANAGERS, BusyDaemon, promtool

DEPLOY = Path(__file__).parent.parent / "deploy"
PROMETHEUS = DEPLOY / "prometheus"

_IDENTIFIER = re.compile(r"\b((?:corral|process|python)_[a-z0-9_]+)\b")


def run(
    *command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True, text=True, timeout=120, cwd=cwd, env=env, check=False,
    )  # fmt: skip


def test_prometheus_config_and_alert_rules_pass_promtool() -> None:
    for command in (
        ("check", "config", PROMETHEUS / "prometheus.yml"),
        ("check", "rules", PROMETHEUS / "alerts.yml"),
        ("test", "rules", PROMETHEUS / "alerts.test.yml"),
    ):
        checked = run(promtool(), *command)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def families_on(busy: BusyDaemon) -> set[str]:
    """Every family a live daemon exports, and every sample name (histograms' _bucket,
    _sum and _count)."""
    text = httpx.get(f"{busy.url}/metrics", timeout=10).text
    declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    return declared | {name for name, _ in busy.scrape()}


def named_metrics(expression: str) -> set[str]:
    """The metric names an expression reads (``corral_*``, ``process_*``, ``python_*``)."""
    return set(_IDENTIFIER.findall(expression))


def test_alert_rules_read_metrics_a_daemon_exports(busy_daemon: BusyDaemon) -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    exported = families_on(busy_daemon)
    named = {
        name for group in rules["groups"] for rule in group["rules"]
        for name in named_metrics(rule["expr"])
    }  # fmt: skip
    assert named and named - exported == set()


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every panel's PromQL, Grafana's variables given plain values."""
    expressions = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expression = target["expr"].replace("$__rate_interval", "5m")
            expression = expression.replace("$__range", "1h").replace("$instance", ".*")
            expressions.append(expression.replace("$job", "corral"))
    return expressions


def test_the_grafana_dashboard_is_well_formed() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "corral.json").read_text())
    assert dashboard["title"] and dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"job", "instance"} <= variables.keys()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    boxes = []
    for panel in dashboard["panels"]:
        assert panel["type"] in ("row", "timeseries", "stat", "gauge", "table"), panel
        box = panel["gridPos"]
        assert all(isinstance(box[k], int) for k in "xywh"), panel
        assert box["x"] >= 0 and box["x"] + box["w"] <= 24, panel
        boxes.append((box["x"], box["y"], box["w"], box["h"]))
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            refs = [target["refId"] for target in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), panel["title"]
    for i, (x, y, w, h) in enumerate(boxes):  # no two panels overlap
        for x2, y2, w2, h2 in boxes[i + 1 :]:
            assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y


def test_the_dashboard_expressions_parse_and_read_exported_metrics(
    busy_daemon: BusyDaemon, tmp_path: Path
) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "corral.json").read_text())
    expressions = dashboard_expressions(dashboard)
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:panel_{i}", "expr": e} for i, e in enumerate(expressions)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = run(promtool(), "check", "rules", path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    exported = families_on(busy_daemon)
    named = set().union(*(named_metrics(e) for e in expressions))
    assert named - exported == set()
    # Each built-in manager has a panel of its own figures.
    for manager in BUILT_IN_MANAGERS:
        assert any(f"corral_{manager}" in e for e in expressions), manager


def test_the_systemd_unit_drains_before_it_is_killed(tmp_path: Path) -> None:
    text = (DEPLOY / "corral.service").read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["KillSignal"] == "SIGTERM"
    assert settings["RestartPreventExitStatus"] == "2"  # a config error: no restart loop
    # The drain, then every manager stopped in turn: the built-in ones and `system`.
    longest = DaemonSection().drain_timeout + SupervisorSection().shutdown_timeout * (
        len(BUILT_IN_MANAGERS) + 1
    )
    assert float(settings["TimeoutStopSec"]) > longest
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # ExecStart must name a program that exists here: this checkout's corral.
    unit = tmp_path / "corral.service"
    here = Path(sys.executable).with_name("corral")
    unit.write_text(text.replace("/opt/corral/venv/bin/corral", str(here)))
    verified = run(analyze, "verify", unit)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout + verified.stderr == ""  # unknown keys are only warnings


def _compose_tool() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None and run(docker, "compose", "version").returncode == 0:
        return [docker, "compose"]
    compose = shutil.which("docker-compose")
    return [compose] if compose is not None else None


def test_the_compose_file_runs_a_sentinel_group_and_two_daemons() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services: dict[str, Any] = compose["services"]
    sentinels = [name for name, s in services.items() if "redis-sentinel" in str(s)]
    daemons = [name for name, s in services.items() if "deploy/Dockerfile" in str(s)]
    assert len(sentinels) == 3 and len(daemons) == 2
    assert "--replicaof" in services["redis-replica"]["command"]
    token = "a-dashboard-token-for-the-test"
    # The daemons listen beyond loopback: compose gives them the dashboard's token.
    assert "CORRAL_DAEMON_DASHBOARD_TOKEN" in services[daemons[0]]["environment"]
    config = load_config(DEPLOY / "corral.toml", env={"CORRAL_DAEMON_DASHBOARD_TOKEN": token})
    url = config.bus.url
    assert url.startswith("redis+sentinel://") and config.bus.backend == "redis"
    for name in sentinels:
        assert f"{name}:26379" in url
    for name in daemons:
        daemon = services[name]
        assert daemon["volumes"] == ["./corral.toml:/etc/corral/corral.toml:ro"]
        grace = float(daemon["stop_grace_period"].removesuffix("s"))
        assert grace > config.daemon.drain_timeout
    tool = _compose_tool()
    if tool is None:
        return  # the YAML checks above are all: see deploy/README.md
    checked = run(
        *tool, "-f", DEPLOY / "compose.yaml", "config", "-q",
        env={**os.environ, "CORRAL_DASHBOARD_TOKEN": token},
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, arguments = line.strip().partition(" ")
            found.append((instruction.upper(), arguments.strip()))
    return found


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_the_dockerfile_is_slim_non_root_and_checks_livez(busy_daemon: BusyDaemon) -> None:
    instructions = dockerfile_instructions()
    stages = [i for i, (name, _) in enumerate(instructions) if name == "FROM"]
    final = instructions[stages[-1] :]
    assert "-slim" in final[0][1]
    users = [arguments for name, arguments in final if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("EXPOSE", str(DaemonSection().port)) in final
    assert ("STOPSIGNAL", "SIGTERM") in final
    for name, arguments in instructions:
        if name == "COPY" and not arguments.startswith("--from"):
            for source in shlex.split(arguments)[:-1]:
                assert (DEPLOY.parent / source).exists(), source
    (healthcheck,) = [arguments for name, arguments in final if name == "HEALTHCHECK"]
    command = json.loads(healthcheck.partition("CMD ")[2])
    assert "/livez" in command[-1]
    address = busy_daemon.url.removeprefix("http://")
    live = [sys.executable, *command[1:-1], command[-1].replace("127.0.0.1:8650", address)]
    assert run(*live).returncode == 0
    dead = command[-1].replace("127.0.0.1:8650", f"127.0.0.1:{_closed_port()}")
    assert run(sys.executable, *command[1:-1], dead).returncode != 0
