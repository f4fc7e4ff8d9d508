"""The sections of the config: frozen dataclasses that check their own values."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NoReturn

from corral._redis import parse_url
from corral.bus import DEFAULT_CALLBACK_THREADS, MAX_CALLBACK_THREADS
from corral.config._values import Mismatch, Text, convert, hide, mask
from corral.errors import ConfigError
from corral.messages.base import MAX_TIMEOUT
from corral.messages.signing import DEFAULT_REPLAY_WINDOW

Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
Restart = Literal["permanent", "transient", "temporary"]
Backend = Literal["memory", "redis"]
Placement = Literal["any", "singleton"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["plain", "json"]

# Field metadata: bounds and URLs checked on construction, secrecy for repr() and masked().
_POSITIVE = {"gt": 0}
_NON_NEGATIVE = {"ge": 0}
_SIZE = {"ge": 1}
_TIMEOUT = {"gt": 0, "le": MAX_TIMEOUT}
_CLASS_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

REDIS_URL: dict[str, Any] = {"redis_url": True}
"""Field metadata: the value is empty or a Redis URL (see ``corral._redis``)."""


@dataclass(frozen=True, kw_only=True, repr=False)
class Section:
    """Base of every section: checks field types and bounds when constructed.

    Bounds come from field metadata (``gt``, ``ge``, ``le``, ``le_field``); a float
    is also always finite (``inf`` and ``nan`` are refused).

    A bad value raises :class:`ConfigError` whose details carry ``field``,
    ``problem`` and ``related`` (other fields the problem involves), so that the
    loader can say where the offending values came from.
    """

    prefix: ClassVar[str] = ""
    """The section's name in dotted keys (``bus``); empty for managers, which are named by key."""

    def __post_init__(self) -> None:
        types = field_types(type(self))
        for f in dataclasses.fields(self):
            given = getattr(self, f.name)
            try:
                if isinstance(given, Text):  # parsed as the environment's values are
                    value = convert(types[f.name], str(given), text=True)
                else:
                    value = convert(types[f.name], given)
            except Mismatch as exc:
                problem = exc.problem
                if isinstance(given, Text) and given.secret:
                    problem = f"expected {exc.expected}, got a value from {given.origin}"
                self._fail(f.name, problem, path=exc.path)
            object.__setattr__(self, f.name, value)
        for f in dataclasses.fields(self):
            self._check_bounds(f)

    def _check_bounds(self, f: dataclasses.Field[Any]) -> None:
        value = getattr(self, f.name)
        if value is None:
            return
        if value and (f.name == "redis_url" or f.metadata.get("redis_url")):
            try:
                parse_url(value, setting=self._key(f.name))
            except ConfigError as exc:
                self._fail(f.name, str(exc).partition(": ")[2])
        # Written as "not (ok)" so that NaN fails every bound.
        if "gt" in f.metadata and not value > f.metadata["gt"]:
            self._fail(f.name, f"must be > {f.metadata['gt']}, got {value}")
        if "ge" in f.metadata and not value >= f.metadata["ge"]:
            self._fail(f.name, f"must be >= {f.metadata['ge']}, got {value}")
        if "le" in f.metadata and not value <= f.metadata["le"]:
            self._fail(f.name, f"must be <= {f.metadata['le']}, got {value}")
        if "le_field" in f.metadata:
            other = f.metadata["le_field"]
            limit = getattr(self, other)
            if not value <= limit:
                self._fail(
                    f.name, f"must be <= {self._key(other)} ({limit}), got {value}", related=other
                )
        if isinstance(value, float) and not math.isfinite(value):
            self._fail(f.name, f"must be a finite number, got {value}")

    def _key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def _fail(self, name: str, problem: str, *, path: str = "", related: str = "") -> NoReturn:
        raise ConfigError(
            f"{self._key(name)}{path}: {problem}",
            {"field": name, "problem": problem, "related": [related] if related else []},
        )

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={hide(value) if f.metadata.get('secret') else mask(value)!r}"
            for f in dataclasses.fields(self)
            for value in [getattr(self, f.name)]
        )
        return f"{type(self).__name__}({shown})"


_field_types: dict[type[Section], dict[str, Any]] = {}


def field_types(cls: type[Section]) -> dict[str, Any]:
    """The resolved type of each field of a section class."""
    if cls not in _field_types:
        hints = typing.get_type_hints(cls)
        _field_types[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _field_types[cls]


@dataclass(frozen=True, kw_only=True, repr=False)
class SystemSection(Section):
    """``[system]``: the actor system as a whole."""

    prefix: ClassVar[str] = "system"

    name: str = "corral"
    ask_timeout: float = field(default=5.0, metadata=_TIMEOUT)
    mailbox_size: int = field(default=10_000, metadata=_SIZE)
    mailbox_put_timeout: float = field(default=1.0, metadata={"ge": 0, "le": MAX_TIMEOUT})
    validate: bool = True


@dataclass(frozen=True, kw_only=True, repr=False)
class SupervisorSection(Section):
    """``[supervisor]``: restart strategy, restart intensity, backoff, probes: the policy a
    :class:`corral.supervisor.Supervisor` follows."""

    prefix: ClassVar[str] = "supervisor"

    strategy: Strategy = "one_for_one"
    max_restarts: int = field(default=5, metadata=_NON_NEGATIVE)
    period: float = field(default=30.0, metadata=_TIMEOUT)
    backoff_initial: float = field(default=0.05, metadata={"ge": 0, "le_field": "backoff_max"})
    backoff_max: float = field(default=5.0, metadata={"ge": 0, "le": MAX_TIMEOUT})
    backoff_jitter: float = field(default=0.2, metadata={"ge": 0, "le": 1})
    probe_interval: float = field(default=2.0, metadata=_TIMEOUT)
    probe_timeout: float = field(default=5.0, metadata=_TIMEOUT)
    shutdown_timeout: float = field(default=5.0, metadata=_TIMEOUT)
    start_timeout: float = field(default=10.0, metadata=_TIMEOUT)


@dataclass(frozen=True, kw_only=True, repr=False)
class BusSection(Section):
    """``[bus]``: the in-memory bus, or Redis at ``url`` (whose password is masked)."""

    prefix: ClassVar[str] = "bus"

    backend: Backend = "memory"
    url: str = field(default="redis://127.0.0.1:6379/0", metadata=REDIS_URL)
    namespace: str = "corral"
    queue_size: int = field(default=10_000, metadata=_SIZE)
    callback_threads: int = field(
        default=DEFAULT_CALLBACK_THREADS, metadata={"ge": 1, "le": MAX_CALLBACK_THREADS}
    )
    """Threads the callbacks of every callback subscription run on."""
    reconnect_initial: float = field(default=0.1, metadata={"ge": 0, "le_field": "reconnect_max"})
    reconnect_max: float = field(default=5.0, metadata={"ge": 0, "le": MAX_TIMEOUT})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend == "redis" and not self.url:
            self._fail("url", "the redis backend needs a URL", related="backend")


@dataclass(frozen=True, kw_only=True, repr=False)
class CodecSection(Section):
    """``[codec]``: message size and depth limits, HMAC signing keys (secret), and the
    replay window: with keys, receivers refuse a signed timestamp further than
    ``replay_window`` seconds from their clock, and an id they took within it."""

    prefix: ClassVar[str] = "codec"

    max_size: int = field(default=1_048_576, metadata=_SIZE)
    max_depth: int = field(default=32, metadata=_SIZE)
    signing_keys: list[str] = field(default_factory=list, metadata={"secret": True})
    replay_window: float = field(default=DEFAULT_REPLAY_WINDOW, metadata=_TIMEOUT)


@dataclass(frozen=True, kw_only=True, repr=False)
class LogSection(Section):
    """``[log]``: level and format of the logs on stderr.

    corral's own loggers, the packages of the managers named by ``class_path`` and the
    ``loggers`` named here log at ``level``; every other library at WARNING and above.
    """

    prefix: ClassVar[str] = "log"

    level: LogLevel = "INFO"
    format: LogFormat = "plain"
    loggers: list[str] = field(default_factory=list)
    """Other loggers (by name, such as ``aiohttp.access``) that log at ``level`` too."""


@dataclass(frozen=True, kw_only=True, repr=False)
class DaemonSection(Section):
    """``[daemon]``: where ``corral run`` serves /health, /metrics and the dashboard."""

    prefix: ClassVar[str] = "daemon"

    host: str = "127.0.0.1"
    port: int = field(default=8650, metadata={"ge": 0, "le": 65535})
    heartbeat_interval: float = field(default=0.5, metadata=_TIMEOUT)
    """How often a daemon renews its presence for remote clients (bus on Redis)."""
    heartbeat_ttl: float = field(default=2.0, metadata=_TIMEOUT)
    """How long a silent daemon still counts as serving; then its requests are claimed."""
    claim_idle: float = field(default=1.0, metadata=_TIMEOUT)
    """How long a dead daemon's request must have been idle before another claims it
    (so that two daemons never claim the same one)."""
    drain_timeout: float = field(default=20.0, metadata=_TIMEOUT)
    """On SIGTERM, how long to finish the requests taken before stopping the managers."""
    lease_ttl: float = field(default=3.0, metadata=_TIMEOUT)
    """How long a singleton manager's lease lasts unless renewed: the longest a singleton
    is out of service when its daemon dies."""
    dashboard_token: str = field(default="", metadata={"secret": True})
    """The token that opens the dashboard and its JSON endpoints (empty: open to all). Required
    when ``host`` is not a loopback address; at least 16 characters."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.heartbeat_interval >= self.heartbeat_ttl:
            self._fail(
                "heartbeat_interval",
                "must be shorter than daemon.heartbeat_ttl, or live daemons look dead",
                related="heartbeat_ttl",
            )
        if self.dashboard_token and len(self.dashboard_token) < MIN_DASHBOARD_TOKEN:
            self._fail(
                "dashboard_token",
                f"must be at least {MIN_DASHBOARD_TOKEN} characters long (make one with "
                "python -c 'import secrets; print(secrets.token_urlsafe(24))')",
            )
        if not self.dashboard_token and not is_loopback(self.host):
            self._fail(
                "dashboard_token",
                "required when daemon.host is not a loopback address: anyone who reaches "
                "the port would see the dashboard; set one (for example "
                "CORRAL_DAEMON_DASHBOARD_TOKEN) or listen on 127.0.0.1",
                related="host",
            )


MIN_DASHBOARD_TOKEN = 16
"""The shortest ``daemon.dashboard_token`` accepted."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only: ``localhost`` or a loopback IP.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@dataclass(frozen=True, kw_only=True, repr=False)
class VaultSection(Section):
    """``[vault]``: HashiCorp Vault, the top layer of the config; an empty ``url`` means none.

    Auth is by ``token``, or by AppRole with ``role_id`` and ``secret_id``. Secrets
    live on KV v2 mounts: a path such as ``secret/corral`` starts with its mount,
    which is ``mount`` when the path starts with it (it may hold slashes), else the
    first segment. ``config_path`` names a secret whose keys are dotted settings
    (``bus.url``). TLS is checked against ``ca_cert``, else the system's CAs, unless
    ``verify`` is false. ``corral run`` reads the secrets again every
    ``refresh_interval`` seconds (and a leased secret before its lease ends), and
    applies what changed as SIGHUP does; 0 reads them at start-up and on SIGHUP only.
    """

    prefix: ClassVar[str] = "vault"

    url: str = ""
    token: str = field(default="", metadata={"secret": True})
    role_id: str = ""
    secret_id: str = field(default="", metadata={"secret": True})
    mount: str = "secret"
    config_path: str = ""
    timeout: float = field(default=5.0, metadata=_TIMEOUT)
    verify: bool = True
    ca_cert: str = ""
    refresh_interval: float = field(default=60.0, metadata={"ge": 0, "le": 86_400})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.url and not self.url.startswith(("http://", "https://")):
            self._fail("url", f"expected an http:// or https:// URL, got {self.url!r}")
        if not self.mount or self.mount.startswith("/") or self.mount.endswith("/"):
            self._fail("mount", f"expected a mount such as 'secret', got {self.mount!r}")
        if self.role_id and not self.secret_id:
            self._fail("secret_id", "AppRole auth needs it with vault.role_id", related="role_id")
        if self.secret_id and not self.role_id:
            self._fail("role_id", "AppRole auth needs it with vault.secret_id", related="secret_id")
        if self.token and self.role_id:
            self._fail(
                "token",
                "set vault.token or vault.role_id and vault.secret_id, not both",
                related="role_id",
            )
        if self.url and not (self.token or self.role_id):
            self._fail("url", "Vault needs vault.token, or vault.role_id and vault.secret_id")
        if self.ca_cert and not self.verify:
            self._fail("ca_cert", "has no use with vault.verify = false", related="verify")


@dataclass(frozen=True, kw_only=True, repr=False)
class ManagerSection(Section):
    """One ``[managers.<name>]`` table: the child spec of a manager.

    ``class_path`` is ``"package.module:ClassName"``; empty means the built-in
    manager of that name. Every key of the table that is not a field here lands
    in ``options``, which the manager validates itself.
    """

    enabled: bool = True
    class_path: str = ""
    critical: bool = False
    restart: Restart = "permanent"
    placement: Placement | None = None
    """``any`` or ``singleton`` (see ``ChildSpec.placement``); None: the class's own."""
    depends_on: list[str] = field(default_factory=list)
    shutdown_timeout: float | None = field(default=None, metadata=_TIMEOUT)
    mailbox_size: int | None = field(default=None, metadata=_SIZE)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.class_path and not _CLASS_PATH.match(self.class_path):
            self._fail(
                "class_path", f"expected 'package.module:ClassName', got {self.class_path!r}"
            )
        # Options share the table, and so the dotted keys, with the fields.
        shadowing = sorted(MANAGER_FIELDS.intersection(self.options))
        if shadowing:
            self._fail("options", f"{shadowing[0]!r} is a field of the manager, not an option")


SECTIONS: dict[str, type[Section]] = {
    cls.prefix: cls
    for cls in (
        SystemSection,
        SupervisorSection,
        BusSection,
        CodecSection,
        LogSection,
        DaemonSection,
        VaultSection,
    )
}
"""The fixed sections by name, in the order they are shown; ``managers`` is apart."""

MANAGER_FIELDS = frozenset(f.name for f in dataclasses.fields(ManagerSection)) - {"options"}
"""The keys of a ``[managers.<name>]`` table that are fields rather than options."""
