"""Options of the ``state`` manager (``[managers.state]``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from corral._statemachine import machine_from_table
from corral.config import REDIS_URL, Section
from corral.messages.base import MAX_TTL
from corral.messages.state import DEFAULT_PARTITIONS, MAX_PARTITIONS, StateMachine

__all__ = ["StateOptions"]


@dataclass(frozen=True, kw_only=True)
class StateOptions(Section):
    """``[managers.state]``: see :mod:`corral.actors.state`."""

    backend: Literal["auto", "memory", "redis"] = "auto"
    redis_url: str = field(default="", metadata=REDIS_URL)
    history_limit: int = field(default=100, metadata={"ge": 1})
    stream_max_len: int = field(default=100_000, metadata={"ge": 1})
    max_data_bytes: int = field(default=65_536, metadata={"ge": 1})
    max_writes: int = field(default=1_000, metadata={"ge": 1})
    expiry_interval: float = field(default=1.0, metadata={"gt": 0})
    partitions: int = field(default=DEFAULT_PARTITIONS, metadata={"ge": 1, "le": MAX_PARTITIONS})
    wait_replicas: int = field(default=0, metadata={"ge": 0, "le": 100})
    wait_timeout: float = field(default=1.0, metadata={"gt": 0, "le": 60})
    tombstone_ttl: float = field(default=30 * 86_400, metadata={"gt": 0, "le": MAX_TTL})
    """Seconds a removed state's last version is kept, so that one created again under its
    id goes on from it (no version is ever reused within that time)."""
    machines: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``[managers.state.machines.<StateType>]``: a declared state machine per state type."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for state_type, table in self.machines.items():
            try:
                machine_from_table(state_type, table)
            except ValueError as exc:
                self._fail(f"machines.{state_type}", str(exc))

    def state_machines(self) -> dict[str, StateMachine]:
        """The declared machines by state type."""
        return {
            state_type: machine_from_table(state_type, table)
            for state_type, table in self.machines.items()
        }
