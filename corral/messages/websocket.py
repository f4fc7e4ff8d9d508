"""Messages of the ``websocket`` manager: rooms, emits, presence and disconnects.

An embedding service reaches the browsers attached to any daemon::

    system.ask(WsEmitToRoom(room="orders", event="created", data={"id": 7}))
    info = system.ask(WsRoomInfo(room="orders"))       # info.members, info.count
    system.ask(WsJoinRoom(room="vip", connection_id=cid))
    system.ask(WsDisconnect(user="user:42", reason="banned"))

Class names follow the wire names (``ws.emit_to_room`` -> ``WsEmitToRoom``).
Messages marked *internal* travel between the daemon's HTTP loop and the manager.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from corral.messages.base import CloseCode, Count, Offset, Range, Reply, Request, message

__all__ = [
    "WsAck",
    "WsAttach",
    "WsAttached",
    "WsDetach",
    "WsDisconnect",
    "WsDisconnected",
    "WsEmitToRoom",
    "WsEmitted",
    "WsHistory",
    "WsHistoryPage",
    "WsJoinRoom",
    "WsLeaveRoom",
    "WsPublish",
    "WsRoomInfo",
    "WsRoomJoined",
    "WsRoomMembers",
    "WsTick",
]


@message("ws.emitted")
class WsEmitted(Reply):
    """Where an emit landed in the room's sequence: clients resume from ``offset``."""

    room: str
    offset: Offset
    epoch: str


@message("ws.emit_to_room")
class WsEmitToRoom(Request[WsEmitted]):
    """Send ``event`` with ``data`` to every client in ``room``, on every daemon."""

    manager = "websocket"
    room: str
    event: str
    data: Any = None


@message("ws.room_joined")
class WsRoomJoined(Reply):
    """A connection is in the room; ``recovered`` is None when no offset was given.

    ``count`` is the room's members on this daemon, or -1 when the connection is
    attached to another daemon, to which the join was forwarded (the join lands
    there moments later).
    """

    room: str
    connection_id: str
    count: Annotated[int, Range(ge=-1)]
    offset: Offset
    epoch: str
    recovered: bool | None = None


@message("ws.join_room")
class WsJoinRoom(Request[WsRoomJoined]):
    """Put a connection (attached to any daemon) in a room, whatever the room policies say.

    ``NotFound`` when no daemon has the connection. With ``since`` (the last offset the
    client saw) and ``epoch``, the client first receives what it missed from the room's
    history, or a ``gap`` frame.
    """

    manager = "websocket"
    room: str
    connection_id: str
    since: Offset | None = None
    epoch: str | None = None


@message("ws.ack")
class WsAck(Reply):
    """A plain acknowledgement; ``count`` says how many things it touched."""

    count: Count = 0


@message("ws.leave_room")
class WsLeaveRoom(Request[WsAck]):
    """Take a connection out of a room (``count``: 1 if it was in, else 0)."""

    manager = "websocket"
    room: str
    connection_id: str


@message("ws.room_members")
class WsRoomMembers(Reply):
    """The room's members on every daemon (``connection_id``, ``user``, ``node``)."""

    room: str
    members: list[dict[str, Any]]
    count: Count
    users: Count


@message("ws.room_info", idempotent=True)
class WsRoomInfo(Request[WsRoomMembers]):
    """Who is in a room, cluster-wide (presence expires with its TTL)."""

    manager = "websocket"
    room: str


@message("ws.disconnected")
class WsDisconnected(Reply):
    """How many connections were told to close (on this daemon or another)."""

    count: Count


@message("ws.disconnect")
class WsDisconnect(Request[WsDisconnected]):
    """Close one connection, or every connection of a user, wherever it is attached.

    ``code`` is a WebSocket close code, 1000-4999.
    """

    manager = "websocket"
    connection_id: str | None = None
    user: str | None = None
    code: CloseCode = 4000
    reason: str = "disconnected"


@message("ws.publish")
class WsPublish(Request[WsEmitted]):
    """A client's own ``publish`` frame: allowed when the options say so and it is a member."""

    manager = "websocket"
    room: str
    event: str
    connection_id: str
    data: Any = None


@message("ws.history_page")
class WsHistoryPage(Reply):
    """What a room published after ``since``, or ``gap=True`` when history cannot fill it."""

    room: str
    messages: list[dict[str, Any]]
    offset: Offset
    epoch: str
    gap: bool


@message("ws.history", idempotent=True)
class WsHistory(Request[WsHistoryPage]):
    """The room's messages after offset ``since`` (within the same ``epoch``)."""

    manager = "websocket"
    room: str
    since: Offset = 0
    epoch: str | None = None


@message("ws.attached", internal=True)
class WsAttached(Reply):
    connection_id: str


@message("ws.attach", internal=True)
class WsAttach(Request[WsAttached]):
    """Internal: an authenticated socket (or a refreshed token) on this daemon."""

    manager = "websocket"
    connection_id: str
    user: str
    expires_at: float
    scopes: list[str] = msgspec.field(default_factory=list)


@message("ws.detach", internal=True)
class WsDetach(Request[WsAck]):
    """Internal: a socket of this daemon closed; it leaves all its rooms."""

    manager = "websocket"
    connection_id: str


@message("ws.tick", internal=True)
class WsTick(Request[WsAck]):
    """Internal: the periodic beat that refreshes presence and enforces token expiry."""

    manager = "websocket"
