"""``corral run`` reading Vault again: changed secrets reach the managers, leases are
followed, and a Vault that refuses leaves the last values in place with health degraded."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

import corral
from corral.messages.auth import AuthIssue
from tests.daemons import DaemonGroup, DaemonProcess, redis_daemons_config
from tests.redis_server import RedisServer
from tests.support import wait_until
from tests.vault_server import VaultServer

FIRST_KEY = "the-first-jwt-signing-key-of-32-bytes"
SECOND_KEY = "the-second-jwt-signing-key-of-32-bytes"


@pytest.fixture
def vault() -> Iterator[VaultServer]:
    with VaultServer() as server:
        yield server


def signed_with(token: str, key: str) -> bool:
    try:
        jwt.decode(token, key, algorithms=["HS256"], options={"verify_aud": False})
    except jwt.InvalidSignatureError:
        return False
    return True


def daemon_config(
    redis_server: RedisServer, vault: VaultServer, namespace: str, refresh: float
) -> str:
    return redis_daemons_config(
        redis_server.url,
        namespace,
        f'[vault]\nurl = "{vault.url}"\ntoken = "{vault.add_token()}"\n'
        f"refresh_interval = {refresh}\n"
        '[managers.auth]\nsigning_key = "vault:secret/corral#jwt_secret"\n',
    )


def health(daemon: DaemonProcess) -> dict[str, object]:
    status, document = daemon.health()
    assert status == 200, document
    return document


def test_a_changed_secret_reaches_the_manager_and_a_refusing_vault_degrades_health(
    redis_server: RedisServer, vault: VaultServer, tmp_path: Path
) -> None:
    vault.put("secret/corral", {"jwt_secret": FIRST_KEY})
    namespace = f"vr{uuid.uuid4().hex[:8]}"
    config = daemon_config(redis_server, vault, namespace, refresh=0.3)
    with (
        DaemonGroup(tmp_path, config, count=1) as group,
        corral.connect(redis_server.url, namespace=namespace) as client,
    ):
        daemon = group[0]

        def issued() -> str:
            return str(client.ask(AuthIssue(subject="user:1", refresh=False)).access_token)

        assert signed_with(issued(), FIRST_KEY)
        assert health(daemon)["status"] == "healthy"

        vault.put("secret/corral", {"jwt_secret": SECOND_KEY})
        wait_until(lambda: signed_with(issued(), SECOND_KEY), timeout=15)
        assert "vault refresh: reloaded managers.auth" in daemon.log

        vault.forbid("secret/corral")
        wait_until(lambda: health(daemon)["status"] == "degraded", timeout=15)
        problems = health(daemon)["problems"]
        assert isinstance(problems, dict)
        problem = problems["vault"]
        assert "the last values stay" in problem and "403" in problem, problem
        assert signed_with(issued(), SECOND_KEY)  # still served, with the last key read

        vault.allow("secret/corral")
        wait_until(lambda: health(daemon)["status"] == "healthy", timeout=15)
        assert health(daemon)["problems"] == {}
        assert "vault refresh: Vault answers again" in daemon.log


def test_a_leased_secret_is_read_again_before_its_lease_ends(
    redis_server: RedisServer, vault: VaultServer, tmp_path: Path
) -> None:
    vault.put("secret/corral", {"jwt_secret": FIRST_KEY}, lease=1)
    namespace = f"vr{uuid.uuid4().hex[:8]}"
    config = daemon_config(redis_server, vault, namespace, refresh=3600)  # the lease is sooner
    with (
        DaemonGroup(tmp_path, config, count=1),
        corral.connect(redis_server.url, namespace=namespace) as client,
    ):

        def issued() -> str:
            return str(client.ask(AuthIssue(subject="user:1", refresh=False)).access_token)

        assert signed_with(issued(), FIRST_KEY)
        reads = vault.count("GET", "/v1/secret/data/corral")
        vault.put("secret/corral", {"jwt_secret": SECOND_KEY}, lease=1)
        wait_until(lambda: signed_with(issued(), SECOND_KEY), timeout=15)
        assert vault.count("GET", "/v1/secret/data/corral") > reads
