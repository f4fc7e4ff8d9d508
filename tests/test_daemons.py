"""Several real ``corral run`` daemons on one Redis: handoff without loss or double execution.

Effects are counted in Redis by the test managers of ``tests/effects.py``, so that
"ran twice" means the handler ran twice, not that two replies came back.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import corral
from corral._redis import connect
from corral._wire import lease_key, stream_key
from corral.errors import CorralError, ManagerUnavailable, Timeout
from tests.daemons import DaemonGroup, redis_daemons_config
from tests.effects import (
    Effect,
    EffectDone,
    TallyAdd,
    effect_counts,
    effect_starts,
    overlaps,
    tally_starts,
)
from tests.redis_server import RedisServer
from tests.support import wait_until

EFFECTS = '[managers.effects]\nclass_path = "tests.effects:Effects"\n'
TALLY = '[managers.tally]\nclass_path = "tests.effects:Tally"\n'


@pytest.fixture
def namespace() -> str:
    return f"d{uuid.uuid4().hex[:8]}"


@pytest.fixture
def client(redis_url: str, namespace: str) -> Iterator[corral.Client]:
    with corral.connect(redis_url, namespace=namespace) as remote:
        yield remote


def _call_all(
    client: corral.Client, url: str, requests: list[Effect], timeout: float | None = None
) -> dict[str, Any]:
    """Send every request from its own thread, in order: each once the one before is in
    the stream (or answered already); each token's reply or error."""
    outcomes: dict[str, Any] = {}
    stream = stream_key(client.namespace, "effects")
    redis = connect(url)

    def added() -> int:
        return int(redis.xinfo_stream(stream)["entries-added"]) if redis.exists(stream) else 0

    def call(request: Effect) -> None:
        try:
            outcomes[request.token] = client.ask(request, timeout=timeout)
        except CorralError as exc:
            outcomes[request.token] = exc

    threads = [threading.Thread(target=call, args=(r,)) for r in requests]
    try:
        before = added()
        for sent, thread in enumerate(threads, 1):
            thread.start()
            wait_until(lambda: added() >= before + sent or not thread.is_alive())  # noqa: B023
    finally:
        redis.close()
    for thread in threads:
        thread.join(30)
    return outcomes


def _started_on(group: DaemonGroup, index: int) -> Callable[[], bool]:
    """True once daemon ``index`` has handled at least one effect."""

    def check() -> bool:
        _, document = group[index].health()
        return bool(document["managers"]["effects"]["metrics"]["handled"])

    return check


def test_sigterm_drains_requests_in_flight(
    redis_url: str, namespace: str, client: corral.Client, tmp_path: Path
) -> None:
    config = redis_daemons_config(redis_url, namespace, EFFECTS)
    with DaemonGroup(tmp_path, config, count=3) as group:
        requests = [Effect(token=f"t{i}", seconds=0.3) for i in range(12)]
        outcomes: dict[str, Any] = {}
        caller = threading.Thread(
            target=lambda: outcomes.update(_call_all(client, redis_url, requests))
        )
        caller.start()
        victim = next(
            i for i in wait_until(lambda: [i for i in range(3) if _started_on(group, i)()])
        )
        group.signal(victim, signal.SIGTERM)
        caller.join(30)
        assert group.wait(victim) == 0
        assert "stopped cleanly" in group[victim].log
        # Every request answered once with its reply; each ran exactly once.
        assert all(isinstance(outcomes[r.token], EffectDone) for r in requests), outcomes
        assert effect_counts(redis_url, namespace) == {r.token: 1 for r in requests}


def test_health_says_draining_until_the_requests_taken_are_answered(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    config = redis_daemons_config(redis_server.url, namespace, EFFECTS)
    with (
        DaemonGroup(tmp_path, config, count=1) as group,
        corral.connect(redis_server.url, namespace=namespace) as remote,
    ):
        outcome: list[Any] = []
        caller = threading.Thread(
            target=lambda: outcome.append(remote.ask(Effect(token="slow", seconds=2.0)))
        )
        caller.start()
        wait_until(lambda: effect_counts(redis_server.url, namespace).get("slow"))
        group.signal(0, signal.SIGTERM)
        status, document = wait_until(
            lambda: (h := group[0].health())[1]["status"] == "draining" and h
        )
        assert status == 503
        assert document["remote"]["draining"] is True
        assert document["remote"]["in_flight"] == 1
        caller.join(10)
        assert isinstance(outcome[0], EffectDone)
        assert group.wait(0) == 0


def test_sigkill_loses_nothing_and_runs_nothing_twice(
    redis_url: str, namespace: str, client: corral.Client, tmp_path: Path
) -> None:
    config = redis_daemons_config(redis_url, namespace, EFFECTS)
    with DaemonGroup(tmp_path, config, count=3) as group:
        requests = [Effect(token=f"k{i}", seconds=0.2) for i in range(15)]
        sent_at = time.time()
        outcomes: dict[str, Any] = {}
        # Time enough for a dead daemon's requests to be claimed (heartbeat_ttl, then
        # claim_idle) and run behind the others on a loaded machine.
        timeout = 10.0
        caller = threading.Thread(
            target=lambda: outcomes.update(_call_all(client, redis_url, requests, timeout))
        )
        caller.start()
        victim = next(
            i for i in wait_until(lambda: [i for i in range(3) if _started_on(group, i)()])
        )
        group.signal(victim, signal.SIGKILL)
        caller.join(30)
        assert group.wait(victim) == -signal.SIGKILL
        counts = effect_counts(redis_url, namespace)
        starts = effect_starts(redis_url, namespace)
        for request in requests:
            outcome = outcomes[request.token]
            # Never a timeout while another daemon is alive.
            assert not isinstance(outcome, Timeout), (request.token, outcome)
            if isinstance(outcome, EffectDone):
                assert counts[request.token] == 1, request.token
            else:
                # Started by the daemon that died, maybe killed before its effect: not
                # run again, and said so.
                assert isinstance(outcome, ManagerUnavailable), outcome
                assert outcome.details["outcome"] == "unknown"
                assert counts.get(request.token, 0) <= 1
            # Nothing started after its caller's deadline.
            if request.token in starts:
                assert starts[request.token] <= sent_at + timeout + 1.0
        assert max(counts.values()) == 1
        refused = [t for t, o in outcomes.items() if not isinstance(o, EffectDone)]
        # The one the dead daemon was running, and the one it may have just finished
        # without having sent its reply (replies leave from their own thread).
        assert len(refused) <= 2


def test_no_request_is_started_after_its_deadline(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    config = redis_daemons_config(redis_server.url, namespace, EFFECTS)
    with (
        DaemonGroup(tmp_path, config, count=1),
        corral.connect(redis_server.url, namespace=namespace) as remote,
    ):
        requests = [Effect(token=f"q{i}", seconds=0.6) for i in range(3)]
        outcomes = _call_all(remote, redis_server.url, requests, timeout=1.0)
        counts = effect_counts(redis_server.url, namespace)
        # One actor, in order: the second starts at ~0.6 s, within its 1 s; the third
        # would start at ~1.2 s, past its deadline, so it never runs.
        assert counts.get("q0") == 1 and counts.get("q1") == 1
        assert "q2" not in counts
        assert isinstance(outcomes["q2"], Timeout)


def _holder(url: str, namespace: str) -> str | None:
    """The id of the daemon holding the Tally singleton's lease."""
    client = connect(url)
    try:
        value: Any = client.get(lease_key(namespace, "tally"))
    finally:
        client.close()
    return value.decode() if value is not None else None


def test_a_singleton_runs_on_one_daemon_and_moves_when_it_dies(
    redis_server: RedisServer, namespace: str, tmp_path: Path
) -> None:
    url = redis_server.url
    lease_ttl = 2.0
    config = redis_daemons_config(url, namespace, TALLY, extra=f"lease_ttl = {lease_ttl}\n")
    with (
        DaemonGroup(tmp_path, config, count=3) as group,
        corral.connect(url, namespace=namespace) as remote,
    ):
        holder = wait_until(lambda: _holder(url, namespace))
        totals = [remote.ask(TallyAdd(amount=1)).total for _ in range(20)]
        assert totals == list(range(1, 21))  # one instance: one counter, whoever asks
        assert len(tally_starts(url, namespace)) == 1
        for daemon in group.daemons:
            _, document = daemon.health()
            held = document["remote"]["singletons_held"]
            assert held == (["tally"] if daemon.daemon_id == holder else [])
            assert document["managers"]["tally"]["state"] == (
                "running" if daemon.daemon_id == holder else "standby"
            )
            assert document["status"] == "healthy"
        group.by_id(holder).signal(signal.SIGKILL)
        killed_at = time.monotonic()
        # Requests sent meanwhile wait for the next holder, within their timeout.
        reply = remote.ask(TallyAdd(amount=5), timeout=10)
        moved_after = time.monotonic() - killed_at
        assert reply.total == 5  # a new instance (memory state is per instance)
        assert moved_after <= lease_ttl + 1.0, moved_after
        new_holder = _holder(url, namespace)
        assert new_holder not in (None, holder)
        assert len(tally_starts(url, namespace)) == 2
        assert overlaps(url, namespace) == []


def test_a_singleton_is_handed_over_at_once_on_sigterm(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    config = redis_daemons_config(redis_url, namespace, TALLY)
    with (
        DaemonGroup(tmp_path, config, count=2) as group,
        corral.connect(redis_url, namespace=namespace) as remote,
    ):
        holder = wait_until(lambda: _holder(redis_url, namespace))
        assert remote.ask(TallyAdd(amount=2)).total == 2
        index = group.daemons.index(group.by_id(holder))
        group.signal(index, signal.SIGTERM)
        assert group.wait(index) == 0
        assert "manager tally standby: this daemon is stopping" in group[index].log
        assert remote.ask(TallyAdd(amount=3), timeout=5).total == 3
        assert overlaps(redis_url, namespace) == []
