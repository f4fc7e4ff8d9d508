"""Requests from outside that crash a manager: dead-lettered, quarantined, never fatal."""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

import pytest

import corral
from corral.config import Config, ManagerSection, SupervisorSection
from corral.errors import InvalidMessage, ManagerUnavailable
from corral.messages.cache import CacheGet, CacheSet
from corral.messages.system import DeadLetter, Ping
from tests.daemons import DaemonGroup, redis_daemons_config
from tests.redis_server import RedisServer
from tests.support import Work, run_corral, wait_until

MANAGERS = '[managers.worker]\nclass_path = "tests.support:Worker"\n[managers.cache]\n'


def test_one_poison_request_sent_100_times_crashes_once_and_the_daemon_serves_on(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    namespace = f"dl{uuid.uuid4().hex[:8]}"
    config = redis_daemons_config(redis_server.url, namespace, MANAGERS)
    with (
        DaemonGroup(tmp_path, config, count=1) as group,
        corral.connect(redis_server.url, namespace=namespace) as remote,
    ):
        outcomes: list[Exception] = []
        for _ in range(100):
            with pytest.raises((ManagerUnavailable, InvalidMessage)) as caught:
                remote.ask(Work(action="crash"))
            outcomes.append(caught.value)
        assert isinstance(outcomes[0], ManagerUnavailable)  # it crashed the worker once
        refused = outcomes[1:]
        assert all(isinstance(o, InvalidMessage) for o in refused), refused
        assert "refused without running it" in str(refused[0])
        # The daemon runs on, every manager serves, the worker restarted once.
        assert group[0].process.poll() is None
        remote.ask(CacheSet(key="k", value="v"))
        assert remote.ask(CacheGet(key="k")).value == "v"
        assert remote.ask(Work()).name == "worker"
        _, document = group[0].health()
        assert document["managers"]["worker"]["restarts"] == 1
        assert document["status"] == "healthy"
        assert document["remote"]["quarantined"] == 99

        listed = run_corral(
            "dead-letters", "--url", redis_server.url, "--json",
            env={"CORRAL_BUS_NAMESPACE": namespace},
        )  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        (line,) = listed.stdout.splitlines()
        letter = json.loads(line)
        assert letter["type"] == DeadLetter.type_name
        assert letter["fields"]["child"] == "worker"
        assert letter["fields"]["message_type"] == "test.work"
        assert "action='crash'" in letter["fields"]["message"]
        assert "RuntimeError: boom" in letter["fields"]["error"]
        assert remote.reply_topic in letter["fields"]["sender"]


def test_many_different_poison_requests_never_stop_the_daemon(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    namespace = f"dl{uuid.uuid4().hex[:8]}"
    config = redis_daemons_config(
        redis_server.url, namespace, MANAGERS, extra="[supervisor]\nmax_restarts = 2\n"
    )
    with (
        DaemonGroup(tmp_path, config, count=1) as group,
        corral.connect(redis_server.url, namespace=namespace) as remote,
    ):
        for attempt in range(20):  # far past max_restarts, each one new
            with pytest.raises(ManagerUnavailable):
                remote.ask(Work(action="crash", seconds=attempt), timeout=10)
        assert group[0].process.poll() is None
        assert remote.ask(Ping(payload=b"up")).payload == b"up"
        assert remote.ask(Work(), timeout=10).name == "worker"
        _, document = group[0].health()
        assert document["escalated"] is False
        assert document["managers"]["worker"]["restarts"] == 20


def test_a_crash_from_inside_the_process_still_counts_towards_escalation() -> None:
    config = Config().replace(
        supervisor=SupervisorSection(max_restarts=1, backoff_initial=0.0),
        managers={"worker": ManagerSection(class_path="tests.support:Worker")},
    )
    escalated: list[str] = []
    system = corral.System(config, on_escalate=escalated.append).start()
    try:
        for _ in range(3):
            with contextlib.suppress(ManagerUnavailable):
                system.ask(Work(action="crash"), timeout=5)
        wait_until(lambda: escalated)  # the process's own requests: OTP's rules apply
        assert system.dead_letters() == []
    finally:
        system.stop()
