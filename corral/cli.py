"""The ``corral`` command: ``run`` the supervisor as a daemon, list ``messages``.

::

    corral run -c corral.toml --log-format json
    corral messages
"""

from __future__ import annotations

import difflib
import enum
import importlib
import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, Literal

import click

from corral import __version__
from corral._logging import capture_stray_output, early_format, identify_daemon, setup_logging
from corral._redis import REDIS_ERRORS, check_writable, describe, redact
from corral._redis import connect as connect_redis
from corral.client import Client, connect
from corral.config import (
    Config,
    ConfigSource,
    ConfigWarning,
    LogSection,
    VaultSection,
    VaultSource,
    load_config,
)
from corral.errors import ConfigError, CorralError, InvalidMessage
from corral.messages.base import (
    TIMEOUT,
    Event,
    FieldInfo,
    Message,
    Request,
    lookup,
    registered,
)
from corral.messages.codec import Codec
from corral.messages.system import DEAD_LETTERS_CAP, dead_letters_key
from corral.system import plan

if TYPE_CHECKING:
    from corral.daemon import Daemon

__all__ = [
    "build_message",
    "daemon_flags",
    "main",
    "read_value",
    "remote_flags",
    "render",
    "toml_key",
    "toml_value",
]

log = logging.getLogger("corral")

EXIT_ESCALATED = 1
EXIT_CONFIG = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="corral")
def main() -> None:
    """corral: supervised actor managers for Python services."""


config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file (default: $CORRAL_CONFIG, else none).",
)


import_option = click.option(
    "--import",
    "modules",
    multiple=True,
    metavar="MODULE",
    help="Import MODULE first, to register its message types (repeatable).",
)


def _load(
    config_path: str | None,
    *,
    flags: dict[str, tuple[str, Any]] | None = None,
    notes: list[str] | None = None,
    logged: bool = False,
) -> Config:
    """The config, or exit 2 saying why (in a log line when ``logged``, else on stderr);
    its warnings are appended to ``notes``, else printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        try:
            config = load_config(config_path, flags=flags)
        except CorralError as exc:
            if logged:
                log.critical("%s", exc)
            else:
                click.echo(f"corral: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
    for warning in caught:
        if not issubclass(warning.category, ConfigWarning):
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
        elif notes is not None:
            notes.append(str(warning.message))
        else:
            click.echo(f"corral: warning: {warning.message}", err=True)
    return config


def _register_messages(config: Config, modules: tuple[str, ...]) -> None:
    """Import the modules that define message types: the managers' and the ones named."""
    names = [s.class_path.partition(":")[0] for s in config.managers.values() if s.class_path]
    for module in [*names, *modules]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise click.UsageError(f"cannot import {module}: {exc}") from None


def daemon_flags(command: Callable[..., None]) -> Callable[..., None]:
    """The flags of ``corral run`` that set config keys, beating every other source."""
    for flag in reversed(
        [
            click.option("--host", help="Address to serve HTTP on (overrides daemon.host)."),
            click.option("--port", type=int, help="Port to serve HTTP on (overrides daemon.port)."),
            click.option(
                "--log-level",
                type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
                help="Log level (overrides log.level).",
            ),
            click.option(
                "--log-format",
                type=click.Choice(["plain", "json"]),
                help="Log line format on stderr (overrides log.format).",
            ),
        ]
    ):
        command = flag(command)
    return command


def _flags(
    host: str | None, port: int | None, log_level: str | None, log_format: str | None
) -> dict[str, tuple[str, Any]]:
    given = {
        "daemon.host": ("--host", host),
        "daemon.port": ("--port", port),
        "log.level": ("--log-level", log_level),
        "log.format": ("--log-format", log_format),
    }
    return {key: flag for key, flag in given.items() if flag[1] is not None}


class _RunCommand(click.Command):
    """``corral run``, whose usage errors (a flag's bad value) are log lines in the format
    asked for, like every other line it prints."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        given = list(args)  # parsing consumes args
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            fmt = early_format(_flag_in(given, "--log-format"), _flag_in(given, "-c", "--config"))
            if fmt != "json":
                raise
            setup_logging(LogSection().level, fmt)
            log.critical("%s", exc.format_message())
            sys.exit(EXIT_CONFIG)


def _flag_in(args: list[str], *names: str) -> str | None:
    """The value given to a flag among raw ``args`` (``--flag v`` or ``--flag=v``)."""
    for index, arg in enumerate(args):
        for name in names:
            if arg == name and index + 1 < len(args):
                return args[index + 1]
            if arg.startswith(f"{name}="):
                return arg.partition("=")[2]
    return None


def _verbose_loggers(config: Config) -> list[str]:
    """The loggers at ``log.level`` besides corral's: ``log.loggers`` and the packages of
    the managers named by ``class_path``."""
    packages = [s.class_path.partition(".")[0].partition(":")[0] for s in config.managers.values()]
    return [*config.log.loggers, *(p for p in packages if p)]


@main.command(cls=_RunCommand)
@config_option
@daemon_flags
def run(
    config_path: str | None,
    host: str | None,
    port: int | None,
    log_level: str | None,
    log_format: str | None,
) -> None:
    """Start the supervisor, its managers and the HTTP face; stop on SIGTERM or Ctrl-C.

    Flags beat every other source: defaults < environment < file < Vault < flags.
    Exit status: 0 after a clean stop, 1 when the supervisor gave up, 2 for bad config.
    Every line on stderr is in the log format: before the config is read, the one that
    --log-format, the file's [log] format or CORRAL_LOG_FORMAT gives (in that order).
    """
    setup_logging(LogSection().level, early_format(log_format, config_path))
    capture_stray_output()
    daemon_id = secrets.token_hex(6)
    identify_daemon(daemon_id)
    notes: list[str] = []
    flags = _flags(host, port, log_level, log_format)
    config = _load(config_path, flags=flags, notes=notes, logged=True)
    setup_logging(config.log.level, config.log.format, loggers=_verbose_loggers(config))
    for note in notes:
        log.warning("%s", note)

    escalated = threading.Event()
    stop = threading.Event()

    def on_escalate(_reason: str) -> None:
        escalated.set()
        stop.set()

    stopped_by: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # No logging here: the handler may interrupt the main thread inside a write to
        # stderr, and a second write there raises instead of stopping.
        if stop.is_set() and stopped_by:
            os.write(2, f"second {signal.Signals(signum).name}: exiting now\n".encode())
            os._exit(128 + signum)
        stopped_by.append(signum)
        stop.set()

    reload = threading.Event()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: reload.set())
    started = time.monotonic()
    from corral.daemon import Daemon  # noqa: PLC0415 - the HTTP server loads for `run` only

    try:
        daemon = Daemon(config, on_escalate=on_escalate, daemon_id=daemon_id)
        daemon.start()
    except ConfigError as exc:
        log.critical("start-up failed: %s", exc)
        sys.exit(EXIT_CONFIG)
    except CorralError as exc:
        log.critical("start-up failed: %s", exc)
        sys.exit(EXIT_ESCALATED)
    names = daemon.system.supervisor.names
    log.info(
        "corral %s running %d managers in %.0f ms: %s",
        __version__,
        len(names),
        (time.monotonic() - started) * 1000,
        ", ".join(names),
    )
    vault = _VaultRefresh(config.vault) if config.vault.url else None
    try:
        while not stop.wait(0.5):
            if reload.is_set():
                reload.clear()
                _reload(daemon, config_path, flags)
            if vault is not None and vault.due():
                vault.run(daemon, config_path, flags)
    finally:
        if vault is not None:
            vault.close()
    if stopped_by:
        log.info("%s: draining and stopping", signal.Signals(stopped_by[0]).name)
    daemon.stop(drain=not escalated.is_set())
    if escalated.is_set():
        log.critical("stopped: the supervisor gave up")
        sys.exit(EXIT_ESCALATED)
    log.info("stopped cleanly")


def _reload(
    daemon: Daemon,
    config_path: str | None,
    flags: dict[str, tuple[str, Any]],
    *,
    why: str = "SIGHUP",
    sources: Sequence[ConfigSource] | None = None,
) -> str | None:
    """Read the configuration again and apply what can change while running (SIGHUP, and
    the Vault refresh with ``sources``); the error that left everything as it was, if any."""
    quiet = sources is not None  # the Vault refresh runs often: it tells only of changes
    (log.debug if quiet else log.info)("%s: reading the configuration again", why)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)  # told at start already
            config = load_config(config_path, flags=flags, sources=sources)
        plan(config)  # the managers' own options, checked as at start
    except CorralError as exc:
        log.error("%s: the configuration is not valid, nothing changed: %s", why, exc)
        return str(exc)
    reloaded, restart = daemon.reload(config)
    if any(key.startswith("log.") for key in reloaded):
        setup_logging(config.log.level, config.log.format, loggers=_verbose_loggers(config))
        log.debug("%s: logging at %s, %s", why, config.log.level, config.log.format)
    if reloaded or not quiet:
        log.info("%s: reloaded %s", why, ", ".join(reloaded) or "nothing (no change)")
    if restart:
        log.warning("%s: these take effect on restart only: %s", why, ", ".join(restart))
    return None


class _VaultRefresh:
    """``corral run`` reading Vault again: every ``vault.refresh_interval`` seconds, and
    sooner for a leased secret or a token due for renewal. What changed is applied as on
    SIGHUP; a failed read keeps the last values and marks the daemon degraded until a
    read succeeds."""

    RETRY = 5.0
    """Seconds before a failed read is tried again (or the interval, if shorter)."""

    def __init__(self, section: VaultSection) -> None:
        self.interval = section.refresh_interval
        self.source = VaultSource(section) if self.interval else None
        # At once: start-up's reads are not this source's, and its leases are not known yet.
        self.next_at = time.monotonic()

    def due(self) -> bool:
        return self.source is not None and time.monotonic() >= self.next_at

    def run(
        self, daemon: Daemon, config_path: str | None, flags: dict[str, tuple[str, Any]]
    ) -> None:
        assert self.source is not None
        self.source.forget_secrets()
        failed = _reload(daemon, config_path, flags, why="vault refresh", sources=[self.source])
        wait = self.interval
        if failed is None:
            try:
                lease_due = self.source.refresh()
            except ConfigError as exc:
                failed = str(exc)
            else:
                wait = min(wait, lease_due) if lease_due is not None else wait
        if failed is None:
            if daemon.problems.pop("vault", None) is not None:
                log.info("vault refresh: Vault answers again")
        else:
            daemon.problems["vault"] = (
                f"the configuration could not be read again, the last values stay: {failed}"
            )
            wait = min(wait, self.RETRY)
        self.next_at = time.monotonic() + wait

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


HEALTH_EXIT = {"healthy": 0, "degraded": 1, "unhealthy": 2}
EXIT_UNREACHABLE = 3


@main.command()
@config_option
@click.option("--url", default=None, help="The daemon's HTTP address (default: from daemon.*).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole /health document.")
def health(config_path: str | None, url: str | None, as_json: bool) -> None:
    """Ask a running daemon for its health.

    Exit status: 0 healthy, 1 degraded, 2 unhealthy, 3 no daemon answering.
    """
    if url is None:
        daemon = _load(config_path).daemon
        url = f"http://{daemon.host}:{daemon.port}"
    import httpx  # noqa: PLC0415 - the HTTP client loads for `health` only

    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=5.0)
        document = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        click.echo(f"corral: no daemon answering at {url}: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(f"{document['status']}  ({url})")
        for name, child in document.get("managers", {}).items():
            error = f"  last error: {child['last_error']}" if child.get("last_error") else ""
            click.echo(
                f"  {name:<16} {child['status']:<10} {child['state']:<10} "
                f"restarts={child['restarts']} mailbox={child['mailbox_depth']}{error}"
            )
    sys.exit(HEALTH_EXIT.get(document.get("status", ""), EXIT_UNREACHABLE))


def _check_timeout(_ctx: click.Context, _param: click.Parameter, value: float | None) -> Any:
    """``--timeout``: seconds, 0 to a day (``nan`` and ``inf`` are refused)."""
    if value is None:
        return None
    try:
        return TIMEOUT.check(value, "timeout")
    except InvalidMessage as exc:
        raise click.BadParameter(exc.message) from None


remote_options = [
    click.option("--url", default=None, help="Redis URL of the daemons (default: bus.url)."),
    click.option(
        "--namespace", default=None, help="The daemons' namespace (default: bus.namespace)."
    ),
]


def remote_flags(command: Callable[..., None]) -> Callable[..., None]:
    """``--url`` and ``--namespace``: where the daemons a command talks to are."""
    for flag in reversed(remote_options):
        command = flag(command)
    return command


def _remote(config: Config, url: str | None, namespace: str | None) -> Client:
    if url is None:
        if config.bus.backend != "redis":
            raise click.UsageError(
                "this command talks to a daemon through Redis: pass --url redis://HOST:PORT/DB "
                'or set bus.backend = "redis" and bus.url in the config'
            )
        url = config.bus.url
    return connect(
        url,
        namespace=config.bus.namespace if namespace is None else namespace,
        signing_keys=config.codec.signing_keys,
        replay_window=config.codec.replay_window,
        ask_timeout=config.system.ask_timeout,
    )


@main.command()
@config_option
@click.argument("name")
@click.argument("fields", nargs=-1)
@remote_flags
@click.option("--topic", default=None, help="For an event: the topic to publish it on.")
@click.option(
    "--timeout",
    type=float,
    default=None,
    callback=_check_timeout,
    help="Seconds to wait for the reply (at most a day; default: system.ask_timeout).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON.")
@import_option
def send(
    config_path: str | None,
    name: str,
    fields: tuple[str, ...],
    url: str | None,
    namespace: str | None,
    topic: str | None,
    timeout: float | None,
    as_json: bool,
    modules: tuple[str, ...],
) -> None:
    """Send the message NAME built from FIELD=VALUE pairs, or one JSON object, and print
    the reply.

    \b
    Each VALUE is read as its field's declared type: text for str and for fields that
    take any value, a number for int and float (01234 is 1234), true or false, null for
    an optional field, JSON for lists, maps and nested messages. FIELD:=JSON gives a
    field a JSON value instead: value:=1234 is a number, value=1234 the text "1234".

    \b
    Examples:
      corral send system.ping payload=hello
      corral send cache.set key=k value:=1234 ttl=60
      corral send cache.set '{"key": "k", "value": "01234"}'
    """
    config = _load(config_path)
    _register_messages(config, modules)
    try:
        message = build_message(name, fields)
    except CorralError as exc:
        raise click.UsageError(str(exc)) from None
    with _remote(config, url, namespace) as client:
        try:
            if isinstance(message, Request):
                reply = client.ask(message, timeout=timeout)
                click.echo(render(reply, as_json))
            elif isinstance(message, Event):
                if topic is None:
                    raise click.UsageError(f"{name} is an event: give --topic to publish it on")
                client.publish(topic, message)
            else:
                raise click.UsageError(
                    f"{name} is a {message.kind}: only requests and events are sent"
                )
        except CorralError as exc:
            click.echo(f"error: {exc.code}: {exc}", err=True)
            sys.exit(1)


def build_message(name: str, arguments: tuple[str, ...]) -> Message:
    """A message of the registered type ``name``, validated, from ``FIELD=VALUE`` and
    ``FIELD:=JSON`` arguments or from one JSON object (see ``corral send --help``)::

        build_message("cache.set", ("key=k", "value=01234"))      # value "01234"
        build_message("cache.set", ("key=k", "value:=1234"))      # value 1234
        build_message("cache.set", ('{"key": "k", "value": 1}',))
    """
    cls = lookup(name)
    if cls is None or cls.internal:
        sendable = sorted(
            n for n, c in registered().items() if c.kind in ("request", "event") and not c.internal
        )
        raise InvalidMessage(
            f"unknown message {name!r}{_did_you_mean(name, sendable)}; known: {', '.join(sendable)}"
        )
    fields = {f.name: f for f in cls.fields_info}
    if any(argument.startswith("{") for argument in arguments):
        values = _fields_of_object(name, arguments, fields)
    else:
        values = _fields_of_pairs(name, arguments, fields)
    missing = [f.name for f in cls.fields_info if f.required and f.name not in values]
    if missing:
        raise InvalidMessage(f"{name} needs {', '.join(missing)}")
    return cls._from_wire(values, name)  # checks every field, naming it


def _fields_of_pairs(
    name: str, pairs: tuple[str, ...], fields: dict[str, FieldInfo]
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise InvalidMessage(f"{pair!r} is not FIELD=VALUE or FIELD:=JSON")
        raw = key.endswith(":")
        field = _field(name, key.removesuffix(":"), fields)
        if raw:
            try:
                values[field.name] = json.loads(text)
            except ValueError as exc:
                raise InvalidMessage(f"{pair}: not JSON ({exc})") from None
        else:
            values[field.name] = read_value(field.annotation, text)
    return values


def _fields_of_object(
    name: str, arguments: tuple[str, ...], fields: dict[str, FieldInfo]
) -> dict[str, Any]:
    if len(arguments) != 1:
        raise InvalidMessage("give either one JSON object or FIELD=VALUE pairs, not both")
    try:
        document = json.loads(arguments[0])
    except ValueError as exc:
        raise InvalidMessage(f"the message is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise InvalidMessage(f"the message is not a JSON object: {arguments[0]}")
    values: dict[str, Any] = {}
    for key, value in document.items():
        field = _field(name, key, fields)
        takes_bytes = bytes in _options_of(_unannotated(field.annotation))
        values[key] = value.encode() if takes_bytes and isinstance(value, str) else value
    return values


def _field(name: str, key: str, fields: dict[str, FieldInfo]) -> FieldInfo:
    field = fields.get(key)
    if field is None:
        known = ", ".join(f"{f.name}: {f.describe()}" for f in fields.values()) or "none"
        hint = _did_you_mean(key, list(fields))
        raise InvalidMessage(f"{name} has no field {key!r}{hint}; fields: {known}")
    return field


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def read_value(annotation: Any, text: str) -> Any:
    """``text`` from the command line as a value of the declared type ``annotation``.

    Text for ``str`` and ``Any``, UTF-8 for ``bytes``, the number for ``int`` and
    ``float`` (``"01234"`` is 1234), ``true``/``false`` for ``bool``, ``null`` for the
    None of an optional field, the member for a ``Literal`` or an enum (by value), JSON
    for lists, maps and nested messages. A text that does not read as the type is
    returned as it is, for validation to say what was expected::

        read_value(int | None, "01234")     # 1234
        read_value(Any, "01234")            # "01234"
    """
    tp = _unannotated(annotation)
    options = _options_of(tp)
    if len(options) > 1:
        if text == "null" and type(None) in options:
            return None
        rest = [option for option in options if option is not type(None)]
        return read_value(rest[0], text) if len(rest) == 1 else _json_or_text(text)
    if tp is str or tp is Any:
        return text
    if tp is bytes:
        return text.encode()
    if tp is bool:
        return {"true": True, "false": False}.get(text, text)
    if tp is int or tp is float:
        try:
            return tp(text)
        except ValueError:
            return text
    if typing.get_origin(tp) is Literal:
        return next((value for value in typing.get_args(tp) if str(value) == text), text)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return next((member.value for member in tp if str(member.value) == text), text)
    return _json_or_text(text)


def _unannotated(annotation: Any) -> Any:
    """``T`` of ``Annotated[T, ...]``; any other annotation as it is."""
    return (
        typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
    )


def _options_of(tp: Any) -> tuple[Any, ...]:
    """The types of a union (``int | None``: int, NoneType); ``(tp,)`` for any other."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(_unannotated(option) for option in typing.get_args(tp))
    return (tp,)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def render(message: Message, as_json: bool, *, topic: str | None = None) -> str:
    """A message for people (``[topic]  type field=value ...``) or as one JSON object."""
    wire = message.to_wire()
    if as_json:
        document = {"type": message.type_name, "fields": wire}
        if topic is not None:
            document = {"topic": topic, **document}
        return json.dumps(document, default=_json_default)
    shown = " ".join(f"{k}={json.dumps(v, default=_json_default)}" for k, v in wire.items())
    line = f"{message.type_name} {shown}".rstrip()
    return line if topic is None else f"{topic}  {line}"


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


@main.command()
@config_option
@click.argument("pattern", default="*")
@remote_flags
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
@click.option(
    "--from-offset",
    default=None,
    help="Replay state changes after this position first (0: all kept; or the cursor an "
    "earlier run printed), then follow live.",
)
@click.option(
    "--epoch",
    default=None,
    help="The epoch a numeric --from-offset belongs to (states in one partition only).",
)
def events(
    config_path: str | None,
    pattern: str,
    url: str | None,
    namespace: str | None,
    as_json: bool,
    from_offset: str | None,
    epoch: str | None,
) -> None:
    """Print events whose topic matches PATTERN (Redis glob) until Ctrl-C or SIGTERM."""
    config = _load(config_path)
    start: int | str | None = from_offset
    if from_offset is not None and from_offset.isdigit():
        start = int(from_offset)
    with _remote(config, url, namespace) as client:
        try:
            subscription = client.subscribe(pattern, from_offset=start, epoch=epoch)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--from-offset'") from None
        with subscription:
            try:
                # Explicit handlers: a process started in the background inherits
                # SIGINT ignored, and a supervisor stops it with SIGTERM; both end it
                # cleanly.
                for signum in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(signum, _interrupt)
                click.echo(
                    f"following {pattern!r} at {client.where} in namespace {client.namespace!r} "
                    "(Ctrl-C stops)",
                    err=True,
                )
                for delivery in subscription:
                    click.echo(render(delivery.message, as_json, topic=delivery.topic))
            except KeyboardInterrupt:
                position = getattr(subscription, "position", None)
                if position is not None:  # durable: say where to resume from
                    click.echo(f"resume with --from-offset {position}", err=True)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


@main.command(name="dead-letters")
@config_option
@click.option("--url", default=None, help="Redis URL of the daemons (default: bus.url).")
@click.option("--limit", type=click.IntRange(1, DEAD_LETTERS_CAP), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter.")
def dead_letters(config_path: str | None, url: str | None, limit: int, as_json: bool) -> None:
    """List the latest requests from outside that crashed a manager (newest last).

    Each is refused without running when sent again to the daemon it crashed.
    """
    config = _load(config_path)
    if url is None and config.bus.backend != "redis":
        raise click.UsageError(
            "dead letters are kept in Redis: pass --url redis://HOST:PORT/DB "
            'or set bus.backend = "redis" and bus.url in the config'
        )
    client = connect_redis(url or config.bus.url, setting="--url")
    codec = Codec(keys=[k.encode() for k in config.codec.signing_keys])
    key = dead_letters_key(config.bus.namespace)
    try:
        entries: Any = client.xrevrange(key, count=limit)
    except REDIS_ERRORS as exc:
        raise click.ClickException(describe(exc, redact(url or config.bus.url))) from None
    finally:
        client.close()
    if not entries:
        click.echo(f"no dead letters in {key}", err=True)
    for _, fields in reversed(entries):
        try:
            letter = codec.decode(fields.get(b"m", b"")).message
        except InvalidMessage as exc:
            click.echo(f"(an entry that does not decode: {exc})", err=True)
            continue
        click.echo(render(letter, as_json))


@main.group(name="config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command()
@config_option
@daemon_flags
@click.option("--connect", "reach", is_flag=True, help="Also reach every Redis the config names.")
def check(
    config_path: str | None,
    host: str | None,
    port: int | None,
    log_level: str | None,
    log_format: str | None,
    reach: bool,
) -> None:
    """Check the config as `corral run` does and print it, secrets masked, with sources.

    It takes the flags of `corral run` too. With --connect it also connects to every
    Redis URL of the config, as `corral run` does at start. Exit status: 0 when
    `corral run` would accept the config, 2 when it would refuse it (with --connect,
    also when a Redis cannot be reached).
    """
    config = _load(config_path, flags=_flags(host, port, log_level, log_format))
    try:
        plan(config)  # the managers `corral run` would start: loaded, options checked
        if reach:
            _reach_redis(config)
    except ConfigError as exc:
        click.echo(f"corral: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo("# The config `corral run` would use, as TOML: secrets masked (***), where each")
    click.echo("# value came from in a comment, settings that are not set commented out.\n")
    masked = config.masked()
    tables = [(name, values) for name, values in masked.items() if name != "managers"]
    tables += [(f"managers.{name}", values) for name, values in masked["managers"].items()]
    for table, values in tables:
        click.echo(f"[{table}]")
        for key, value in values.items():  # a manager's options are keys of its table
            source = config.sources.get(f"{table}.{key}", "default")
            if value is None:
                click.echo(f"# {key}: not set  # {source}")
            else:
                click.echo(f"{toml_key(key)} = {toml_value(value)}  # {source}")
        click.echo()


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(key: str) -> str:
    """A TOML key: bare when it can be (``ask_timeout``), else quoted (``"X-Api-Key"``)."""
    return key if _BARE_KEY.fullmatch(key) else toml_value(key)


def toml_value(value: Any) -> str:
    """``value`` written as TOML: strings, numbers, booleans, arrays, inline tables::

        toml_value({"urls": ["http://a"], "X-Key": "v"})  # '{ urls = ["http://a"], "X-Key" = "v" }'

    A None inside an array or a table, which TOML cannot write, is left out.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value if item is not None) + "]"
    if isinstance(value, dict):
        items = [f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    text = str(value)
    escaped = "".join(
        f"\\{char}" if char in '"\\' else f"\\u{ord(char):04X}" if _is_control(char) else char
        for char in text
    )
    return f'"{escaped}"'


def _is_control(char: str) -> bool:
    """A character TOML wants escaped in a string (controls other than tab, and DEL)."""
    return (ord(char) < 0x20 and char != "\t") or ord(char) == 0x7F


def _reach_redis(config: Config) -> None:
    """ConfigError for a Redis URL of ``config`` that no server answers or that names a
    replica."""
    urls = {"bus.url": config.bus.url} if config.bus.backend == "redis" else {}
    for name, section in config.managers.items():
        url = section.options.get("redis_url")
        if isinstance(url, str) and url:
            urls[f"managers.{name}.redis_url"] = url
    for setting, url in urls.items():
        if check_writable(url, setting=setting) is None:
            raise ConfigError(f"{setting}: no Redis answers at {redact(url)}")


@main.command()
@config_option
@import_option
def messages(config_path: str | None, modules: tuple[str, ...]) -> None:
    """List every registered message type with its fields and their bounds (not the
    messages corral sends itself).

    Every float is finite and every int fits in 64 bits; a field's own bounds
    follow its type: ``ttl: float (> 0, <= 315360000 s)``.
    """
    _register_messages(_load(config_path), modules)
    for name, cls in sorted(registered().items()):
        if cls.internal:
            continue
        handler = f" -> {cls.manager}" if cls.manager else ""
        click.echo(f"{name} v{cls.wire_version} ({cls.kind}{handler})")
        for field in cls.fields_info:
            optional = "" if field.required else " (optional)"
            click.echo(f"    {field.name}: {field.describe()}{optional}")
    click.echo(
        "\nEvery float is finite and every int within 64 bits; bounds in parentheses.", err=True
    )


if __name__ == "__main__":
    main()
