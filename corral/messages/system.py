"""Messages every manager and the supervisor understand: health, ping, lifecycle events."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from corral.messages.base import Count, Event, Range, Reply, Request, message

__all__ = [
    "ChildStatus",
    "DeadLetter",
    "Health",
    "HealthChanged",
    "HealthCheck",
    "HealthStatus",
    "Ping",
    "Pong",
    "Reconfigure",
    "Reconfigured",
    "SupervisorChildChanged",
    "SystemHealth",
    "SystemHealthCheck",
    "dead_letters_key",
]

HealthStatus = Literal["healthy", "degraded", "unhealthy"]


@message("health.health")
class Health(Reply):
    """One manager's health: its status, details, metrics and dependencies."""

    status: HealthStatus
    details: dict[str, Any] = msgspec.field(default_factory=dict)
    metrics: dict[str, Any] = msgspec.field(default_factory=dict)
    dependencies: dict[str, str] = msgspec.field(default_factory=dict)


@message("health.check", idempotent=True)
class HealthCheck(Request[Health]):
    """Ask the manager named ``target`` for its Health; every manager answers it."""

    manager = "*"
    target: str

    def route(self) -> str:
        return self.target


@message("system.ping", idempotent=True)
class Ping(Request["Pong"]):
    """Answered by the built-in ``system`` manager: a round trip through an actor."""

    manager = "system"
    payload: bytes = b""


@message("system.pong")
class Pong(Reply):
    payload: bytes = b""


@message("supervisor.child_status")
class ChildStatus(Reply):
    """The supervisor's view of one child, with the child's own Health when it answered."""

    name: str
    state: Literal["starting", "running", "restarting", "stopped", "failed", "standby"]
    status: HealthStatus
    critical: bool
    restarts: Count
    last_error: str | None
    mailbox_depth: Count
    uptime_s: Annotated[float, Range(ge=0, unit="s")]
    health: Health | None = None

    @property
    def details(self) -> dict[str, Any]:
        """The child's own health details (empty while it has not answered a probe)."""
        return self.health.details if self.health is not None else {}

    @property
    def metrics(self) -> dict[str, Any]:
        """The child's own counters: ``managers["cache"].metrics["hits"]``."""
        return self.health.metrics if self.health is not None else {}

    @property
    def dependencies(self) -> dict[str, str]:
        """The child's dependencies and their states (``{"redis": "up"}``)."""
        return self.health.dependencies if self.health is not None else {}


@message("system.health")
class SystemHealth(Reply):
    """The whole system: unhealthy if a critical child is down, degraded if any isn't healthy."""

    status: HealthStatus
    managers: dict[str, ChildStatus]
    escalated: bool = False


@message("system.health_check", idempotent=True)
class SystemHealthCheck(Request[SystemHealth]):
    """Ask for the health of the whole system (answered by the supervisor)."""

    manager = "supervisor"


@message("supervisor.child_changed")
class SupervisorChildChanged(Event):
    """Published on ``supervisor.child.<change>`` for every lifecycle change of a child."""

    child: str
    change: Literal["started", "stopped", "failed", "restarted", "hung", "escalated", "standby"]
    reason: str = ""
    restarts: Count = 0


DEAD_LETTERS_CAP = 10_000
"""How many dead letters the Redis stream keeps (the oldest are trimmed)."""


def dead_letters_key(namespace: str) -> str:
    """The Redis Stream of dead letters (field ``m``: an encoded :class:`DeadLetter`)."""
    return f"{namespace}:dead-letters"


@message("supervisor.dead_letter")
class DeadLetter(Event):
    """A request from outside the process that crashed its manager: published on
    ``supervisor.dead_letter`` and kept in the dead-letter stream (``corral dead-letters``).

    ``message`` is the request's fields as the manager got them, cut to the first 4 KiB
    of their repr; ``fingerprint`` identifies the same request sent again, which is
    refused without reaching the manager.
    """

    child: str
    """The manager that crashed."""
    message_type: str
    message: str
    error: str
    sender: str
    fingerprint: str
    daemon: str = ""
    at: float = 0.0
    """Unix time of the crash."""


@message("system.reconfigured", internal=True)
class Reconfigured(Reply):
    """Whether a manager took new options at runtime; ``reason`` says why not."""

    applied: bool
    changed: bool = False
    reason: str = ""


@message("system.reconfigure", internal=True)
class Reconfigure(Request[Reconfigured]):
    """Give the manager named ``target`` new options (``corral run`` on SIGHUP); every
    manager answers it, with ``applied = False`` when the change needs a restart."""

    manager = "*"
    target: str
    options: dict[str, Any]

    def route(self) -> str:
        return self.target


@message("health.changed")
class HealthChanged(Event):
    """Published on ``health.changed`` when the system's status changes."""

    status: HealthStatus
    previous: HealthStatus
    reasons: list[str] = msgspec.field(default_factory=list)
