"""corral.config: defaults, the layers and their precedence, errors, masking, references."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corral.config import (
    BusSection,
    CodecSection,
    Config,
    ConfigSource,
    ConfigWarning,
    DaemonSection,
    LogSection,
    ManagerSection,
    Section,
    SupervisorSection,
    SystemSection,
    load_config,
)
from corral.errors import ConfigError


@dataclass
class FakeVault:
    """A ConfigSource: a layer of values, and ``vault:<path>`` references to ``secrets``."""

    name: str = "vault"
    layer: dict[str, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[str, Any] = field(default_factory=dict)

    def values(self) -> Mapping[str, Mapping[str, Any]]:
        return self.layer

    def resolve(self, reference: str) -> Any | None:
        if not reference.startswith("vault:"):
            return None
        path = reference.removeprefix("vault:")
        if path not in self.secrets:
            raise ConfigError(f"no secret at {path}")
        return self.secrets[path]


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corral.toml"
    path.write_text(text)
    return path


def error_of(path: str | Path | None = None, **kwargs: Any) -> str:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)
    return info.value.message


# -- defaults -------------------------------------------------------------------------------


def test_defaults() -> None:
    config = Config()
    assert config.system == SystemSection(
        name="corral", ask_timeout=5.0, mailbox_size=10_000, mailbox_put_timeout=1.0, validate=True
    )
    assert config.supervisor.strategy == "one_for_one"
    assert (config.supervisor.max_restarts, config.supervisor.period) == (5, 30.0)
    assert config.bus.backend == "memory"
    assert config.bus.url == "redis://127.0.0.1:6379/0"
    assert config.codec == CodecSection(max_size=1_048_576, max_depth=32, signing_keys=[])
    assert config.log == LogSection(level="INFO", format="plain")
    assert config.daemon == DaemonSection(host="127.0.0.1", port=8650)
    assert config.managers == {}
    assert set(config.sources.values()) == {"default"}
    assert len(config.sources) == sum(
        len(dataclasses.fields(getattr(config, name)))
        for name in ("system", "supervisor", "bus", "codec", "log", "daemon", "vault")
    )


def test_no_file_and_no_environment_is_the_defaults() -> None:
    config = load_config(env={})
    assert config == Config()
    assert config.sources == Config().sources


def test_env_none_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("CORRAL_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("CORRAL_DAEMON_PORT", "9001")
    config = load_config()
    assert config.daemon.port == 9001
    assert config.sources["daemon.port"] == "env CORRAL_DAEMON_PORT"


# -- precedence -----------------------------------------------------------------------------


def test_each_layer_beats_the_one_below(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        """
        [supervisor]
        max_restarts = 2
        period = 20
        """,
    )
    env = {
        "CORRAL_SUPERVISOR_MAX_RESTARTS": "1",
        "CORRAL_SUPERVISOR_PERIOD": "10",
        "CORRAL_SUPERVISOR_PROBE_INTERVAL": "3",
    }
    vault = FakeVault(layer={"supervisor": {"max_restarts": 3}})

    config = load_config(path, env=env, sources=[vault])

    s = config.supervisor
    assert (s.max_restarts, s.period, s.probe_interval, s.probe_timeout) == (3, 20.0, 3.0, 5.0)
    assert config.sources["supervisor.max_restarts"] == "vault"
    assert config.sources["supervisor.period"] == f"file {path}"
    assert config.sources["supervisor.probe_interval"] == "env CORRAL_SUPERVISOR_PROBE_INTERVAL"
    assert config.sources["supervisor.probe_timeout"] == "default"


def test_flags_beat_every_source(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        '[daemon]\nport = 9000\nhost = "0.0.0.0"\ndashboard_token = "t0ken-0f-16-chars"\n'
        '[log]\nlevel = "DEBUG"\n',
    )
    env = {"CORRAL_DAEMON_PORT": "9100", "CORRAL_LOG_FORMAT": "json"}
    vault = FakeVault(layer={"daemon": {"port": "9200"}})
    flags = {"daemon.port": ("--port", 9300), "log.level": ("--log-level", "ERROR")}

    config = load_config(path, env=env, sources=[vault], flags=flags)

    assert (config.daemon.host, config.daemon.port) == ("0.0.0.0", 9300)
    assert (config.log.level, config.log.format) == ("ERROR", "json")
    assert config.sources["daemon.port"] == "flag --port"
    assert config.sources["log.level"] == "flag --log-level"
    assert config.sources["daemon.host"] == f"file {path}"
    assert config.masked()["daemon"]["port"] == 9300  # a flag is no secret


def test_flags_are_checked_like_every_value() -> None:
    assert error_of(flags={"daemon.port": ("--port", 70000)}) == (
        "flag --port: daemon.port: must be <= 65535, got 70000"
    )
    assert error_of(flags={"log.level": ("--log-level", "LOUD")}) == (
        "flag --log-level: log.level: expected one of 'DEBUG', 'INFO', 'WARNING', 'ERROR', "
        "got 'LOUD'"
    )
    with pytest.raises(ValueError, match=r"^not a setting: 'daemon\.porth'$"):
        load_config(env={}, flags={"daemon.porth": ("--port", 1)})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost", "LOCALHOST"])
def test_a_loopback_daemon_needs_no_dashboard_token(host: str) -> None:
    assert load_config(env={}, flags={"daemon.host": ("--host", host)}).daemon.host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.7", "corral.internal"])
def test_a_daemon_listening_beyond_loopback_needs_a_dashboard_token(host: str) -> None:
    problem = error_of(flags={"daemon.host": ("--host", host)})
    assert problem.startswith(
        "flag --host: daemon.dashboard_token: required when daemon.host is not a loopback "
        "address: anyone who reaches the port would see the dashboard"
    )
    env = {"CORRAL_DAEMON_DASHBOARD_TOKEN": "0123456789abcdef"}
    config = load_config(env=env, flags={"daemon.host": ("--host", host)})
    assert config.daemon.dashboard_token == "0123456789abcdef"
    assert config.masked()["daemon"]["dashboard_token"] == "***"


def test_a_short_dashboard_token_is_refused() -> None:
    assert error_of(env={"CORRAL_DAEMON_DASHBOARD_TOKEN": "hunter2"}).startswith(
        "env CORRAL_DAEMON_DASHBOARD_TOKEN: daemon.dashboard_token: must be at least 16 "
        "characters long"
    )


def test_later_sources_beat_earlier_ones() -> None:
    first = FakeVault(name="first", layer={"daemon": {"port": 1, "host": "localhost"}})
    second = FakeVault(name="second", layer={"daemon": {"port": 2}})
    config = load_config(env={}, sources=[first, second])
    assert (config.daemon.host, config.daemon.port) == ("localhost", 2)
    assert config.sources["daemon.host"] == "first"
    assert config.sources["daemon.port"] == "second"


def test_config_file_from_corral_config_variable(tmp_path: Path) -> None:
    path = toml(tmp_path, '[log]\nlevel = "DEBUG"\n')
    config = load_config(env={"CORRAL_CONFIG": str(path)})
    assert config.log.level == "DEBUG"
    assert config.sources["log.level"] == f"file {path}"


def test_explicit_path_beats_corral_config_variable(tmp_path: Path) -> None:
    path = toml(tmp_path, '[log]\nlevel = "ERROR"\n')
    config = load_config(path, env={"CORRAL_CONFIG": str(tmp_path / "missing.toml")})
    assert config.log.level == "ERROR"


# -- environment ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "text", "section", "key", "value"),
    [
        ("CORRAL_SYSTEM_NAME", "billing", "system", "name", "billing"),
        ("CORRAL_SUPERVISOR_MAX_RESTARTS", "7", "supervisor", "max_restarts", 7),
        ("CORRAL_SYSTEM_ASK_TIMEOUT", "0.5", "system", "ask_timeout", 0.5),
        ("CORRAL_SYSTEM_ASK_TIMEOUT", "2", "system", "ask_timeout", 2.0),
        ("CORRAL_SYSTEM_VALIDATE", "false", "system", "validate", False),
        ("CORRAL_SYSTEM_VALIDATE", "No", "system", "validate", False),
        ("CORRAL_SYSTEM_VALIDATE", "0", "system", "validate", False),
        ("CORRAL_SYSTEM_VALIDATE", "TRUE", "system", "validate", True),
        ("CORRAL_SYSTEM_VALIDATE", "yes", "system", "validate", True),
        ("CORRAL_SYSTEM_VALIDATE", "1", "system", "validate", True),
        ("CORRAL_CODEC_SIGNING_KEYS", "k1, k2,,k3", "codec", "signing_keys", ["k1", "k2", "k3"]),
        ("CORRAL_CODEC_SIGNING_KEYS", "", "codec", "signing_keys", []),
        ("CORRAL_SUPERVISOR_STRATEGY", "rest_for_one", "supervisor", "strategy", "rest_for_one"),
        ("CORRAL_BUS_URL", "redis://h:1/2", "bus", "url", "redis://h:1/2"),
    ],
)
def test_env_values_are_parsed_as_the_field_type(
    var: str, text: str, section: str, key: str, value: Any
) -> None:
    config = load_config(env={var: text})
    got = getattr(getattr(config, section), key)
    assert got == value
    assert type(got) is type(value)
    assert config.sources[f"{section}.{key}"] == f"env {var}"


@pytest.mark.parametrize(
    ("var", "text", "message"),
    [
        (
            "CORRAL_SUPERVISOR_MAX_RESTARTS",
            "many",
            "env CORRAL_SUPERVISOR_MAX_RESTARTS: supervisor.max_restarts: expected int, got 'many'",
        ),
        (
            "CORRAL_SUPERVISOR_MAX_RESTARTS",
            "2.5",
            "env CORRAL_SUPERVISOR_MAX_RESTARTS: supervisor.max_restarts: expected int, got '2.5'",
        ),
        (
            "CORRAL_SYSTEM_ASK_TIMEOUT",
            "soon",
            "env CORRAL_SYSTEM_ASK_TIMEOUT: system.ask_timeout: expected float, got 'soon'",
        ),
        (
            "CORRAL_SYSTEM_VALIDATE",
            "maybe",
            "env CORRAL_SYSTEM_VALIDATE: system.validate: "
            "expected bool (true/false, yes/no, 1/0), got 'maybe'",
        ),
        (
            "CORRAL_LOG_LEVEL",
            "debug",
            "env CORRAL_LOG_LEVEL: log.level: "
            "expected one of 'DEBUG', 'INFO', 'WARNING', 'ERROR', got 'debug'",
        ),
        (
            "CORRAL_SUPERVISOR_MAX_RESTARTS",
            "-1",
            "env CORRAL_SUPERVISOR_MAX_RESTARTS: supervisor.max_restarts: must be >= 0, got -1",
        ),
        (
            "CORRAL_DAEMON_PORT",
            "70000",
            "env CORRAL_DAEMON_PORT: daemon.port: must be <= 65535, got 70000",
        ),
        (
            "CORRAL_BUS_QUEUE_SIZE",
            "0",
            "env CORRAL_BUS_QUEUE_SIZE: bus.queue_size: must be >= 1, got 0",
        ),
        (
            "CORRAL_MANAGERS_CACHE_MAILBOX_SIZE",
            "big",
            "env CORRAL_MANAGERS_CACHE_MAILBOX_SIZE: managers.cache.mailbox_size: "
            "expected int, got 'big'",
        ),
    ],
)
def test_bad_env_values(var: str, text: str, message: str) -> None:
    assert error_of(env={var: text}) == message


@pytest.mark.parametrize(
    ("var", "message"),
    [
        (
            "CORRAL_BUS_URLL",
            "env CORRAL_BUS_URLL: not a corral setting (did you mean CORRAL_BUS_URL?)",
        ),
        (
            "CORRAL_DAEMON_SERVICE_HOST",
            "env CORRAL_DAEMON_SERVICE_HOST: not a corral setting "
            "(did you mean CORRAL_DAEMON_HOST?)",
        ),
        (
            "CORRAL_MANAGERS_CACHE_MAX_ENTRIES",
            "env CORRAL_MANAGERS_CACHE_MAX_ENTRIES: not a corral setting (CORRAL_MANAGERS_<NAME>"
            "_<FIELD> sets a field of a manager; its options are set in the file)",
        ),
    ],
)
def test_unknown_key_of_a_known_section_in_the_environment(var: str, message: str) -> None:
    assert error_of(env={var: "x"}) == message


@pytest.mark.parametrize(
    ("var", "message"),
    [
        (
            "CORRAL_REDIS_URL",
            "env CORRAL_REDIS_URL: not a corral setting, ignored (did you mean CORRAL_BUS_URL?)",
        ),
        ("CORRAL_NOTHING", "env CORRAL_NOTHING: not a corral setting, ignored"),
        # What Kubernetes sets in every pod of a namespace with a Service named corral.
        ("CORRAL_PORT", "env CORRAL_PORT: not a corral setting, ignored"),
        ("CORRAL_SERVICE_HOST", "env CORRAL_SERVICE_HOST: not a corral setting, ignored"),
        (
            "CORRAL_PORT_8650_TCP_ADDR",
            "env CORRAL_PORT_8650_TCP_ADDR: not a corral setting, ignored",
        ),
    ],
)
def test_other_corral_variables_are_a_warning(var: str, message: str) -> None:
    with pytest.warns(ConfigWarning) as caught:
        config = load_config(env={var: "tcp://10.0.0.7:8650", "CORRAL_BUS_NAMESPACE": "k8s"})
    assert [str(warning.message) for warning in caught] == [message]
    assert config == Config().replace(bus=BusSection(namespace="k8s"))


def test_other_env_variables_are_ignored() -> None:
    assert load_config(env={"PATH": "/bin", "CORRALX": "1", "corral_bus_url": "x"}) == Config()


def test_env_sets_manager_fields() -> None:
    config = load_config(
        env={
            "CORRAL_MANAGERS_RATE_LIMITER_CRITICAL": "true",
            "CORRAL_MANAGERS_RATE_LIMITER_DEPENDS_ON": "cache,pool",
            "CORRAL_MANAGERS_RATE_LIMITER_SHUTDOWN_TIMEOUT": "2",
        }
    )
    assert config.managers == {
        "rate_limiter": ManagerSection(
            critical=True, depends_on=["cache", "pool"], shutdown_timeout=2.0
        )
    }
    assert config.sources["managers.rate_limiter.critical"] == (
        "env CORRAL_MANAGERS_RATE_LIMITER_CRITICAL"
    )
    assert config.sources["managers.rate_limiter.enabled"] == "default"


# -- the TOML file --------------------------------------------------------------------------


def test_file_values(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        """
        [system]
        name = "billing"
        ask_timeout = 2          # an int is fine for a float

        [bus]
        backend = "redis"
        url = "redis://redis:6379/1"

        [codec]
        signing_keys = ["k1", "k2"]
        """,
    )
    config = load_config(path, env={})
    assert config.system.name == "billing"
    assert config.system.ask_timeout == 2.0
    assert isinstance(config.system.ask_timeout, float)
    assert config.bus == BusSection(backend="redis", url="redis://redis:6379/1")
    assert config.codec.signing_keys == ["k1", "k2"]
    assert config.sources["bus.url"] == f"file {path}"
    assert config.sources["bus.namespace"] == "default"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[supervisor]\nmax_restarts = '5'", "supervisor.max_restarts: expected int, got str"),
        ("[supervisor]\nmax_restarts = true", "supervisor.max_restarts: expected int, got bool"),
        ("[supervisor]\nmax_restarts = 5.0", "supervisor.max_restarts: expected int, got float"),
        ("[system]\nvalidate = 1", "system.validate: expected bool, got int"),
        ("[system]\nask_timeout = '5'", "system.ask_timeout: expected float, got str"),
        ("[codec]\nsigning_keys = 'k1'", "codec.signing_keys: expected list[str], got str"),
        ("[codec]\nsigning_keys = ['k1', 2]", "codec.signing_keys[1]: expected str, got int"),
        (
            "[supervisor]\nstrategy = 'one_for_none'",
            "supervisor.strategy: expected one of 'one_for_one', 'one_for_all', "
            "'rest_for_one', got 'one_for_none'",
        ),
        ("bus = 'redis'", "bus: expected a table, got str"),
        ("[bus]\nurll = 'x'", "bus.urll: unknown key (did you mean bus.url?)"),
        (
            "[bus]\nurl = 'http://u:pw@db/0'",
            "bus.url: unsupported scheme 'http': use one of redis, rediss, unix, "
            "redis+sentinel, rediss+sentinel (got 'http://db/0')",
        ),
        ("[bus]\nbackend = 'redis'\nurl = ''", "bus.url: the redis backend needs a URL"),
        ("[buss]\nurl = 'x'", "buss: unknown section (did you mean bus?)"),
        ("[cache]\nttl = 1", "cache: unknown section"),
        ("managers = 1", "managers: expected a table, got int"),
        ("[managers]\ncache = 1", "managers.cache: expected a table, got int"),
        (
            "[managers.cache]\ncritical = 'yes'",
            "managers.cache.critical: expected bool, got str",
        ),
        (
            "[managers.cache]\nrestart = 'always'",
            "managers.cache.restart: expected one of 'permanent', 'transient', 'temporary', "
            "got 'always'",
        ),
        (
            "[managers.cache]\nclass_path = 'myapp.cache.Cache'",
            "managers.cache.class_path: expected 'package.module:ClassName', "
            "got 'myapp.cache.Cache'",
        ),
        ("[supervisor]\nmax_restarts = -1", "supervisor.max_restarts: must be >= 0, got -1"),
        ("[supervisor]\nperiod = 0", "supervisor.period: must be > 0, got 0.0"),
        ("[supervisor]\nperiod = nan", "supervisor.period: must be > 0, got nan"),
        ("[daemon]\nport = -1", "daemon.port: must be >= 0, got -1"),
        ("[codec]\nmax_depth = 0", "codec.max_depth: must be >= 1, got 0"),
        ("[managers.cache]\nmailbox_size = 0", "managers.cache.mailbox_size: must be >= 1, got 0"),
        (
            "[supervisor]\nbackoff_initial = 10",
            "supervisor.backoff_initial: must be <= supervisor.backoff_max (5.0), got 10.0",
        ),
        ("[system]\nask_timeout = inf", "system.ask_timeout: must be <= 86400, got inf"),
        ("[system]\nask_timeout = nan", "system.ask_timeout: must be > 0, got nan"),
        ("[system]\nask_timeout = 1e9", "system.ask_timeout: must be <= 86400, got 1000000000.0"),
        (
            "[system]\nmailbox_put_timeout = -inf",
            "system.mailbox_put_timeout: must be >= 0, got -inf",
        ),
        (
            "[supervisor]\nprobe_interval = inf",
            "supervisor.probe_interval: must be <= 86400, got inf",
        ),
        ("[daemon]\nclaim_idle = inf", "daemon.claim_idle: must be <= 86400, got inf"),
        (
            "[managers.cache]\nshutdown_timeout = inf",
            "managers.cache.shutdown_timeout: must be <= 86400, got inf",
        ),
    ],
)
def test_bad_file_values_name_the_file_and_key(tmp_path: Path, text: str, problem: str) -> None:
    path = toml(tmp_path, text)
    assert error_of(path) == f"{path}: {problem}"


def test_problem_across_layers_names_every_origin(tmp_path: Path) -> None:
    path = toml(tmp_path, "[bus]\nreconnect_max = 0.5\n")
    message = error_of(path, env={"CORRAL_BUS_RECONNECT_INITIAL": "1"})
    assert message == (
        f"env CORRAL_BUS_RECONNECT_INITIAL, {path}: bus.reconnect_initial: "
        "must be <= bus.reconnect_max (0.5), got 1.0"
    )


def test_bad_value_in_a_lower_layer_is_reported_even_when_overridden(tmp_path: Path) -> None:
    path = toml(tmp_path, "[daemon]\nport = 9000\n")
    assert error_of(path, env={"CORRAL_DAEMON_PORT": "http"}) == (
        "env CORRAL_DAEMON_PORT: daemon.port: expected int, got 'http'"
    )


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert error_of(path) == f"{path}: cannot read: No such file or directory"


def test_missing_file_named_by_corral_config(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert error_of(env={"CORRAL_CONFIG": str(path)}) == (
        f"{path}: cannot read: No such file or directory"
    )


def test_malformed_toml(tmp_path: Path) -> None:
    path = toml(tmp_path, "[bus\nurl = 1\n")
    assert error_of(path) == (
        f"{path}: invalid TOML: "
        "Expected ']' at the end of a table declaration (at line 1, column 5)"
    )


# -- managers -------------------------------------------------------------------------------


def test_manager_tables_with_options(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        """
        [managers.cache]
        critical = true
        depends_on = ["pool"]
        mailbox_size = 500
        strategy = "lru"
        max_entries = 1000

        [managers.cache.redis]
        db = 2

        [managers.pool]
        class_path = "myapp.pool:Pool"
        restart = "transient"
        shutdown_timeout = 3
        options = "kept as an option"

        [managers.websocket]
        enabled = false
        """,
    )
    config = load_config(path, env={"CORRAL_MANAGERS_CACHE_CRITICAL": "false"})

    assert config.managers == {
        "cache": ManagerSection(
            critical=True,
            depends_on=["pool"],
            mailbox_size=500,
            options={"strategy": "lru", "max_entries": 1000, "redis": {"db": 2}},
        ),
        "pool": ManagerSection(
            class_path="myapp.pool:Pool",
            restart="transient",
            shutdown_timeout=3.0,
            options={"options": "kept as an option"},
        ),
        "websocket": ManagerSection(enabled=False),
    }
    assert config.sources["managers.cache.critical"] == f"file {path}"
    assert config.sources["managers.cache.max_entries"] == f"file {path}"
    assert config.sources["managers.cache.redis"] == f"file {path}"
    assert config.sources["managers.cache.restart"] == "default"
    assert config.masked()["managers"]["cache"] == {
        "enabled": True,
        "class_path": "",
        "critical": True,
        "restart": "permanent",
        "placement": None,
        "depends_on": ["pool"],
        "shutdown_timeout": None,
        "mailbox_size": 500,
        "strategy": "lru",
        "max_entries": 1000,
        "redis": {"db": 2},
    }


def test_an_empty_manager_table_enables_the_manager(tmp_path: Path) -> None:
    path = toml(tmp_path, "[managers.cache]\n[managers.state]\n[managers.pool]\nenabled = false\n")
    config = load_config(path, env={})
    assert config.managers == {
        "cache": ManagerSection(),
        "state": ManagerSection(),
        "pool": ManagerSection(enabled=False),
    }
    assert config.sources["managers.cache.enabled"] == "default"
    assert config.sources["managers.pool.enabled"] == f"file {path}"
    # The table sets nothing, so the environment's value stands.
    disabled = load_config(path, env={"CORRAL_MANAGERS_STATE_ENABLED": "false"})
    assert disabled.managers["state"] == ManagerSection(enabled=False)
    assert disabled.sources["managers.state.enabled"] == "env CORRAL_MANAGERS_STATE_ENABLED"


def test_an_empty_manager_table_from_a_source_enables_the_manager() -> None:
    config = load_config(env={}, sources=[FakeVault(layer={"managers": {"cache": {}}})])
    assert config.managers == {"cache": ManagerSection()}
    assert config.secret_keys == frozenset()


def test_manager_options_from_a_source_merge_key_by_key(tmp_path: Path) -> None:
    path = toml(tmp_path, "[managers.auth]\nissuer = 'corral'\nttl = 60\n")
    vault = FakeVault(layer={"managers": {"auth": {"jwt_secret": "s3cret", "ttl": 30}}})
    config = load_config(path, env={}, sources=[vault])
    assert config.managers["auth"].options == {
        "issuer": "corral",
        "ttl": 30,
        "jwt_secret": "s3cret",
    }
    assert config.sources["managers.auth.ttl"] == "vault"
    assert config.sources["managers.auth.issuer"] == f"file {path}"


@dataclass(frozen=True, kw_only=True)
class _Unbounded(Section):
    ratio: float = 1.0
    maybe: float | None = None


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_float_of_a_section_is_finite(value: float) -> None:
    with pytest.raises(ConfigError, match=r"^ratio: must be a finite number, got -?(inf|nan)$"):
        _Unbounded(ratio=value)
    with pytest.raises(ConfigError, match=r"^maybe: must be a finite number"):
        _Unbounded(maybe=value)
    assert _Unbounded(ratio=1e308, maybe=None).ratio == 1e308


def test_timeouts_from_the_environment_are_bounded(tmp_path: Path) -> None:
    path = toml(tmp_path, "")
    for text in ("inf", "nan", "-1", "1e999"):
        message = error_of(path, env={"CORRAL_SYSTEM_ASK_TIMEOUT": text})
        assert message.startswith("env CORRAL_SYSTEM_ASK_TIMEOUT: system.ask_timeout: must be")


def test_sections_check_values_when_built_in_code() -> None:
    with pytest.raises(ConfigError, match=r"^supervisor\.max_restarts: must be >= 0, got -1$"):
        SupervisorSection(max_restarts=-1)
    with pytest.raises(ConfigError, match=r"^depends_on: expected list\[str\], got str$"):
        ManagerSection(depends_on="pool")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^options: 'critical' is a field of the manager"):
        ManagerSection(options={"critical": True})


# -- masking --------------------------------------------------------------------------------


def test_masked_hides_secrets(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        """
        [bus]
        url = "redis://app:p%40ss@redis:6379/0"

        [codec]
        signing_keys = ["k1", "k2"]

        [managers.auth]
        jwt_secret = "hunter2"
        issuer = "corral"
        upstream = "https://bot:t0ken@example.com/api"
        """,
    )
    config = load_config(path, env={})
    shown = config.masked()
    assert shown["bus"]["url"] == "redis://app:***@redis:6379/0"
    assert shown["codec"]["signing_keys"] == ["***", "***"]
    auth = shown["managers"]["auth"]
    assert auth["jwt_secret"] == "***"
    assert auth["issuer"] == "corral"
    assert auth["upstream"] == "https://bot:***@example.com/api"
    assert shown["daemon"] == {
        "host": "127.0.0.1",
        "port": 8650,
        "heartbeat_interval": 0.5,
        "heartbeat_ttl": 2.0,
        "claim_idle": 1.0,
        "drain_timeout": 20.0,
        "lease_ttl": 3.0,
        "dashboard_token": "",
    }
    assert config.codec.signing_keys == ["k1", "k2"]  # masking is only for display
    for secret in ("p%40ss", "k1", "hunter2", "t0ken"):
        assert secret not in repr(config)
        assert secret not in str(shown)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://default:pw@redis:6380", "rediss://default:***@redis:6380"),
        ("redis://:p@ss@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("redis://user@redis:6379/0", "redis://user@redis:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_masked_replaces_url_passwords(url: str, shown: str) -> None:
    config = Config().replace(bus=BusSection(url=url))
    assert config.masked()["bus"]["url"] == shown


def test_masked_hides_every_value_from_a_source() -> None:
    vault = FakeVault(layer={"daemon": {"host": "10.0.0.7", "dashboard_token": "t" * 16}})
    config = load_config(env={}, sources=[vault])
    assert config.daemon.host == "10.0.0.7"
    assert config.masked()["daemon"] == {
        "host": "***",
        "port": 8650,
        "heartbeat_interval": 0.5,
        "heartbeat_ttl": 2.0,
        "claim_idle": 1.0,
        "drain_timeout": 20.0,
        "lease_ttl": 3.0,
        "dashboard_token": "***",
    }


def test_strings_from_a_source_are_parsed_like_env_values() -> None:
    vault = FakeVault(layer={"daemon": {"port": "9200"}, "codec": {"signing_keys": "k1,k2"}})
    config = load_config(env={}, sources=[vault])
    assert config.daemon.port == 9200
    assert config.codec.signing_keys == ["k1", "k2"]
    assert error_of(sources=[FakeVault(layer={"daemon": {"port": "http"}})]) == (
        "source vault: daemon.port: expected int, got a value from vault"
    )


# -- references -----------------------------------------------------------------------------


def test_vault_references_are_resolved(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        """
        [bus]
        url = "vault:secret/corral#redis_url"

        [codec]
        signing_keys = ["vault:secret/corral#key1", "plain"]

        [daemon]
        port = "vault:secret/corral#port"
        """,
    )
    vault = FakeVault(
        secrets={
            "secret/corral#redis_url": "redis://:pw@redis:6379/0",
            "secret/corral#key1": "k1",
            "secret/corral#port": "9100",
        }
    )
    config = load_config(path, env={}, sources=[vault])

    assert config.bus.url == "redis://:pw@redis:6379/0"
    assert config.codec.signing_keys == ["k1", "plain"]
    assert config.daemon.port == 9100  # secret stores hold text: parsed like env values
    assert config.sources["bus.url"] == f"vault (reference in file {path})"
    assert config.masked()["bus"]["url"] == "***"
    assert config.masked()["daemon"]["port"] == "***"


def test_references_in_env_values_and_list_items() -> None:
    vault = FakeVault(secrets={"a#k1": "k1", "a#k2": "k2"})
    config = load_config(
        env={"CORRAL_CODEC_SIGNING_KEYS": "vault:a#k1, vault:a#k2"}, sources=[vault]
    )
    assert config.codec.signing_keys == ["k1", "k2"]
    assert (
        config.sources["codec.signing_keys"] == "vault (reference in env CORRAL_CODEC_SIGNING_KEYS)"
    )


def test_overridden_reference_is_never_resolved(tmp_path: Path) -> None:
    path = toml(tmp_path, "[bus]\nurl = 'redis://redis:6379/0'\n")
    config = load_config(path, env={"CORRAL_BUS_URL": "vault:nowhere#url"})
    assert config.bus.url == "redis://redis:6379/0"


def test_vault_reference_without_a_source(tmp_path: Path) -> None:
    path = toml(tmp_path, "[managers.auth]\njwt_secret = 'vault:secret/corral#jwt_secret'\n")
    assert error_of(path) == (
        f"{path}: managers.auth.jwt_secret: "
        "cannot resolve 'vault:secret/corral#jwt_secret': no Vault source is configured"
    )


def test_unresolvable_reference(tmp_path: Path) -> None:
    path = toml(tmp_path, "[bus]\nurl = 'vault:secret/corral#nope'\n")
    assert error_of(path, sources=[FakeVault()]) == (
        f"{path}: bus.url: cannot resolve 'vault:secret/corral#nope': "
        "no secret at secret/corral#nope"
    )


def test_vault_reference_no_source_claims() -> None:
    class Consul:
        name = "consul"

        def values(self) -> Mapping[str, Mapping[str, Any]]:
            return {}

        def resolve(self, reference: str) -> Any | None:
            return "from consul" if reference.startswith("consul:") else None

    source: ConfigSource = Consul()
    assert load_config(env={"CORRAL_SYSTEM_NAME": "consul:name"}, sources=[source]).system.name == (
        "from consul"
    )
    assert error_of(env={"CORRAL_SYSTEM_NAME": "vault:x#y"}, sources=[source]) == (
        "env CORRAL_SYSTEM_NAME: system.name: cannot resolve 'vault:x#y': "
        "no source resolves it (consul)"
    )


def test_resolved_value_of_the_wrong_type_is_not_shown() -> None:
    vault = FakeVault(secrets={"x#port": "not-a-port"})
    assert error_of(env={"CORRAL_DAEMON_PORT": "vault:x#port"}, sources=[vault]) == (
        "env CORRAL_DAEMON_PORT: daemon.port: "
        "expected int, got a value from vault (reference in env CORRAL_DAEMON_PORT)"
    )


def test_strings_with_other_schemes_stay_as_they_are() -> None:
    config = load_config(env={"CORRAL_SYSTEM_NAME": "svc:billing"}, sources=[FakeVault()])
    assert config.system.name == "svc:billing"
    assert config.sources["system.name"] == "env CORRAL_SYSTEM_NAME"


# -- Config ---------------------------------------------------------------------------------


def test_replace_marks_values_as_code() -> None:
    config = load_config(env={"CORRAL_BUS_NAMESPACE": "x", "CORRAL_DAEMON_PORT": "1"})
    replaced = config.replace(bus=BusSection(backend="redis"), managers={"cache": ManagerSection()})
    assert replaced.bus == BusSection(backend="redis")
    assert replaced.daemon.port == 1
    assert replaced.sources["bus.backend"] == "code"
    assert replaced.sources["bus.namespace"] == "default"
    assert replaced.sources["daemon.port"] == "env CORRAL_DAEMON_PORT"
    assert replaced.sources["managers.cache.enabled"] == "default"
    assert config.bus.backend == "memory"


def test_equality_ignores_provenance(tmp_path: Path) -> None:
    path = toml(tmp_path, "[daemon]\nport = 9000\n")
    assert load_config(path, env={}) == Config().replace(daemon=DaemonSection(port=9000))
