"""The system actor: echoes ``system.ping``."""

from __future__ import annotations

from corral.manager import Manager, handles
from corral.messages.system import Ping, Pong

__all__ = ["SystemManager"]


class SystemManager(Manager):
    """Echoes ``system.ping``; the smallest round trip through a supervised actor."""

    name = "system"

    @handles(Ping)
    def ping(self, message: Ping) -> Pong:
        return Pong(payload=message.payload)
