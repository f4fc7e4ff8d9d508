"""The ``corral`` command: ``run`` the supervisor as a daemon, list ``messages``.

::

    corral run -c corral.toml --log-format json
    corral messages
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import click

from corral import __version__
from corral.config import load_config
from corral.errors import CorralError
from corral.messages.base import registered
from corral.system import System

log = logging.getLogger("corral")

EXIT_ESCALATED = 1
EXIT_CONFIG = 2


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, and any extra fields."""

    _RESERVED = frozenset(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in self._RESERVED})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


@click.group()
@click.version_option(__version__, prog_name="corral")
def main() -> None:
    """corral: supervised actor managers for Python services."""


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file (default: $CORRAL_CONFIG, else none).",
)
@click.option(
    "--log-format",
    type=click.Choice(["plain", "json"]),
    default=None,
    help="Log line format on stderr (overrides log.format).",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
    default=None,
    help="Log level (overrides log.level).",
)
def run(config_path: str | None, log_format: str | None, log_level: str | None) -> None:
    """Start the supervisor and its managers; stop cleanly on SIGTERM or Ctrl-C."""
    try:
        config = load_config(config_path)
    except CorralError as exc:
        click.echo(f"corral: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    setup_logging(log_level or config.log.level, log_format or config.log.format)

    escalated = threading.Event()
    stop = threading.Event()

    def on_escalate(_reason: str) -> None:
        escalated.set()
        stop.set()

    system = System(config, on_escalate=on_escalate)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            log.error("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s: draining and stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.monotonic()
    try:
        system.start()
    except CorralError as exc:
        log.critical("start-up failed: %s", exc)
        system.stop()
        sys.exit(EXIT_ESCALATED)
    log.info(
        "corral %s running %d managers in %.0f ms: %s",
        __version__,
        len(system.supervisor.names),
        (time.monotonic() - started) * 1000,
        ", ".join(system.supervisor.names),
    )
    while not stop.wait(0.5):
        pass
    system.stop()
    if escalated.is_set():
        log.critical("stopped: the supervisor gave up")
        sys.exit(EXIT_ESCALATED)
    log.info("stopped cleanly")


@main.command()
def messages() -> None:
    """List every registered message type with its fields."""
    for name, cls in sorted(registered().items()):
        handler = f" -> {cls.manager}" if cls.manager else ""
        click.echo(f"{name} v{cls.version} ({cls.kind}{handler})")
        for field in cls.fields_info:
            optional = "" if field.required else " (optional)"
            click.echo(f"    {field.name}: {field.describe()}{optional}")


if __name__ == "__main__":
    main()
