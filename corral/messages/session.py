"""Messages of sessions, served by the ``state`` manager: login sessions with sliding expiry.

A session is a state of type ``Session`` whose id is a long random token (the session id
a cookie carries, signed by the web framework); it holds its user, its own data and its
idle time to live. Reading it with ``touch`` slides its expiry; rotating gives it a new
id (after a login, against session fixation); destroying a user's sessions ends every
one of them at once, on every daemon::

    info = system.ask(SessionCreate(user="u42", data={"cart": []}, ttl=1800))
    info = system.ask(SessionGet(session_id=info.session_id))         # slides the expiry
    info = system.ask(SessionRotate(session_id=info.session_id))      # a new id, same data
    system.ask(SessionDestroyUser(user="u42"))                        # logs u42 out everywhere
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from corral.messages.base import MAX_TTL, Offset, Range, Reply, Request, message

__all__ = [
    "SessionCreate",
    "SessionDestroy",
    "SessionDestroyUser",
    "SessionDestroyed",
    "SessionGet",
    "SessionInfo",
    "SessionRotate",
    "SessionSave",
    "SessionsRevoked",
]

SessionTtl = Annotated[float, Range(ge=1, le=MAX_TTL, unit="s")]
"""A session's idle time to live: at least a second."""


@message("session.info")
class SessionInfo(Reply):
    """A session: its id, user ("" for an anonymous one), data, version, and when it was
    created and expires (unix ms); ``ttl`` is its idle time to live."""

    session_id: str
    user: str
    data: dict[str, Any]
    version: Offset
    created_at: int
    expires_at: int
    ttl: float


@message("session.create")
class SessionCreate(Request[SessionInfo]):
    """Start a session of ``user`` ("" for anonymous) holding ``data``; it ends after
    ``ttl`` seconds without a touch. The manager draws its id."""

    manager = "state"
    user: str = ""
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    ttl: SessionTtl = 1800.0


@message("session.get")
class SessionGet(Request[SessionInfo]):
    """The session; NotFound when it does not exist, has expired or was revoked.
    ``touch`` slides its expiry (written once half of its time to live has passed)."""

    manager = "state"
    session_id: str
    touch: bool = True


@message("session.save")
class SessionSave(Request[SessionInfo]):
    """Replace the session's data (and slide its expiry); with ``expected_version``, only
    if nobody saved it meanwhile (Conflict otherwise)."""

    manager = "state"
    session_id: str
    data: dict[str, Any]
    expected_version: Offset | None = None


@message("session.rotate")
class SessionRotate(Request[SessionInfo]):
    """Give the session a new id (the old one stops working), keeping its data; with
    ``user``, the session becomes that user's (a login)."""

    manager = "state"
    session_id: str
    user: str | None = None


@message("session.destroyed")
class SessionDestroyed(Reply):
    destroyed: bool


@message("session.destroy")
class SessionDestroy(Request[SessionDestroyed]):
    """End the session (a logout); ``destroyed`` is False when there was none."""

    manager = "state"
    session_id: str


@message("session.revoked")
class SessionsRevoked(Reply):
    """Every session of ``user`` started before is over; ``generation`` counts the times."""

    user: str
    generation: Offset


@message("session.destroy_user")
class SessionDestroyUser(Request[SessionsRevoked]):
    """End every session of ``user``, on every daemon, at once (sessions started after
    this are not affected)."""

    manager = "state"
    user: str
