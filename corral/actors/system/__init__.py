"""The built-in ``system`` manager: answers Ping, so every system has one actor to reach."""

from corral.actors.system._manager import SystemManager

__all__ = ["SystemManager"]
