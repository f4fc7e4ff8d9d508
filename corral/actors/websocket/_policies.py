"""Which rooms a WebSocket client may join by itself: room patterns, first match decides.

A policy maps a room pattern (Redis glob: ``*``, ``?``, ``[...]``) to who may put a
connection in a matching room:

- ``"clients"``: the connection itself, with a ``join`` frame;
- ``"server"``: only the service (``WsJoinRoom``), or a subscription token for the room.

``{sub}`` in a pattern stands for the connection's token subject, taken literally, so
``"user:{sub}"`` matches only the user's own personal room. Policies are tried in
their order and the first pattern that matches decides; a room no pattern matches is
refused (deny by default)::

    policies = RoomPolicies({"user:{sub}": "clients", "public:admin": "server",
                             "public:*": "clients"})
    policies.refusal("user:42", subject="42")        # None: admitted
    policies.refusal("user:42", subject="mallory")   # 'no_policy'
    policies.refusal("public:admin", subject="42")   # 'server_only'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from corral.bus import compile_glob

__all__ = ["CLIENTS", "SERVER", "RoomAccess", "RoomPolicies"]

RoomAccess = Literal["clients", "server"]
CLIENTS: RoomAccess = "clients"
SERVER: RoomAccess = "server"

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


class RoomPolicies:
    """The policies of ``[managers.websocket] room_policies``, ready to decide joins."""

    def __init__(self, policies: Mapping[str, str]) -> None:
        for pattern, access in policies.items():
            problem = _problem(pattern, access)
            if problem:
                raise ValueError(f"{pattern!r}: {problem}")
        self.policies: list[tuple[str, str]] = list(policies.items())

    def refusal(self, room: str, *, subject: str) -> str | None:
        """Why a client of ``subject`` may not join ``room`` by itself; None when it may.

        ``no_policy``: no pattern matches; ``server_only``: the first match says ``server``.
        """
        literal_subject = _GLOB_SPECIAL.sub(r"\\\1", subject)
        for pattern, access in self.policies:
            if compile_glob(pattern.replace("{sub}", literal_subject)).match(room):
                return None if access == CLIENTS else "server_only"
        return "no_policy"


def _problem(pattern: str, access: str) -> str:
    if access not in (CLIENTS, SERVER):
        return f"expected 'clients' or 'server', got {access!r}"
    if not pattern:
        return "a pattern must not be empty"
    unknown = sorted({name for name in _PLACEHOLDER.findall(pattern) if name != "sub"})
    if unknown:
        return f"unknown placeholder {{{unknown[0]}}} (only {{sub}} is known)"
    return ""
