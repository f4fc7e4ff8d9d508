"""The clock managers and the supervisor read: a manual one moves only when told to, and
systems on the machine's clock share what a namespace keeps in memory."""

from __future__ import annotations

import time

import pytest

from corral.actors.auth import AuthManager
from corral.clock import ManualClock, SystemClock
from corral.messages.auth import AuthIsRevoked, AuthIssue, AuthRevoke
from corral.supervisor import ChildSpec
from corral.system import System


def test_a_manual_clock_starts_at_the_machines_time_and_moves_only_when_advanced() -> None:
    before = time.time()
    clock = ManualClock()
    assert before <= clock.time() <= time.time()
    monotonic, wall = clock.monotonic(), clock.time()
    assert (clock.monotonic(), clock.time()) == (monotonic, wall)
    clock.advance(2.5)
    assert (clock.monotonic(), clock.time()) == (monotonic + 2.5, wall + 2.5)
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-1)


def test_the_system_clock_reads_the_machines_clocks() -> None:
    clock = SystemClock()
    assert time.monotonic() <= clock.monotonic() <= time.monotonic()
    assert time.time() <= clock.time() <= time.time()
    assert clock == SystemClock()


def test_systems_on_the_machines_clock_share_a_namespaces_auth_store() -> None:
    spec = ChildSpec(
        name="auth",
        manager=AuthManager,
        options={"backend": "memory", "signing_key": "a" * 32},
        namespace="clock-shared",
    )
    with System(managers=[spec]) as one, System(managers=[spec]) as two:
        token = one.ask(AuthIssue(subject="user:1")).access_token
        revoked = one.ask(AuthRevoke(token=token))
        assert two.ask(AuthIsRevoked(jti=revoked.jti)).revoked
    with System(managers=[spec], clock=ManualClock()) as apart:  # a store of its own
        assert not apart.ask(AuthIsRevoked(jti=revoked.jti)).revoked
