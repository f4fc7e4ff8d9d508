"""The built-in ``system`` manager: answers Ping, so every system has one actor to reach."""

from __future__ import annotations

from corral.actors.base import Manager, handles
from corral.messages.system import Ping, Pong


class SystemManager(Manager):
    """Echoes ``system.ping``; the smallest round trip through a supervised actor."""

    name = "system"

    @handles(Ping)
    def ping(self, message: Ping) -> Pong:
        return Pong(payload=message.payload)
