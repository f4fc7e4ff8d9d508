"""Options of the ``websocket`` manager (``[managers.websocket]``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from corral.actors.websocket._policies import RoomPolicies
from corral.config import REDIS_URL, Section

__all__ = ["WebSocketOptions"]

_POSITIVE = {"gt": 0}


_NON_NEGATIVE = {"ge": 0}


_SIZE = {"ge": 1}


@dataclass(frozen=True, kw_only=True, repr=False)
class WebSocketOptions(Section):
    """``[managers.websocket]``: see docs/websocket.md."""

    backend: Literal["auto", "memory", "redis"] = "auto"
    redis_url: str = field(default="", metadata=REDIS_URL)
    redis_timeout: float = field(default=1.0, metadata=_POSITIVE)
    history_size: int = field(default=100, metadata=_NON_NEGATIVE)
    history_ttl: int = field(default=300, metadata=_SIZE)
    presence_ttl: float = field(default=30.0, metadata=_POSITIVE)
    presence_events: bool = False
    client_publish: bool = False
    refresh_window: float = field(default=30.0, metadata=_NON_NEGATIVE)
    auth_timeout: float = field(default=5.0, metadata=_POSITIVE)
    send_queue_size: int = field(default=1000, metadata=_SIZE)
    max_frame_size: int = field(default=65536, metadata={"ge": 64})
    inbound_rate: float = field(default=50.0, metadata=_POSITIVE)
    inbound_burst: int = field(default=100, metadata=_SIZE)
    max_rooms: int = field(default=100, metadata=_SIZE)
    close_timeout: float = field(default=1.0, metadata=_POSITIVE)
    room_policies: dict[str, str] = field(default_factory=lambda: {"user:{sub}": "clients"})
    """Room pattern -> who may join: ``clients`` or ``server`` (see ``_policies``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            RoomPolicies(self.room_policies)
        except ValueError as exc:
            self._fail("room_policies", str(exc))

    @property
    def tick_interval(self) -> float:
        """How often presence is refreshed and token expiry checked."""
        return min(self.presence_ttl / 3, self.refresh_window / 2 or 1.0, 1.0)
