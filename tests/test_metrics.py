"""/metrics by Prometheus conventions: families, labels, counters that outlive restarts,
and ``promtool check metrics`` on a live daemon."""

from __future__ import annotations

import importlib
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

import corral
from corral.actors import BUILTIN
from corral.daemon import declared_families
from corral.errors import ConfigError, ManagerUnavailable, NotFound
from corral.manager import Manager
from corral.metrics import Counter, Gauge, Histogram, ManagerMetrics
from corral.supervisor import ChildSpec
from tests.operations import BUILT_IN_MANAGERS, BusyDaemon, promtool
from tests.support import Work, Worker, metric, wait_until

DOCS = Path(__file__).parent.parent / "docs" / "metrics.md"


def built_in(name: str) -> type[Manager[Any]]:
    module, _, attribute = BUILTIN[name].partition(":")
    cls: type[Manager[Any]] = getattr(importlib.import_module(module), attribute)
    return cls


def test_promtool_finds_nothing_to_say_about_a_live_daemon(busy_daemon: BusyDaemon) -> None:
    text = httpx.get(f"{busy_daemon.url}/metrics", timeout=10).text
    checked = subprocess.run(
        [promtool(), "check", "metrics"],
        check=False,
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert (checked.stdout + checked.stderr).strip() == ""


def test_every_family_is_there_and_none_is_a_catch_all(busy_daemon: BusyDaemon) -> None:
    text = httpx.get(f"{busy_daemon.url}/metrics", timeout=10).text
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert "corral_manager_metric" not in families
    declared = {
        family.name for name in BUILT_IN_MANAGERS for family in built_in(name).metric_families
    }
    core = {
        "corral_build_info", "corral_system_status", "corral_ready", "corral_manager_up",
        "corral_manager_status", "corral_manager_restarts_total",
        "corral_messages_handled_total", "corral_message_errors_total", "corral_handler_seconds",
        "corral_request_seconds", "corral_mailbox_depth", "corral_rejected_total",
        "corral_bus_published_total", "corral_remote_replies_total", "process_cpu_seconds_total",
        "process_resident_memory_bytes", "python_info", "python_gc_collections_total",
    }  # fmt: skip
    assert core | declared <= families, sorted((core | declared) - families)


def test_each_manager_counts_what_it_did(busy_daemon: BusyDaemon) -> None:
    samples = busy_daemon.scrape()
    expected = {
        metric("corral_cache_hits_total", manager="cache", backend="redis"): 1,
        metric("corral_cache_misses_total", manager="cache", backend="redis"): 1,
        metric("corral_ratelimit_refused_total", manager="ratelimit"): 2,
        metric("corral_ratelimit_exceeded_total", manager="ratelimit", rule="ip"): 2,
        metric("corral_auth_rejected_total", manager="auth", reason="malformed"): 1,
        metric("corral_transactions_committed_total", manager="transaction"): 1,
        metric("corral_transactions_rolled_back_total", manager="transaction"): 1,
        metric("corral_state_changes_total", manager="state"): 3,
        metric("corral_pool_responses_total", manager="pool", service="web", **{"class": "5xx"}): 1,
        metric("corral_pool_breaker_state", manager="pool", service="web",
               url=busy_daemon.service_url, state="closed"): 1,
        metric("corral_websocket_emitted_total", manager="websocket"): 1,
        metric("corral_messages_handled_total", manager="ratelimit", type="ratelimit.check"): 5,
        metric("corral_message_errors_total", manager="auth", type="auth.validate"): 1,
        metric("corral_request_seconds_count", manager="cache", type="cache.get"): 2,
        metric("corral_rejected_total", source="remote", kind="undecodable"): 1,
        metric("corral_build_info", version=corral.__version__,
               python=platform.python_version()): 1,
        metric("corral_system_status", status="healthy"): 1,
    }  # fmt: skip
    assert {key: samples.get(key) for key in expected} == expected


def test_a_counter_survives_a_crash_and_restart() -> None:
    with corral.System(managers=[Worker]) as system:
        system.ask(Work())
        with pytest.raises(NotFound):
            system.ask(Work(action="refuse"))
        with pytest.raises(ManagerUnavailable):
            system.ask(Work(action="crash"))
        wait_until(lambda: system.health().managers["worker"].restarts == 1)
        system.ask(Work())
        stats = system.supervisor.metrics()["worker"].handlers["test.work"]
        assert (stats.handled, stats.errors) == (3, 1)  # a crash counts as a restart
        health = system.health().managers["worker"].health
        assert health is not None and health.metrics["handled"] == 3


def test_a_family_is_checked_when_declared() -> None:
    with pytest.raises(ValueError, match="ends with _total"):
        Counter("corral_things", "Things")
    with pytest.raises(ValueError, match="set by the daemon"):
        Gauge("corral_things", "Things", labels=("manager",))
    with pytest.raises(ValueError, match="increasing order"):
        Histogram("corral_seconds", "Time", buckets=(1.0, 0.5))
    metrics = ManagerMetrics()
    with pytest.raises(ValueError, match="takes 1 label values"):
        metrics.add(Counter("corral_things_total", "Things", labels=("kind",)))
    with pytest.raises(ValueError, match="never goes down"):
        metrics.add(Counter("corral_things_total", "Things"), by=-1)


def test_two_managers_may_not_declare_one_family_differently() -> None:
    class First(Worker):
        metric_families = (Counter("corral_things_total", "Things"),)

    class Second(Worker):
        metric_families = (Counter("corral_things_total", "Things", labels=("kind",)),)

    same = [ChildSpec(name="a", manager=First), ChildSpec(name="b", manager=First)]
    assert [f.name for f in declared_families(same)] == ["corral_things_total"]
    with pytest.raises(ConfigError, match="managers a and b declare the metric family"):
        declared_families([ChildSpec(name="a", manager=First), ChildSpec(name="b", manager=Second)])


def test_docs_name_every_corral_family(busy_daemon: BusyDaemon) -> None:
    text = httpx.get(f"{busy_daemon.url}/metrics", timeout=10).text
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE corral_")}
    documented = set(re.findall(r"`(corral_[a-z0-9_]+)`", DOCS.read_text()))
    assert families - documented == set()
    assert documented - families == set()  # none that is gone
