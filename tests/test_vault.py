"""The Vault config source against a fake Vault (tests/vault_server.py): auth, KV v2, errors,
caching, renewal, and Vault as the top layer of load_config."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.actors.auth import AuthOptions
from corral.actors.state import StateOptions
from corral.config import VaultSection, VaultSource, load_config, parse_options
from corral.errors import ConfigError
from corral.system import System, plan
from tests.support import wait_until
from tests.vault_server import VaultServer

KV = "/v1/secret/data/corral"


class Clock:
    """A clock for the source that moves only when told to, along with the server's."""

    def __init__(self, server: VaultServer) -> None:
        self.now = 0.0
        self.server = server

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.server.advance(seconds)


@pytest.fixture
def vault() -> Iterator[VaultServer]:
    with VaultServer() as server:
        server.put("secret/corral", {"jwt_secret": "hunter2", "redis_url": "redis://:pw@r:6379/0"})
        yield server


@pytest.fixture
def clock(vault: VaultServer) -> Clock:
    return Clock(vault)


def source_for(vault: VaultServer, clock: Clock | None = None, **settings: Any) -> VaultSource:
    if "role_id" not in settings:
        settings.setdefault("token", vault.add_token())
    section = VaultSection(url=settings.pop("url", vault.url), **settings)
    return VaultSource(section) if clock is None else VaultSource(section, clock=clock)


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corral.toml"
    path.write_text(text)
    return path


def error_of(source: VaultSource, reference: str) -> str:
    with pytest.raises(ConfigError) as info:
        source.resolve(reference)
    return info.value.message


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- auth -----------------------------------------------------------------------------------


def test_token_auth(vault: VaultServer) -> None:
    source = source_for(vault)
    assert source.resolve("vault:secret/corral#jwt_secret") == "hunter2"
    assert vault.count("GET", "/v1/auth/token/lookup-self") == 1
    assert vault.count("GET", KV) == 1


def test_approle_auth(vault: VaultServer) -> None:
    vault.add_approle("corral-role", "s3cret-id")
    source = source_for(vault, role_id="corral-role", secret_id="s3cret-id")
    assert source.resolve("vault:secret/corral#jwt_secret") == "hunter2"
    assert vault.count("POST", "/v1/auth/approle/login") == 1
    assert vault.count("GET", "/v1/auth/token/lookup-self") == 0


def test_bad_approle_credentials(vault: VaultServer) -> None:
    vault.add_approle("corral-role", "s3cret-id")
    source = source_for(vault, role_id="corral-role", secret_id="wrong")
    assert error_of(source, "vault:secret/corral#jwt_secret") == (
        f"vault: AppRole login at {vault.url} failed: Vault said 400 (invalid role or secret ID)"
    )


def test_bad_token(vault: VaultServer) -> None:
    source = source_for(vault, token="hvs.forged")
    assert error_of(source, "vault:secret/corral#jwt_secret") == (
        f"vault: token lookup at {vault.url} failed: Vault said 403 (permission denied)"
    )


# -- reading secrets ------------------------------------------------------------------------


def test_other_schemes_are_not_vaults(vault: VaultServer) -> None:
    assert source_for(vault).resolve("consul:corral#x") is None
    assert vault.requests == []


def test_secrets_are_cached(vault: VaultServer) -> None:
    source = source_for(vault)
    assert source.resolve("vault:secret/corral#jwt_secret") == "hunter2"
    vault.put("secret/corral", {"jwt_secret": "changed", "redis_url": "changed"})
    assert source.resolve("vault:secret/corral#jwt_secret") == "hunter2"
    assert source.resolve("vault:secret/corral#redis_url") == "redis://:pw@r:6379/0"
    assert vault.count("GET", KV) == 1
    assert source.refresh() is None  # no lease, a token without TTL: nothing will be due
    assert vault.count("GET", KV) == 1


def test_mount_with_slashes(vault: VaultServer) -> None:
    vault.add_mount("kv/prod")
    vault.put("kv/prod/corral/api", {"key": "k1"})
    source = source_for(vault, mount="kv/prod")
    assert source.resolve("vault:kv/prod/corral/api#key") == "k1"
    assert vault.count("GET", "/v1/kv/prod/data/corral/api") == 1


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (
            "vault:secret/missing#jwt_secret",
            "vault: cannot read secret/missing#jwt_secret: Vault said 404 (no such secret)",
        ),
        (
            "vault:secret/corral#nope",
            "vault: cannot read secret/corral#nope: "
            "key 'nope' not in secret/corral (keys: jwt_secret, redis_url)",
        ),
        (
            "vault:secret/locked#jwt_secret",
            "vault: cannot read secret/locked#jwt_secret: Vault said 403 (permission denied)",
        ),
        (
            "vault:nomount/corral#x",
            "vault: cannot read nomount/corral#x: Vault said 404 "
            '(no handler for route "nomount/data/corral". route entry not found.)',
        ),
        (
            "vault:secret/corral",
            "vault: 'vault:secret/corral': expected vault:<mount>/<path>#<key>",
        ),
        ("vault:corral#x", "vault: corral#x: expected <mount>/<path>, such as secret/corral"),
    ],
)
def test_unreadable_secrets(vault: VaultServer, reference: str, message: str) -> None:
    vault.put("secret/locked", {"jwt_secret": "x"})
    vault.forbid("secret/locked")
    assert error_of(source_for(vault), reference) == message


def test_a_source_needs_a_url() -> None:
    with pytest.raises(ConfigError, match=r"^vault: vault\.url is not set$"):
        VaultSource(VaultSection())


def test_vault_unreachable() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    source = VaultSource(VaultSection(url=url, token="t"))
    assert error_of(source, "vault:secret/corral#x") == (
        f"vault: cannot reach Vault at {url}: Connection refused"
    )


def test_vault_not_answering() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # accepts connections and never answers
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        source = VaultSource(VaultSection(url=url, token="t", timeout=0.2))
        assert error_of(source, "vault:secret/corral#x") == (
            f"vault: cannot reach Vault at {url}: no answer within 0.2 s"
        )


# -- renewal --------------------------------------------------------------------------------


def test_token_is_renewed_before_it_expires(vault: VaultServer, clock: Clock) -> None:
    source = source_for(vault, clock, token=vault.add_token(ttl=30))
    source.resolve("vault:secret/corral#jwt_secret")
    assert source.refresh() == 20.0  # two thirds of the TTL

    clock.advance(19)
    assert source.refresh() == 1.0
    assert vault.count("POST", "/v1/auth/token/renew-self") == 0
    clock.advance(2)
    assert source.refresh() == 20.0
    assert vault.count("POST", "/v1/auth/token/renew-self") == 1

    clock.advance(21)  # 42 s after the token was made: it lives on only thanks to the renewal
    vault.put("secret/other", {"a": "1"})
    assert source.resolve("vault:secret/other#a") == "1"


def test_overdue_token_is_renewed_on_use(vault: VaultServer, clock: Clock) -> None:
    source = source_for(vault, clock, token=vault.add_token(ttl=30))
    source.resolve("vault:secret/corral#jwt_secret")
    clock.advance(25)
    vault.put("secret/other", {"a": "1"})
    assert source.resolve("vault:secret/other#a") == "1"
    assert vault.count("POST", "/v1/auth/token/renew-self") == 1


def test_approle_logs_in_again_when_the_token_cannot_be_renewed(
    vault: VaultServer, clock: Clock
) -> None:
    vault.add_approle("corral-role", "s3cret-id", ttl=30, renewable=False)
    source = source_for(vault, clock, role_id="corral-role", secret_id="s3cret-id")
    source.resolve("vault:secret/corral#jwt_secret")
    clock.advance(21)
    assert source.refresh() == 20.0
    assert vault.count("POST", "/v1/auth/token/renew-self") == 1  # refused: not renewable
    assert vault.count("POST", "/v1/auth/approle/login") == 2


def test_leased_secrets_are_read_again(vault: VaultServer, clock: Clock) -> None:
    vault.put("secret/db", {"password": "v1"}, lease=30)
    source = source_for(vault, clock)
    assert source.resolve("vault:secret/db#password") == "v1"
    vault.put("secret/db", {"password": "v2"}, lease=30)

    clock.advance(19)
    assert source.resolve("vault:secret/db#password") == "v1"  # cached: not due yet
    assert source.refresh() == 1.0
    clock.advance(2)
    assert source.refresh() == 20.0
    assert source.resolve("vault:secret/db#password") == "v2"
    assert vault.count("GET", "/v1/secret/data/db") == 2

    vault.put("secret/db", {"password": "v3"}, lease=30)
    clock.advance(25)  # overdue, and no refresh(): read again on use
    assert source.resolve("vault:secret/db#password") == "v3"
    assert vault.count("GET", "/v1/secret/data/db") == 3


def test_refresher_thread_renews_the_token(vault: VaultServer) -> None:
    source = source_for(vault, token=vault.add_token(ttl=1))  # renewed every 2/3 s
    source.resolve("vault:secret/corral#jwt_secret")
    source.start_refresher()
    try:
        wait_until(lambda: vault.count("POST", "/v1/auth/token/renew-self") >= 2)
    finally:
        source.close()
    assert "corral-vault" not in [thread.name for thread in threading.enumerate()]


def test_refresher_logs_a_failed_renewal_and_tries_again(
    vault: VaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    token = vault.add_token(ttl=1)
    source = source_for(vault, token=token)
    source.resolve("vault:secret/corral#jwt_secret")
    vault.tokens[token].renewable = False  # Vault now refuses to renew it
    source.start_refresher(retry=0.05)
    try:
        wait_until(lambda: vault.count("POST", "/v1/auth/token/renew-self") >= 2)
    finally:
        source.close()
    assert (
        f"vault: token renewal at {vault.url} failed: Vault said 400 (lease is not renewable) "
        "(trying again in 0.05 s)"
    ) in caplog.messages


# -- load_config ----------------------------------------------------------------------------


def test_references_in_file_and_env_values(vault: VaultServer, tmp_path: Path) -> None:
    vault.put("secret/signing", {"k1": "key-one", "k2": "key-two"})
    path = toml(
        tmp_path,
        f"""
        [vault]
        url = "{vault.url}"

        [bus]
        url = "vault:secret/corral#redis_url"

        [managers.auth]
        jwt_secret = "vault:secret/corral#jwt_secret"
        """,
    )
    env = {
        "CORRAL_VAULT_TOKEN": vault.add_token(),
        "CORRAL_CODEC_SIGNING_KEYS": "vault:secret/signing#k1, vault:secret/signing#k2",
    }
    config = load_config(path, env=env)

    assert config.bus.url == "redis://:pw@r:6379/0"
    assert config.managers["auth"].options == {"jwt_secret": "hunter2"}
    assert config.codec.signing_keys == ["key-one", "key-two"]
    assert config.sources["bus.url"] == f"vault (reference in file {path})"
    assert config.sources["codec.signing_keys"] == (
        "vault (reference in env CORRAL_CODEC_SIGNING_KEYS)"
    )
    assert vault.count("GET", KV) == 1  # two keys of one secret: one read
    assert vault.count("GET", "/v1/secret/data/signing") == 1


def test_vault_beats_file_beats_env_beats_defaults(vault: VaultServer, tmp_path: Path) -> None:
    vault.put(
        "secret/corral-config",
        {"supervisor.max_restarts": "3", "managers.auth.ttl": 30, "bus.namespace": "prod"},
    )
    path = toml(
        tmp_path,
        f"""
        [vault]
        url = "{vault.url}"
        config_path = "secret/corral-config"

        [supervisor]
        max_restarts = 2
        period = 20

        [managers.auth]
        ttl = 60
        issuer = "corral"
        """,
    )
    env = {
        "CORRAL_VAULT_TOKEN": vault.add_token(),
        "CORRAL_SUPERVISOR_MAX_RESTARTS": "1",
        "CORRAL_SUPERVISOR_PERIOD": "10",
        "CORRAL_SUPERVISOR_PROBE_INTERVAL": "3",
    }
    config = load_config(path, env=env)

    s = config.supervisor
    assert (s.max_restarts, s.period, s.probe_interval, s.probe_timeout) == (3, 20.0, 3.0, 5.0)
    assert config.sources["supervisor.max_restarts"] == "vault"
    assert config.sources["supervisor.period"] == f"file {path}"
    assert config.sources["supervisor.probe_interval"] == "env CORRAL_SUPERVISOR_PROBE_INTERVAL"
    assert config.sources["supervisor.probe_timeout"] == "default"
    assert config.bus.namespace == "prod"
    assert config.managers["auth"].options == {"ttl": 30, "issuer": "corral"}
    assert config.sources["managers.auth.ttl"] == "vault"
    assert config.sources["vault.url"] == f"file {path}"
    assert config.sources["vault.token"] == "env CORRAL_VAULT_TOKEN"


def test_no_vault_url_means_no_vault() -> None:
    config = load_config(env={"CORRAL_VAULT_CONFIG_PATH": "secret/corral-config"})
    assert config.vault.url == ""


def test_sources_given_replace_the_automatic_vault() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    config = load_config(env={"CORRAL_VAULT_URL": url, "CORRAL_VAULT_TOKEN": "t"}, sources=[])
    assert config.vault.url == url


def test_missing_secret_stops_start_up(vault: VaultServer, tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        f"""
        [vault]
        url = "{vault.url}"
        token = "{vault.add_token()}"

        [managers.auth]
        jwt_secret = "vault:secret/auth#jwt_secret"
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.message == (
        f"{path}: managers.auth.jwt_secret: cannot resolve 'vault:secret/auth#jwt_secret': "
        "vault: cannot read secret/auth#jwt_secret: Vault said 404 (no such secret)"
    )


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (
            None,
            "vault: cannot read secret/corral-config (vault.config_path): "
            "Vault said 404 (no such secret)",
        ),
        (
            {"url": "x"},
            "vault: secret/corral-config (vault.config_path): key 'url' is not a dotted "
            "setting such as bus.url or managers.<name>.<key>",
        ),
        (
            {"managers.auth": "x"},
            "vault: secret/corral-config (vault.config_path): key 'managers.auth' is not a "
            "dotted setting such as bus.url or managers.<name>.<key>",
        ),
        ({"bus.urll": "x"}, "source vault: bus.urll: unknown key (did you mean bus.url?)"),
    ],
)
def test_bad_config_path(vault: VaultServer, secret: dict[str, Any] | None, message: str) -> None:
    if secret is not None:
        vault.put("secret/corral-config", secret)
    env = {
        "CORRAL_VAULT_URL": vault.url,
        "CORRAL_VAULT_TOKEN": vault.add_token(),
        "CORRAL_VAULT_CONFIG_PATH": "secret/corral-config",
    }
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert info.value.message == message


def test_unreachable_vault_stops_start_up() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    env = {
        "CORRAL_VAULT_URL": url,
        "CORRAL_VAULT_TOKEN": "t",
        "CORRAL_VAULT_CONFIG_PATH": "secret/corral-config",
    }
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert info.value.message == f"vault: cannot reach Vault at {url}: Connection refused"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"CORRAL_VAULT_URL": "http://vault:8200"},
            "env CORRAL_VAULT_URL: vault.url: "
            "Vault needs vault.token, or vault.role_id and vault.secret_id",
        ),
        (
            {"CORRAL_VAULT_URL": "vault.internal:8200", "CORRAL_VAULT_TOKEN": "t"},
            "env CORRAL_VAULT_URL: vault.url: "
            "expected an http:// or https:// URL, got 'vault.internal:8200'",
        ),
        (
            {"CORRAL_VAULT_ROLE_ID": "r"},
            "env CORRAL_VAULT_ROLE_ID: vault.secret_id: AppRole auth needs it with vault.role_id",
        ),
        (
            {"CORRAL_VAULT_TOKEN": "t", "CORRAL_VAULT_ROLE_ID": "r", "CORRAL_VAULT_SECRET_ID": "s"},
            "env CORRAL_VAULT_TOKEN, env CORRAL_VAULT_ROLE_ID: vault.token: "
            "set vault.token or vault.role_id and vault.secret_id, not both",
        ),
        (
            {"CORRAL_VAULT_MOUNT": "/secret"},
            "env CORRAL_VAULT_MOUNT: vault.mount: expected a mount such as 'secret', got '/secret'",
        ),
        (
            {"CORRAL_VAULT_VERIFY": "no", "CORRAL_VAULT_CA_CERT": "/etc/ca.pem"},
            "env CORRAL_VAULT_CA_CERT, env CORRAL_VAULT_VERIFY: vault.ca_cert: "
            "has no use with vault.verify = false",
        ),
    ],
)
def test_bad_vault_settings(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert info.value.message == message


def test_vault_reference_in_the_vault_section(tmp_path: Path) -> None:
    path = toml(tmp_path, 'vault.url = "http://vault:8200"\nvault.token = "vault:secret/t#t"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.message == (
        f"{path}: vault.token: cannot resolve 'vault:secret/t#t': no Vault source is configured"
    )


# -- masking --------------------------------------------------------------------------------


def test_vault_credentials_and_values_are_masked(vault: VaultServer) -> None:
    token = vault.add_token()
    config = load_config(
        env={
            "CORRAL_VAULT_URL": vault.url,
            "CORRAL_VAULT_TOKEN": token,
            "CORRAL_BUS_URL": "vault:secret/corral#redis_url",
        }
    )
    shown = config.masked()
    assert shown["vault"]["token"] == "***"
    assert shown["vault"]["url"] == vault.url
    assert shown["bus"]["url"] == "***"
    for secret in (token, "redis://:pw@r:6379/0"):
        assert secret not in str(shown)
    assert token not in repr(config)

    approle = config.replace(
        vault=VaultSection(url=vault.url, role_id="corral-role", secret_id="s3cret-id")
    )
    assert approle.masked()["vault"]["secret_id"] == "***"
    assert approle.masked()["vault"]["role_id"] == "corral-role"
    assert "s3cret-id" not in repr(approle)


def test_manager_options_from_vault_are_converted_to_their_types(
    vault: VaultServer, tmp_path: Path
) -> None:
    vault.put("secret/corral", {"signing_key": "s" * 32, "history_limit": "7"})
    vault.put(
        "secret/corral-config", {"managers.auth.access_ttl": "120", "managers.auth.leeway": "2.5"}
    )
    path = toml(
        tmp_path,
        f"""
        [vault]
        url = "{vault.url}"
        config_path = "secret/corral-config"

        [managers.auth]
        signing_key = "vault:secret/corral#signing_key"
        access_ttl = 60

        [managers.state]
        history_limit = "vault:secret/corral#history_limit"
        """,
    )
    config = load_config(path, env={"CORRAL_VAULT_TOKEN": vault.add_token()})
    specs = {spec.name: spec for spec in plan(config)}
    auth = parse_options(AuthOptions, specs["auth"].options, manager="auth")
    assert (auth.access_ttl, auth.leeway, auth.signing_key) == (120, 2.5, "s" * 32)
    state = parse_options(StateOptions, specs["state"].options, manager="state")
    assert state.history_limit == 7
    with System(config) as system:
        assert system.health().status == "healthy"

    vault.put("secret/corral-config", {"managers.auth.access_ttl": "two minutes"})
    config = load_config(path, env={"CORRAL_VAULT_TOKEN": vault.add_token()})
    with pytest.raises(ConfigError) as info:
        plan(config)
    assert info.value.message == (
        "vault: managers.auth.access_ttl: expected int, got a value from vault"
    )
