"""The logs of ``corral run``: plain or JSON lines on stderr, every line in one format.

A JSON line is one object::

    {"time": "2025-03-01T12:00:00.123+00:00", "level": "warning", "logger": "corral.actors.auth",
     "message": "...", "daemon": "3f2a9c1b7d4e", "pid": 4242,
     "manager": "auth", "message_type": "auth.refresh", "correlation_id": "9c0e..."}

``manager``, ``message_type`` and ``correlation_id`` are there where known: on a
manager's thread while it handles a message (the correlation id is a remote request's
id), or when the line passes them (``extra={"manager": ...}``). A traceback goes in
``exc``; other ``extra`` fields are kept.

Only corral's loggers, the packages of the managers named by ``class_path``, and the
loggers ``log.loggers`` names log at ``log.level``; every other library logs at WARNING
and above, so that their per-request lines (httpx, aiohttp, ...) do not drown corral's.

The format must be known before the config is, so that an error in the config itself
obeys it: :func:`early_format` reads ``--log-format``, then the file's ``[log] format``
(when the file reads as TOML), then ``CORRAL_LOG_FORMAT``, else plain.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import threading
import tomllib
import types
from collections.abc import Iterable, Mapping
from typing import Any, cast

from corral._runtime import CallbackFuture, current_manager
from corral.config import LogSection
from corral.config._loader import CONFIG_VAR
from corral.config._sections import LogFormat

__all__ = [
    "JsonFormatter",
    "capture_stray_output",
    "early_format",
    "identify_daemon",
    "setup_logging",
]

FORMATS = ("plain", "json")

_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_CONTEXT = ("daemon", "pid", "manager", "message_type", "correlation_id")
_daemon_id = ""


def identify_daemon(daemon_id: str) -> None:
    """Name this process's daemon in every line from now on (``daemon``)."""
    global _daemon_id
    _daemon_id = daemon_id


class ContextFilter(logging.Filter):
    """Adds the daemon's id and pid, and what the current manager is handling."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.daemon = _daemon_id
        record.pid = record.process
        actor = current_manager()
        if actor is None:
            return True
        if not hasattr(record, "manager"):
            record.manager = actor.corral_context.name
        envelope = actor.corral_current_envelope
        if envelope is None:
            return True
        type_name = getattr(envelope.message, "type_name", None)
        if type_name is not None and not hasattr(record, "message_type"):
            record.message_type = type_name
        reply_to = envelope.reply_to
        if isinstance(reply_to, CallbackFuture) and reply_to.correlation:
            record.correlation_id = reply_to.correlation
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO-8601, UTC), level, logger, message, daemon,
    pid, the manager context where known, ``exc`` for a traceback, and any extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT:
            value = getattr(record, key, None)
            if value not in (None, ""):
                line[key] = value
        line.update((k, v) for k, v in vars(record).items() if k not in _RESERVED and k not in line)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def setup_logging(level: str, fmt: LogFormat, *, loggers: Iterable[str] = ()) -> None:
    """Log to stderr in ``fmt`` (``plain`` or ``json``): corral's loggers and ``loggers``
    at ``level``, every other one at WARNING and above."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in {"corral", *loggers}:
        logging.getLogger(name).setLevel(level)


def early_format(
    flag: str | None, config_path: str | None, environ: Mapping[str, str] = os.environ
) -> LogFormat:
    """The log format before the config is loaded (see the module docstring)::

    early_format(None, "corral.toml", {"CORRAL_LOG_FORMAT": "json"})   # "json" unless
    # corral.toml says [log] format = "plain"
    """
    if flag in FORMATS:
        return cast(LogFormat, flag)
    path = config_path or environ.get(CONFIG_VAR)
    if path:
        try:
            with open(path, "rb") as file:
                document = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError):
            document = {}
        section = document.get("log")
        given = section.get("format") if isinstance(section, dict) else None
        if given in FORMATS:
            return cast(LogFormat, given)
    given = environ.get("CORRAL_LOG_FORMAT", "").strip().lower()
    return cast(LogFormat, given) if given in FORMATS else LogSection().format


def capture_stray_output() -> None:
    """Send what Python would print on stderr by itself through logging: warnings,
    uncaught exceptions (main thread, other threads) and unraisable ones."""
    logging.captureWarnings(True)
    log = logging.getLogger("corral")

    def uncaught(
        kind: type[BaseException], value: BaseException, tb: types.TracebackType | None
    ) -> None:
        log.critical("uncaught %s", kind.__name__, exc_info=(kind, value, tb))

    def uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        value = args.exc_value or args.exc_type()
        log.error(
            "uncaught %s in thread %s",
            args.exc_type.__name__,
            name,
            exc_info=(args.exc_type, value, args.exc_traceback),
        )

    def unraisable(what: Any) -> None:
        log.warning(
            "%s: %r",
            what.err_msg or "exception ignored",
            what.object,
            exc_info=(what.exc_type, what.exc_value, what.exc_traceback),
        )

    sys.excepthook = uncaught
    threading.excepthook = uncaught_in_thread
    sys.unraisablehook = unraisable
