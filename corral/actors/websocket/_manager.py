"""The ``websocket`` manager: rooms, membership, presence, recovery and token expiry.

The actor decides; the daemon's loop sends. Sockets live in the
:class:`~corral.actors.websocket._gateway.Gateway` on the daemon's asyncio loop;
this actor keeps who is in which room, asks the room store (memory or Redis)
for offsets, history and presence, and hands frames to the gateway without
ever waiting on a socket::

    [managers.websocket]
    history_size = 100
    presence_ttl = 30.0
    room_policies = { "user:{sub}" = "clients", "public:*" = "clients" }

    system.ask(WsEmitToRoom(room="orders", event="created", data={"id": 7}))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from corral._redis import REDIS_ERRORS, SyncRedis, connect
from corral.actors.websocket._gateway import CLOSE_UNAUTHORIZED, Gateway, serve_gateway
from corral.actors.websocket._metrics import (
    CONNECTIONS,
    EMITTED,
    FAMILIES,
    FORGED,
    GATEWAY_COUNTS,
    ROOMS,
)
from corral.actors.websocket._options import WebSocketOptions
from corral.actors.websocket._policies import RoomPolicies
from corral.actors.websocket._rooms import MemoryRooms, RedisRooms, Rooms, frame_head
from corral.actors.websocket._signing import ChannelSigner
from corral.config import parse_options
from corral.errors import BackendUnavailable, Conflict, InvalidMessage, NotFound, Unauthorized
from corral.manager import HttpMount, Manager, handles
from corral.messages.system import Health
from corral.messages.websocket import (
    WsAck,
    WsAttach,
    WsAttached,
    WsDetach,
    WsDisconnect,
    WsDisconnected,
    WsEmitted,
    WsEmitToRoom,
    WsHistory,
    WsHistoryPage,
    WsJoinRoom,
    WsLeaveRoom,
    WsPublish,
    WsRoomInfo,
    WsRoomJoined,
    WsRoomMembers,
    WsTick,
)

__all__ = ["WebSocketManager"]

_ROOM = re.compile(r"^[A-Za-z0-9_.:@/\-]{1,128}$")


@dataclass
class _Conn:
    user: str
    expires_at: float
    rooms: set[str] = field(default_factory=set)
    warned: bool = False


def _dumps(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


class WebSocketManager(Manager[WebSocketOptions]):
    """See the module docstring and docs/websocket.md."""

    name = "websocket"
    metric_families = FAMILIES

    @classmethod
    def mount(cls, http: HttpMount) -> None:
        """Serve ``/ws`` on the daemon's port, through a :class:`Gateway` on its loop that
        the actors of this manager on this daemon drive (``self.gateway``)."""
        options: WebSocketOptions = parse_options(WebSocketOptions, http.options, manager=http.name)
        http.shared = serve_gateway(http, options)

    def on_start(self) -> None:
        mounted = self.corral_context.mounted
        self.gateway: Gateway | None = mounted if isinstance(mounted, Gateway) else None
        self.node = self.gateway.node if self.gateway is not None else "embedded"
        url = self.options.redis_url or self.corral_context.redis_url
        self.client: SyncRedis | None = None
        self.signer = ChannelSigner(
            self.corral_context.signing_keys,
            on_refused=lambda: self.corral_metrics.add(FORGED, "history"),
        )
        self.rooms: Rooms
        if self.options.backend == "redis" or (self.options.backend == "auto" and url):
            self.client = connect(
                url,
                setting="managers.websocket.redis_url",
                socket_timeout=self.options.redis_timeout,
            )
            self.rooms = RedisRooms(
                self.client,
                namespace=self.corral_context.namespace,
                history_size=self.options.history_size,
                ttl=self.options.history_ttl,
                presence_ttl=self.options.presence_ttl,
                signer=self.signer,
            )
        else:
            self.rooms = MemoryRooms(history_size=self.options.history_size)
        self.conns: dict[str, _Conn] = {}
        self.local: dict[str, set[str]] = {}
        if self.gateway is not None:  # a restart: take over the sockets that stayed open
            for cid, user, expires_at, rooms in self.gateway.snapshot(timeout=2.0):
                self.conns[cid] = _Conn(user=user, expires_at=expires_at, rooms=set(rooms))
                for room in rooms:
                    self.local.setdefault(room, set()).add(cid)

    def reconfigure(self, options: WebSocketOptions) -> bool:
        """New room policies take effect at once; anything else needs a restart."""
        if dataclasses.replace(options, room_policies=self.options.room_policies) != self.options:
            return False
        if self.gateway is not None:
            self.gateway.policies = RoomPolicies(options.room_policies)
        return True

    def on_stop(self) -> None:
        if self.client is not None:
            self.client.close()

    def health(self) -> Health:
        counted = self.corral_metrics
        counted.set(CONNECTIONS, len(self.conns))
        counted.set(ROOMS, len(self.local))
        gateway: dict[str, int] = {}
        if self.gateway is not None:
            gateway = {key: int(counted.value(family)) for key, family in GATEWAY_COUNTS.items()}
            gateway["forged"] = int(counted.value(FORGED, "channel"))
        return Health(
            status="healthy",
            details={
                "backend": "redis" if self.client else "memory",
                "node": self.node,
                "signed": self.signer.signing,
            },
            metrics={
                "connections": len(self.conns),
                "rooms": len(self.local),
                "emitted": int(counted.value(EMITTED)),
                "forged_history": int(counted.value(FORGED, "history")),
                **gateway,
            },
            dependencies={"auth": "required"},
        )

    @contextlib.contextmanager
    def _backend(self) -> Iterator[None]:
        try:
            yield
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(f"websocket: redis: {exc}", {"backend": "redis"}) from None

    # -- the daemon's sockets -------------------------------------------------------------

    @handles(WsAttach)
    def attach(self, msg: WsAttach) -> WsAttached:
        conn = self.conns.get(msg.connection_id)
        if conn is None:
            self.conns[msg.connection_id] = _Conn(user=msg.user, expires_at=msg.expires_at)
            with self._backend():
                self.rooms.add_connection(self.node, msg.connection_id, msg.user)
        else:  # a refreshed token
            conn.expires_at, conn.warned = msg.expires_at, False
        return WsAttached(connection_id=msg.connection_id)

    @handles(WsDetach)
    def detach(self, msg: WsDetach) -> WsAck:
        conn = self.conns.pop(msg.connection_id, None)
        if conn is None:
            return WsAck(count=0)
        with self._backend():
            for room in list(conn.rooms):
                self._leave(room, msg.connection_id, conn, tell_gateway=False)
            self.rooms.forget_connection(self.node, conn.user, msg.connection_id)
        return WsAck(count=1)

    @handles(WsTick)
    def tick(self, _msg: WsTick) -> WsAck:
        now = time.time()
        for cid, conn in list(self.conns.items()):
            if conn.expires_at > now:
                continue
            if now >= conn.expires_at + self.options.refresh_window:
                self._hand("disconnect", cid, CLOSE_UNAUTHORIZED, "expired")
            elif not conn.warned:
                conn.warned = True
                deadline = conn.expires_at + self.options.refresh_window
                frame = {"type": "refresh_required", "deadline": deadline}
                self._hand("send", cid, [_dumps(frame)])
        with self._backend():
            self.rooms.refresh(
                self.node,
                {room: sorted(cids) for room, cids in self.local.items()},
                {cid: conn.user for cid, conn in self.conns.items()},
            )
        return WsAck(count=len(self.conns))

    # -- rooms ----------------------------------------------------------------------------

    @handles(WsJoinRoom)
    def join(self, msg: WsJoinRoom) -> WsRoomJoined:
        _check_room(msg.room)
        conn = self.conns.get(msg.connection_id)
        with self._backend():
            if conn is None:
                self._forward_known("join", msg.connection_id, room=msg.room)
                offset, epoch = self.rooms.touch(msg.room)
                return WsRoomJoined(
                    room=msg.room, connection_id=msg.connection_id, count=-1, offset=offset,
                    epoch=epoch,
                )  # fmt: skip
            if msg.room not in conn.rooms and len(conn.rooms) >= self.options.max_rooms:
                raise Conflict(f"a connection may be in at most {self.options.max_rooms} rooms")
            member = {
                "connection_id": msg.connection_id,
                "user": conn.user,
                "node": self.node,
                "joined_at": round(time.time(), 3),
            }
            count = self.rooms.join(msg.room, msg.connection_id, member)
            first_here = msg.room not in self.local
            if first_here and self.gateway is not None:
                self.gateway.subscribe_now(msg.room, self.options.redis_timeout)
            self.local.setdefault(msg.room, set()).add(msg.connection_id)
            conn.rooms.add(msg.room)
            offset, epoch = self.rooms.touch(msg.room)
            joined = {"type": "joined", "room": msg.room, "offset": offset, "epoch": epoch}
            recovered: bool | None = None
            if msg.since is None:
                self._hand("join", msg.connection_id, msg.room, [_dumps(joined)], False)
            else:
                self._hand("join", msg.connection_id, msg.room, [], True)
                found = self.rooms.history(msg.room, msg.since, msg.epoch)
                recovered = not found.gap
                joined.update(offset=found.offset, epoch=found.epoch, recovered=recovered)
                frames = [_dumps(joined)]
                if found.gap:
                    frames.append(_gap_frame(msg.room, msg.since, found.offset, found.epoch))
                frames.extend(found.frames)
                self._hand("recovered", msg.connection_id, msg.room, frames, found.offset)
            if self.options.presence_events:
                self._presence_event(msg.room, "join", member)
        return WsRoomJoined(
            room=msg.room, connection_id=msg.connection_id, count=count, offset=offset,
            epoch=epoch, recovered=recovered,
        )  # fmt: skip

    @handles(WsLeaveRoom)
    def leave(self, msg: WsLeaveRoom) -> WsAck:
        _check_room(msg.room)
        conn = self.conns.get(msg.connection_id)
        with self._backend():
            if conn is None:
                return WsAck(count=self._forward("leave", msg.connection_id, room=msg.room))
            if msg.room not in conn.rooms:
                return WsAck(count=0)
            self._leave(msg.room, msg.connection_id, conn, tell_gateway=True)
        return WsAck(count=1)

    def _leave(self, room: str, cid: str, conn: _Conn, *, tell_gateway: bool) -> None:
        conn.rooms.discard(room)
        members = self.local.get(room)
        if members is not None:
            members.discard(cid)
            if not members:
                del self.local[room]
        self.rooms.leave(room, cid)
        if tell_gateway:
            self._hand("leave", cid, room, [_dumps({"type": "left", "room": room})])
        if self.options.presence_events:
            self._presence_event(room, "leave", {"connection_id": cid, "user": conn.user})

    @handles(WsEmitToRoom)
    def emit(self, msg: WsEmitToRoom) -> WsEmitted:
        _check_room(msg.room)
        try:
            head = frame_head(msg.room, msg.event, msg.data)
        except (TypeError, ValueError) as exc:
            raise InvalidMessage(f"data is not JSON: {exc}", path="data") from None
        with self._backend():
            offset, epoch, local = self.rooms.emit(msg.room, head)
        if local is not None:
            self._hand("deliver", msg.room, local)
        self.corral_metrics.add(EMITTED)
        return WsEmitted(room=msg.room, offset=offset, epoch=epoch)

    @handles(WsPublish)
    def publish(self, msg: WsPublish) -> WsEmitted:
        if not self.options.client_publish:
            raise Unauthorized("clients may not publish here", {"reason": "publish_disabled"})
        conn = self.conns.get(msg.connection_id)
        if conn is None or msg.room not in conn.rooms:
            raise Unauthorized("join the room before publishing", {"reason": "not_a_member"})
        return self.emit(WsEmitToRoom(room=msg.room, event=msg.event, data=msg.data))

    @handles(WsRoomInfo)
    def room_info(self, msg: WsRoomInfo) -> WsRoomMembers:
        _check_room(msg.room)
        with self._backend():
            members = self.rooms.members(msg.room)
        users = {str(m.get("user")) for m in members}
        return WsRoomMembers(room=msg.room, members=members, count=len(members), users=len(users))

    @handles(WsHistory)
    def history(self, msg: WsHistory) -> WsHistoryPage:
        _check_room(msg.room)
        with self._backend():
            found = self.rooms.history(msg.room, msg.since, msg.epoch)
        return WsHistoryPage(
            room=msg.room,
            messages=[json.loads(frame) for frame in found.frames],
            offset=found.offset,
            epoch=found.epoch,
            gap=found.gap,
        )

    @handles(WsDisconnect)
    def disconnect(self, msg: WsDisconnect) -> WsDisconnected:
        if (msg.connection_id is None) == (msg.user is None):
            raise InvalidMessage("give exactly one of connection_id and user", path="user")
        with self._backend():
            if msg.connection_id is not None:
                targets = {msg.connection_id: _node_of(msg.connection_id)}
            else:
                assert msg.user is not None
                targets = self.rooms.user_connections(msg.user)
                targets.update(
                    {cid: self.node for cid, c in self.conns.items() if c.user == msg.user}
                )
            count = 0
            for cid in targets:
                if cid in self.conns:
                    self._hand("disconnect", cid, msg.code, msg.reason)
                    count += 1
                else:
                    count += self._forward("disconnect", cid, code=msg.code, reason=msg.reason)
        if msg.connection_id is not None and count == 0:
            raise NotFound(
                f"no connection {msg.connection_id!r}", {"connection_id": msg.connection_id}
            )
        return WsDisconnected(count=count)

    # -- hand-offs ------------------------------------------------------------------------

    def _hand(self, method: str, *args: Any) -> None:
        """Queue a gateway call on the daemon's loop (nothing here waits on a socket)."""
        if self.gateway is not None:
            self.gateway.call(getattr(self.gateway, method), *args)

    def _forward_known(self, op: str, connection_id: str, **fields: Any) -> None:
        """Forward an order about a connection that must exist on another daemon, or NotFound."""
        node = _node_of(connection_id)
        if node == self.node or not self.rooms.has_connection(node, connection_id):
            raise NotFound(f"no connection {connection_id!r}", {"connection_id": connection_id})
        if not self._forward(op, connection_id, **fields):
            raise NotFound(
                f"connection {connection_id!r}: its daemon does not answer",
                {"connection_id": connection_id},
            )

    def _forward(self, op: str, connection_id: str, **fields: Any) -> int:
        """Send an order about another daemon's connection to that daemon's own channel."""
        node = _node_of(connection_id)
        if not isinstance(self.rooms, RedisRooms) or not node or node == self.node:
            return 0
        order = {"op": op, "connection_id": connection_id, **fields}
        return 1 if self.rooms.publish_order(node, _dumps(order)) else 0

    def _presence_event(self, room: str, event: str, member: dict[str, Any]) -> None:
        frame = _dumps({"type": event, "room": room, "data": member})
        if isinstance(self.rooms, RedisRooms):
            self.rooms.publish_frame(room, frame)
        else:
            self._hand("deliver", room, frame)


def _check_room(room: str) -> None:
    if not _ROOM.fullmatch(room):
        raise InvalidMessage(
            "room names are 1-128 characters of letters, digits and _ . : @ / -", path="room"
        )


def _node_of(connection_id: str) -> str:
    return connection_id.rpartition(".")[0]


def _gap_frame(room: str, since: int, offset: int, epoch: str) -> str:
    return _dumps({"type": "gap", "room": room, "since": since, "offset": offset, "epoch": epoch})
