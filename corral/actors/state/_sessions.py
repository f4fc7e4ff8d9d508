"""Sessions as states: their ids, what their data holds, and the user's generation.

A session is a ``Session`` state with id ``session:{<tag>}:<token>``: the token is 32
random bytes (URL-safe base64), the tag a hash of the user (of the token for an
anonymous session), so that a user's sessions and their generation share a partition
and a rotation is one commit. Its data holds ``user``, ``generation``, ``ttl`` and the
session's own ``data``. A user's generation (``session-user:{<tag>}:<hash>``) goes up
each time all of the user's sessions are ended; a session of an older one is over::

    state_id = session_id("u42")              # 'session:{5f3a...}:q3v...'
    data = envelope("u42", 0, 1800.0, {"cart": []})
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

from corral.errors import InvalidMessage, NotFound
from corral.messages.session import SessionInfo
from corral.messages.state import StateInfo

__all__ = [
    "MAX_USER",
    "SESSION_TYPE",
    "USER_TYPE",
    "check_user",
    "envelope",
    "generation_id",
    "info_of",
    "is_session_id",
    "session_id",
    "unknown",
]

SESSION_TYPE = "Session"
USER_TYPE = "SessionUser"
MAX_USER = 200
_SESSION_ID = re.compile(r"session:\{[0-9a-f]{16}\}:[A-Za-z0-9_-]{43}")


def _tag(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def session_id(user: str) -> str:
    """A new session id: unguessable, in the partition of ``user``'s sessions."""
    token = secrets.token_urlsafe(32)
    return f"session:{{{_tag(user or token)}}}:{token}"


def generation_id(user: str) -> str:
    """The id of the state that holds ``user``'s session generation."""
    return f"session-user:{{{_tag(user)}}}:{hashlib.sha256(user.encode()).hexdigest()}"


def is_session_id(text: str) -> bool:
    return bool(_SESSION_ID.fullmatch(text))


def check_user(user: str, path: str = "user") -> None:
    if len(user) > MAX_USER:
        raise InvalidMessage(f"a user is at most {MAX_USER} characters", path=path)


def unknown(text: str) -> NotFound:
    """The error for a session that does not exist (any more): it never says why."""
    return NotFound("no such session", {"session_id": text[:80]})


def envelope(user: str, generation: int, ttl: float, data: dict[str, Any]) -> dict[str, Any]:
    """What a session's state holds."""
    return {"user": user, "generation": generation, "ttl": ttl, "data": data}


def info_of(state: StateInfo) -> SessionInfo:
    """The session a state holds."""
    held = state.data
    return SessionInfo(
        session_id=state.state_id,
        user=held["user"],
        data=held["data"],
        version=state.version,
        created_at=state.created_at,
        expires_at=state.expires_at or 0,
        ttl=held["ttl"],
    )
