"""Where rooms keep their sequence, history and presence: in memory, or in Redis.

Every message a room publishes gets the next ``offset`` of the room and the
room's ``epoch`` (a random id made when the room's sequence starts, so a client
can tell a restarted sequence from the one it followed). In Redis one Lua
script assigns the offset, appends the frame to the capped history stream and
PUBLISHes it on the room's own channel, in one round trip. With signing keys the
frame's head is signed before the script runs (see :mod:`._signing`)::

    rooms = RedisRooms(redis_client, namespace="corral", history_size=100, ttl=300,
                       presence_ttl=30.0, signer=ChannelSigner(keys))
    offset, epoch, local = rooms.emit("orders", frame_head)   # local is None: published
"""

from __future__ import annotations

import json
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral._redis import SyncRedis, publish_own
from corral._time import now_ms
from corral.actors.websocket._signing import ChannelSigner

__all__ = ["HistorySlice", "MemoryRooms", "RedisRooms", "Rooms", "frame_head"]


def frame_head(room: str, event: str, data: Any) -> str:
    """The JSON of a message frame up to its offset: the store appends offset and epoch."""
    body = json.dumps(
        {"type": "message", "room": room, "event": event, "data": data},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return body[:-1] + ',"offset":'


def _finish(head: str, offset: int, epoch: str) -> str:
    return f'{head}{offset},"epoch":"{epoch}"}}'


def _new_epoch() -> str:
    return secrets.token_hex(4)


@dataclass
class HistorySlice:
    """Frames after an offset, or ``gap`` when the history cannot give all of them."""

    frames: list[str]
    offset: int
    epoch: str
    gap: bool


def _slice(
    since: int, epoch: str | None, offset: int, room_epoch: str, entries: list[tuple[int, str]]
) -> HistorySlice:
    if (epoch and epoch != room_epoch) or since > offset:
        return HistorySlice([], offset, room_epoch, gap=True)
    if since == offset:
        return HistorySlice([], offset, room_epoch, gap=False)
    if not entries or entries[0][0] != since + 1:
        return HistorySlice([], offset, room_epoch, gap=True)
    return HistorySlice([frame for _, frame in entries], offset, room_epoch, gap=False)


class Rooms(Protocol):
    """The store the manager uses; both kinds raise redis errors untranslated."""

    def touch(self, room: str) -> tuple[int, str]: ...

    def emit(
        self, room: str, head: str, *, history: bool = True
    ) -> tuple[int, str, str | None]: ...

    def history(self, room: str, since: int, epoch: str | None) -> HistorySlice: ...

    def join(self, room: str, connection_id: str, member: dict[str, Any]) -> int: ...

    def leave(self, room: str, connection_id: str) -> None: ...

    def members(self, room: str) -> list[dict[str, Any]]: ...

    def refresh(
        self, node: str, rooms: dict[str, list[str]], connections: dict[str, str]
    ) -> None: ...

    def user_connections(self, user: str) -> dict[str, str]: ...

    def add_connection(self, node: str, connection_id: str, user: str) -> None: ...

    def has_connection(self, node: str, connection_id: str) -> bool: ...

    def forget_connection(self, node: str, user: str, connection_id: str) -> None: ...


@dataclass
class _MemoryRoom:
    epoch: str = field(default_factory=_new_epoch)
    offset: int = 0
    history: deque[tuple[int, str]] = field(default_factory=deque)
    members: dict[str, dict[str, Any]] = field(default_factory=dict)


class MemoryRooms:
    """One process's rooms: what a daemon without Redis uses."""

    def __init__(self, *, history_size: int) -> None:
        self.history_size = history_size
        self.rooms: dict[str, _MemoryRoom] = {}
        self.users: dict[str, dict[str, str]] = {}

    def _room(self, room: str) -> _MemoryRoom:
        state = self.rooms.get(room)
        if state is None:
            state = self.rooms[room] = _MemoryRoom(history=deque(maxlen=self.history_size or 1))
        return state

    def touch(self, room: str) -> tuple[int, str]:
        state = self._room(room)
        return state.offset, state.epoch

    def emit(self, room: str, head: str, *, history: bool = True) -> tuple[int, str, str | None]:
        state = self._room(room)
        state.offset += 1
        frame = _finish(head, state.offset, state.epoch)
        if history and self.history_size:
            state.history.append((state.offset, frame))
        return state.offset, state.epoch, frame

    def history(self, room: str, since: int, epoch: str | None) -> HistorySlice:
        state = self._room(room)
        entries = [entry for entry in state.history if entry[0] > since]
        return _slice(since, epoch, state.offset, state.epoch, entries)

    def join(self, room: str, connection_id: str, member: dict[str, Any]) -> int:
        state = self._room(room)
        state.members[connection_id] = member
        self.users.setdefault(member["user"], {})[connection_id] = member["node"]
        return len(state.members)

    def leave(self, room: str, connection_id: str) -> None:
        state = self.rooms.get(room)
        if state is not None:
            state.members.pop(connection_id, None)

    def members(self, room: str) -> list[dict[str, Any]]:
        state = self.rooms.get(room)
        return list(state.members.values()) if state is not None else []

    def refresh(self, node: str, rooms: dict[str, list[str]], connections: dict[str, str]) -> None:
        self.users = _by_user(node, connections)

    def user_connections(self, user: str) -> dict[str, str]:
        return dict(self.users.get(user, {}))

    def add_connection(self, node: str, connection_id: str, user: str) -> None:
        self.users.setdefault(user, {})[connection_id] = node

    def has_connection(self, node: str, connection_id: str) -> bool:
        return any(connection_id in conns for conns in self.users.values())

    def forget_connection(self, node: str, user: str, connection_id: str) -> None:
        self.users.get(user, {}).pop(connection_id, None)


_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], 0)
  redis.call('SET', KEYS[2], ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return {tonumber(redis.call('GET', KEYS[1])), redis.call('GET', KEYS[2])}
"""

# KEYS: offset, epoch, history. ARGV: channel, frame head, new epoch, history size, ttl,
# signature prefix (empty when unsigned: it precedes the published frame and is kept in the
# history entry beside it). A missing offset means the room's sequence expired: it restarts
# under a new epoch.
_EMIT = """
local epoch = redis.call('GET', KEYS[2])
if not epoch or redis.call('EXISTS', KEYS[1]) == 0 then
  epoch = ARGV[3]
  redis.call('SET', KEYS[2], epoch)
  redis.call('DEL', KEYS[3])
end
local offset = redis.call('INCR', KEYS[1])
local frame = ARGV[2] .. offset .. ',"epoch":"' .. epoch .. '"}'
local size = tonumber(ARGV[4])
if size > 0 then
  if ARGV[6] == '' then
    redis.call('XADD', KEYS[3], 'MAXLEN', size, '0-' .. offset, 'f', frame)
  else
    redis.call('XADD', KEYS[3], 'MAXLEN', size, '0-' .. offset, 'f', frame, 'm', ARGV[6])
  end
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('PUBLISH', ARGV[1], ARGV[6] .. frame)
return {offset, epoch}
"""

_HISTORY = """
local offset = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = redis.call('GET', KEYS[2]) or ''
local since = tonumber(ARGV[1])
local entries = {}
if since < offset then
  entries = redis.call('XRANGE', KEYS[3], '0-' .. (since + 1), '+')
end
return {offset, epoch, entries}
"""

# KEYS: presence (zset cid -> expiry ms), members (hash cid -> json). ARGV: now ms.
_PRUNE = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for i = 1, #gone, 1000 do
  redis.call('HDEL', KEYS[2], unpack(gone, i, math.min(i + 999, #gone)))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
"""

_JOIN = (
    _PRUNE
    + """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return redis.call('ZCARD', KEYS[1])
"""
)

_MEMBERS = (
    _PRUNE
    + """
return redis.call('HVALS', KEYS[2])
"""
)


class RedisRooms:
    """Rooms shared by every daemon on one Redis; presence entries expire after ``presence_ttl``.

    ``signer`` signs what goes on the channels and checks the history read back: a
    history holding an entry not signed with the key is a gap, never recovered from.
    """

    def __init__(
        self,
        client: SyncRedis,
        *,
        namespace: str,
        history_size: int,
        ttl: int,
        presence_ttl: float,
        signer: ChannelSigner,
    ) -> None:
        self.client = client
        self.signer = signer
        self.namespace = namespace
        self.history_size = history_size
        self.ttl = ttl
        self.presence_ttl_ms = int(presence_ttl * 1000)
        self._touch = client.register_script(_TOUCH)
        self._emit = client.register_script(_EMIT)
        self._history = client.register_script(_HISTORY)
        self._join = client.register_script(_JOIN)
        self._members = client.register_script(_MEMBERS)

    def channel(self, room: str) -> str:
        return f"{self.namespace}:ws.room.{room}"

    def node_channel(self, node: str) -> str:
        return f"{self.namespace}:ws.node.{node}"

    def _keys(self, room: str, *names: str) -> list[str]:
        return [f"{self.namespace}:{{ws:room:{room}}}:{name}" for name in names]

    def _user_key(self, user: str) -> str:
        return f"{self.namespace}:{{ws:user:{user}}}:connections"

    def _node_key(self, node: str) -> str:
        return f"{self.namespace}:{{ws:node:{node}}}:connections"

    def touch(self, room: str) -> tuple[int, str]:
        offset, epoch = self._touch(
            keys=self._keys(room, "offset", "epoch"), args=[_new_epoch(), self.ttl]
        )
        return int(offset), _text(epoch)

    def emit(self, room: str, head: str, *, history: bool = True) -> tuple[int, str, str | None]:
        channel = self.channel(room)
        offset, epoch = self._emit(
            keys=self._keys(room, "offset", "epoch", "history"),
            args=[
                channel,
                head,
                _new_epoch(),
                self.history_size if history else 0,
                self.ttl,
                self.signer.message_prefix(channel, head),
            ],
        )
        return int(offset), _text(epoch), None

    def publish_frame(self, room: str, frame: str) -> None:
        """A frame outside the room's sequence (presence join/leave) to every daemon."""
        channel = self.channel(room)
        self.client.publish(channel, self.signer.seal(channel, frame))

    def publish_order(self, node: str, order: str) -> int:
        """An order about one of ``node``'s connections; how many daemons received it."""
        channel = self.node_channel(node)
        return publish_own(self.client, channel, self.signer.seal(channel, order))

    def history(self, room: str, since: int, epoch: str | None) -> HistorySlice:
        offset, room_epoch, raw = self._history(
            keys=self._keys(room, "offset", "epoch", "history"), args=[since]
        )
        channel, offset, room_epoch = self.channel(room), int(offset), _text(room_epoch)
        entries = []
        seen: set[bytes] = set()
        for entry_id, fields in raw:
            payload = _entry_payload(fields, signed=self.signer.signing)
            frame = self.signer.open(channel, payload, seen=seen)
            if frame is None:  # not written by a holder of the key: never a partial recovery
                return HistorySlice([], offset, room_epoch, gap=True)
            entries.append((int(_text(entry_id).split("-")[1]), frame))
        return _slice(since, epoch, offset, room_epoch, entries)

    def join(self, room: str, connection_id: str, member: dict[str, Any]) -> int:
        now = now_ms()
        count = self._join(
            keys=self._keys(room, "presence", "members"),
            args=[
                now,
                now + self.presence_ttl_ms,
                connection_id,
                json.dumps(member),
                self.presence_ttl_ms * 2,
            ],
        )
        self.client.hset(self._user_key(member["user"]), connection_id, member["node"])
        self.client.pexpire(self._user_key(member["user"]), self.presence_ttl_ms * 2)
        return int(count)

    def leave(self, room: str, connection_id: str) -> None:
        presence, members = self._keys(room, "presence", "members")
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(presence, connection_id)
            pipe.hdel(members, connection_id)
            pipe.execute()

    def members(self, room: str) -> list[dict[str, Any]]:
        raw = self._members(keys=self._keys(room, "presence", "members"), args=[now_ms()])
        found: list[dict[str, Any]] = [json.loads(item) for item in raw]
        return sorted(found, key=lambda m: str(m["connection_id"]))

    def refresh(self, node: str, rooms: dict[str, list[str]], connections: dict[str, str]) -> None:
        """Push this daemon's presence entries TTL forward (one pipelined round trip).

        ``connections``: this daemon's connection ids and their users.
        """
        expiry = now_ms() + self.presence_ttl_ms
        with self.client.pipeline(transaction=False) as pipe:
            for room, connection_ids in rooms.items():
                presence, members, offset, epoch, history = self._keys(
                    room, "presence", "members", "offset", "epoch", "history"
                )
                pipe.zadd(presence, dict.fromkeys(connection_ids, expiry), xx=True)
                for key in (presence, members):
                    pipe.pexpire(key, self.presence_ttl_ms * 2)
                for key in (offset, epoch, history):
                    pipe.expire(key, self.ttl)
            for user, nodes in _by_user(node, connections).items():
                pipe.hset(self._user_key(user), mapping=dict(nodes.items()))
                pipe.pexpire(self._user_key(user), self.presence_ttl_ms * 2)
            if connections:
                pipe.hset(self._node_key(node), mapping=dict(connections.items()))
                pipe.pexpire(self._node_key(node), self.presence_ttl_ms * 2)
            pipe.execute()

    def user_connections(self, user: str) -> dict[str, str]:
        raw = self.client.hgetall(self._user_key(user))
        return {_text(k): _text(v) for k, v in raw.items()}

    def add_connection(self, node: str, connection_id: str, user: str) -> None:
        """Record a connection of ``node`` at once, so that any daemon can find it."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(self._node_key(node), connection_id, user)
            pipe.pexpire(self._node_key(node), self.presence_ttl_ms * 2)
            pipe.execute()

    def has_connection(self, node: str, connection_id: str) -> bool:
        """Whether ``node`` holds the connection (and has refreshed it within the presence TTL)."""
        return bool(self.client.hexists(self._node_key(node), connection_id))

    def forget_connection(self, node: str, user: str, connection_id: str) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hdel(self._user_key(user), connection_id)
            pipe.hdel(self._node_key(node), connection_id)
            pipe.execute()


def _entry_payload(fields: list[bytes], *, signed: bool) -> bytes:
    """A history entry (``f frame [m prefix]``) as it was published: [prefix +] frame."""
    frame = fields[1] if len(fields) >= 2 and fields[0] == b"f" else b""
    if signed and len(fields) == 4 and fields[2] == b"m":
        return fields[3] + frame
    return frame


def _by_user(node: str, connections: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{connection id: user}`` of ``node`` as ``{user: {connection id: node}}``."""
    users: dict[str, dict[str, str]] = {}
    for connection_id, user in connections.items():
        users.setdefault(user, {})[connection_id] = node
    return users


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
