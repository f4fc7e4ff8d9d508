"""The loop side of the WebSocket manager: sockets, outbound queues, and the rooms' channels.

The :class:`Gateway` lives on the daemon's asyncio loop. It takes a socket over from
aiohttp once upgraded (see :mod:`._socket`), authenticates it (through the auth manager),
then hands everything that needs a decision (join, leave, publish, presence, history)
to the ``websocket`` actor with ``ask_async``. The actor hands frames back with
``loop.call_soon_threadsafe`` (:meth:`Gateway.call`); the gateway writes them to each
socket, or to its bounded queue while the client reads slowly, so no send ever blocks
the actor or another client. A client's own ``join`` is
admitted by the room policies or a subscription token, here, before the actor sees
it; ``presence`` and ``history`` are answered only about rooms the client is in
(see :mod:`._policies`). With ``signing_keys``
(the codec's) it takes from the Redis channels only payloads signed with one of them,
and fresh (``replay_window``)::

    gateway = Gateway(system, options, redis_url="redis://...", namespace="corral")
    app.router.add_get("/ws", gateway.handle)
    app.on_startup.append(gateway.started)
    app.on_shutdown.append(gateway.shutdown)
    app.on_cleanup.append(gateway.closed)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any, Protocol, TypeVar

from aiohttp import web

from corral import _redis
from corral._junk import REJECTED
from corral._redis import REDIS_ERRORS, AsyncRedis, subscriber_async
from corral.actors.websocket._metrics import (
    ACCEPTED,
    FLOODING,
    FORBIDDEN_ACTIONS,
    FORGED,
    FRAMES_SENT,
    REFUSED,
    SLOW,
)
from corral.actors.websocket._options import WebSocketOptions
from corral.actors.websocket._policies import RoomPolicies
from corral.actors.websocket._signing import ChannelSigner
from corral.actors.websocket._socket import WebSocket, take_over, text_frame
from corral.errors import BackendUnavailable, ConfigError, CorralError, Unauthorized
from corral.manager import HttpMount
from corral.messages.auth import AuthValidate
from corral.messages.base import Reply, Request
from corral.messages.signing import DEFAULT_REPLAY_WINDOW
from corral.messages.websocket import (
    WsAttach,
    WsDetach,
    WsHistory,
    WsJoinRoom,
    WsLeaveRoom,
    WsPublish,
    WsRoomInfo,
    WsTick,
)
from corral.metrics import ManagerMetrics

__all__ = [
    "CLOSE_FLOODING", "CLOSE_SLOW", "CLOSE_UNAUTHORIZED", "FORBIDDEN", "Gateway", "serve_gateway",
]  # fmt: skip

log = logging.getLogger("corral.websocket")

T = TypeVar("T")

CLOSE_UNAUTHORIZED = 4401
CLOSE_SLOW = 4008
CLOSE_FLOODING = 4029
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
FORBIDDEN = "forbidden"
"""The ``code`` of the error frame that refuses a join, presence or history request."""


class AsyncAsker(Protocol):
    async def ask_async(self, message: Request[Any], *, timeout: float | None = None) -> Any: ...


class GatewayOptions(Protocol):
    @property
    def auth_timeout(self) -> float: ...
    @property
    def send_queue_size(self) -> int: ...
    @property
    def max_frame_size(self) -> int: ...
    @property
    def inbound_rate(self) -> float: ...
    @property
    def inbound_burst(self) -> int: ...
    @property
    def close_timeout(self) -> float: ...
    @property
    def room_policies(self) -> Mapping[str, str]: ...


class Connection(WebSocket):
    """One socket: its user once authenticated, its rooms, its inbound token bucket, and
    what waits to be sent.

    Frames are written straight to the socket while its transport takes them; they wait
    in ``pending`` (bounded by ``send_queue_size``) only while the client reads slower
    than it is sent to, and go out as the transport drains. Messages from the client are
    served by a task that lives while some wait (``serving``).
    """

    __slots__ = (
        "expires_at",
        "gateway",
        "id",
        "pending",
        "recovering",
        "refilled",
        "rooms",
        "scopes",
        "serving",
        "tokens",
        "user",
        "waiter",
    )

    def __init__(self, gateway: Gateway) -> None:
        options = gateway.options
        super().__init__(
            max_message_size=options.max_frame_size, close_timeout=options.close_timeout
        )
        self.gateway = gateway
        self.id = ""
        self.user = ""
        self.expires_at = 0.0
        self.scopes: list[str] = []
        self.tokens = float(options.inbound_burst)
        self.refilled = time.monotonic()
        self.rooms: set[str] = set()
        self.recovering: dict[str, list[str]] | None = None
        """Per room joined with a recovery under way: the frames that came meanwhile."""
        self.pending: collections.deque[str] | None = None
        self.serving = False
        self.waiter: asyncio.Future[None] | None = None
        """Set while the first frame is awaited for its token."""

    def on_message(self) -> None:
        self.gateway.received(self)

    def on_writable(self) -> None:
        self.gateway.drain(self)

    def on_lost(self) -> None:
        self.gateway.lost(self)


def _dumps(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


class Gateway:
    """See the module docstring. ``node`` names this daemon in connection ids and presence."""

    def __init__(
        self,
        system: AsyncAsker,
        options: GatewayOptions,
        *,
        redis_url: str = "",
        namespace: str = "corral",
        tick_interval: float = 1.0,
        signing_keys: Sequence[bytes] = (),
        replay_window: float = DEFAULT_REPLAY_WINDOW,
        metrics: ManagerMetrics | None = None,
    ) -> None:
        self.system = system
        self.options = options
        self.node = secrets.token_hex(4)
        self.namespace = namespace
        self.redis_url = redis_url
        self.tick_interval = tick_interval
        self.metrics = metrics or ManagerMetrics()
        """Where the gateway counts: the websocket manager's store (see ``_metrics``)."""
        self.signer = ChannelSigner(
            signing_keys,
            replay_window=replay_window,
            on_refused=lambda: self.metrics.add(FORGED, "channel"),
        )
        self.policies = RoomPolicies(options.room_policies)
        self.connections: dict[str, Connection] = {}
        """The sockets admitted, by connection id."""
        self._authenticating: set[Connection] = set()
        self.rooms: dict[str, set[Connection]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._redis: AsyncRedis | None = None
        self._pubsub: Any = None
        self._room_prefix = f"{namespace}:ws.room."
        self.stopping = False

    # -- lifecycle (aiohttp on_startup / on_cleanup) --------------------------------------

    async def started(self, _app: web.Application | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        if self.redis_url:
            # On a cluster, orders to this node come by sharded pub/sub (SPUBLISH counts
            # its receivers exactly): listen on the node that owns the channel's slot.
            control = f"{self.namespace}:ws.node.{self.node}"
            self._redis = subscriber_async(
                self.redis_url, setting="websocket redis url", shard_channel=control
            )
            self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.ssubscribe(control)
            self._spawn(self._read_channels())
        self._spawn(self._tick())

    async def shutdown(self, _app: web.Application | None = None) -> None:
        """Close every socket (the managers have stopped: nothing to detach from)."""
        self.stopping = True
        for conn in [*self.connections.values(), *self._authenticating]:
            conn.pending = None
            conn.close(CLOSE_GOING_AWAY, "server shutting down", wait=False)

    async def closed(self, _app: web.Application | None = None) -> None:
        for conn in [*self.connections.values(), *self._authenticating]:
            if conn.transport is not None:  # a client that did not read its close frame
                conn.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- called by the actor, from its thread ---------------------------------------------

    def call(self, func: Callable[..., None], *args: Any) -> None:
        """Run ``func(*args)`` on the loop, soon; never waits (the actor's hand-off)."""
        if self.loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to send to
            self.loop.call_soon_threadsafe(func, *args)

    def subscribe_now(self, room: str, timeout: float) -> None:
        """SUBSCRIBE the room's channel and wait for it, so history read next is complete."""
        if self._pubsub is None or self.loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(
            self._pubsub.subscribe(self._room_prefix + room), self.loop
        )
        _wait_for_loop(future, timeout, f"subscribing to room {room!r}")

    def unsubscribe(self, room: str) -> None:
        if self._pubsub is not None and room not in self.rooms:
            self._spawn(self._unsubscribe_if_empty(room))

    async def _unsubscribe_if_empty(self, room: str) -> None:
        # Checked again here: a member may have joined since this was asked for.
        if self._pubsub is not None and room not in self.rooms:
            await self._pubsub.unsubscribe(self._room_prefix + room)

    def snapshot(self, timeout: float) -> list[tuple[str, str, float, list[str]]]:
        """Every socket as (connection_id, user, expires_at, rooms): a restarted actor's state."""
        if self.loop is None:
            return []

        async def take() -> list[tuple[str, str, float, list[str]]]:
            return [
                (c.id, c.user, c.expires_at, sorted(c.rooms)) for c in self.connections.values()
            ]

        future = asyncio.run_coroutine_threadsafe(take(), self.loop)
        return _wait_for_loop(future, timeout, "listing the connections")

    # -- run on the loop (through call) ---------------------------------------------------

    def join(self, connection_id: str, room: str, frames: list[str], recovering: bool) -> None:
        conn = self.connections.get(connection_id)
        if conn is None:
            return
        for frame in frames:
            self._push(conn, frame)
        if recovering:
            if conn.recovering is None:
                conn.recovering = {}
            conn.recovering[room] = []
        conn.rooms.add(room)
        if room not in self.rooms and self._pubsub is not None:
            # The actor may think the room still has a member here while its last one
            # is leaving (and unsubscribing): subscribe again, which is harmless if so.
            self._spawn(self._pubsub.subscribe(self._room_prefix + room))
        self.rooms.setdefault(room, set()).add(conn)

    def recovered(self, connection_id: str, room: str, frames: list[str], offset: int) -> None:
        """Send what history gave, then what arrived meanwhile beyond ``offset``."""
        conn = self.connections.get(connection_id)
        if conn is None:
            return
        buffered = _stop_recovering(conn, room)
        for frame in frames:
            self._push(conn, frame)
        for frame in buffered:
            if json.loads(frame).get("offset", offset + 1) > offset:
                self._push(conn, frame)

    def leave(self, connection_id: str, room: str, frames: list[str]) -> None:
        conn = self.connections.get(connection_id)
        if conn is None:
            return
        conn.rooms.discard(room)
        _stop_recovering(conn, room)
        members = self.rooms.get(room)
        if members is not None:
            members.discard(conn)
            if not members:
                del self.rooms[room]
                self.unsubscribe(room)
        for frame in frames:
            self._push(conn, frame)

    def send(self, connection_id: str, frames: list[str]) -> None:
        conn = self.connections.get(connection_id)
        if conn is not None:
            for frame in frames:
                self._push(conn, frame)

    def deliver(self, room: str, frame: str) -> None:
        """Fan one frame out to this daemon's members of ``room``, framed once for all."""
        members = self.rooms.get(room)
        if not members:
            return
        wire = text_frame(frame)
        written = 0
        for conn in list(members):
            pending = conn.recovering.get(room) if conn.recovering is not None else None
            if pending is not None:
                pending.append(frame)
            else:
                written += self._push(conn, frame, wire)
        if written:
            self.metrics.add(FRAMES_SENT, by=written)

    def disconnect(self, connection_id: str, code: int, reason: str) -> None:
        conn = self.connections.get(connection_id)
        if conn is not None:
            self._close(conn, code, reason)

    # -- outbound -------------------------------------------------------------------------

    def _push(self, conn: Connection, frame: str, wire: bytes | None = None) -> bool:
        """Send ``frame`` (``wire``: it framed already) now if the socket takes it, else
        queue it; True when it was written now (for the caller to count)."""
        if not conn.open:
            return False
        if conn.pending is None and not conn.writing_paused:
            conn.write(text_frame(frame) if wire is None else wire)
            if wire is None:
                self.metrics.add(FRAMES_SENT)
            return True
        if conn.pending is None:
            conn.pending = collections.deque()
        elif len(conn.pending) >= self.options.send_queue_size:
            self.metrics.add(SLOW)
            self._close(conn, CLOSE_SLOW, "slow")
            return False
        conn.pending.append(frame)
        return False

    def drain(self, conn: Connection) -> None:
        """Send what waits in ``conn.pending`` while its transport takes it (called when
        the transport has sent enough of what it held)."""
        pending, sent = conn.pending, 0
        while pending and not conn.writing_paused and conn.open:
            conn.write(text_frame(pending.popleft()))
            sent += 1
        if not pending:
            conn.pending = None
        if sent:
            self.metrics.add(FRAMES_SENT, by=sent)

    def _close(self, conn: Connection, code: int, reason: str) -> None:
        """Stop sending to ``conn`` (what waits is dropped) and close it with ``code``."""
        conn.pending = None
        conn.close(code, reason)

    # -- the /ws endpoint -----------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Take the socket over from aiohttp, then authenticate and admit it."""
        conn = Connection(self)
        if take_over(request, conn):
            try:
                await self._admit(request, conn)
            except Exception:
                log.exception("websocket: admitting a socket failed")
                self._close(conn, CLOSE_INTERNAL_ERROR, "internal error")
        # Written nowhere: aiohttp has no transport for this request any more.
        return web.Response()

    async def _admit(self, request: web.Request, conn: Connection) -> None:
        self._authenticating.add(conn)
        try:
            claims = await self._authenticate(request, conn)
        finally:
            self._authenticating.discard(conn)
        if claims is None or not conn.open:
            return
        conn.id = f"{self.node}.{next(self._ids)}"
        conn.user = claims.subject
        conn.expires_at = float(claims.expires_at)
        conn.scopes = list(claims.scopes)
        self.connections[conn.id] = conn
        try:
            await self._attach(conn)
        except CorralError as exc:
            self._close(conn, CLOSE_INTERNAL_ERROR, f"{exc.code}: {exc.message}")
            return
        welcome = {
            "type": "welcome",
            "connection_id": conn.id,
            "user": conn.user,
            "expires_at": conn.expires_at,
        }
        self._push(conn, _dumps(welcome))
        self.metrics.add(ACCEPTED)
        self.received(conn)  # what the client sent meanwhile

    async def _attach(self, conn: Connection) -> None:
        await self.system.ask_async(
            WsAttach(
                connection_id=conn.id,
                user=conn.user,
                expires_at=conn.expires_at,
                scopes=conn.scopes,
            )
        )

    def lost(self, conn: Connection) -> None:
        """``conn`` has gone: out of its rooms, and detached from the actor."""
        conn.pending = None
        if conn.waiter is not None and not conn.waiter.done():
            conn.waiter.set_result(None)
        if self.connections.pop(conn.id, None) is None:
            return  # never admitted
        for room in conn.rooms:
            members = self.rooms.get(room)
            if members is not None:
                members.discard(conn)
                if not members:
                    del self.rooms[room]
                    self.unsubscribe(room)
        if not self.stopping:
            self._spawn(self._detach(conn.id))

    async def _detach(self, connection_id: str) -> None:
        with contextlib.suppress(CorralError):
            await self.system.ask_async(WsDetach(connection_id=connection_id))

    async def _authenticate(self, request: web.Request, conn: Connection) -> Any:
        token = _bearer(request.headers.get("Authorization", "")) or request.query.get("token")
        if not token:
            token = await self._first_frame_token(conn)
            if token is None:
                return None
        try:
            return await self.system.ask_async(AuthValidate(token=token))
        except Unauthorized as exc:
            self.metrics.add(REFUSED)
            conn.close(CLOSE_UNAUTHORIZED, str(exc.details.get("reason", "unauthorized")))
        except CorralError as exc:
            conn.close(CLOSE_INTERNAL_ERROR, f"auth unavailable: {exc.code}")
        return None

    async def _first_frame_token(self, conn: Connection) -> str | None:
        message = conn.pop()
        if message is None and conn.open:
            conn.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(conn.waiter, self.options.auth_timeout)
            except TimeoutError:
                conn.close(CLOSE_UNAUTHORIZED, "no token")
                return None
            finally:
                conn.waiter = None
            message = conn.pop()
        frame = _parse(message) if isinstance(message, str) else None
        token = frame.get("token") if frame and frame.get("type") == "auth" else None
        if not isinstance(token, str) or not token:
            self.metrics.add(REFUSED)
            conn.close(CLOSE_UNAUTHORIZED, "no token")
            return None
        return token

    def received(self, conn: Connection) -> None:
        """Messages wait in ``conn``: wake the authentication that waits for the first,
        or serve them once it is admitted (one task at a time, in order)."""
        if conn.waiter is not None:
            if not conn.waiter.done():
                conn.waiter.set_result(None)
        elif conn.id in self.connections and not conn.serving:
            conn.serving = True
            self._spawn(self._serve(conn))

    async def _serve(self, conn: Connection) -> None:
        try:
            while (message := conn.pop()) is not None:
                if not conn.open:
                    continue  # a close has begun: what the client still sends is dropped
                if not self._take_token(conn):
                    self.metrics.add(FLOODING)
                    self._close(conn, CLOSE_FLOODING, "flooding")
                    continue
                if not isinstance(message, str):
                    self._error(conn, None, "bad_frame", "frames are JSON text")
                    continue
                frame = _parse(message)
                if frame is None:
                    self._error(conn, None, "bad_frame", "not a JSON object")
                    continue
                await self._dispatch(conn, frame)
        except Exception:
            log.exception("websocket %s: serving a frame failed", conn.id)
            self._close(conn, CLOSE_INTERNAL_ERROR, "internal error")
        finally:
            conn.serving = False

    def _take_token(self, conn: Connection) -> bool:
        now = time.monotonic()
        conn.tokens = min(
            float(self.options.inbound_burst),
            conn.tokens + (now - conn.refilled) * self.options.inbound_rate,
        )
        conn.refilled = now
        if conn.tokens < 1.0:
            return False
        conn.tokens -= 1.0
        return True

    async def _dispatch(self, conn: Connection, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        request_id = frame.get("id")
        if kind == "ping":
            self._push(conn, _dumps({"type": "pong", "id": request_id}))
            return
        if kind == "refresh":
            await self._refresh(conn, frame.get("token"), request_id)
            return
        build = _REQUESTS.get(kind) if isinstance(kind, str) else None
        if build is None:
            self._error(conn, request_id, "unknown_type", f"unknown frame type {kind!r}")
            return
        room = frame.get("room")
        if not isinstance(room, str):
            self._error(conn, request_id, "invalid_message", f"a {kind} frame needs a room name")
            return
        try:
            refusal = await self._refusal(conn, str(kind), room, frame.get("token"))
        except CorralError as exc:  # the auth manager could not check a token
            self._error(conn, request_id, exc.code, str(exc))
            return
        if refusal is not None:
            self.metrics.add(FORBIDDEN_ACTIONS)
            message = f"not allowed to {kind} room {room!r}: {refusal}"
            self._error(conn, request_id, FORBIDDEN, message, room=room, reason=refusal)
            return
        try:
            request = build(conn.id, frame)
            reply = await self.system.ask_async(request)
        except CorralError as exc:
            self._error(conn, request_id, exc.code, str(exc))
            return
        except (KeyError, TypeError, ValueError) as exc:
            self._error(conn, request_id, "invalid_message", f"bad {kind} frame: {exc}")
            return
        answer = _ANSWERS.get(str(kind))
        if answer is not None:
            self._push(conn, _dumps({**answer(reply), "id": request_id}))

    async def _refusal(self, conn: Connection, kind: str, room: str, token: Any) -> str | None:
        """Why ``conn`` may not do ``kind`` in ``room``; None when it may.

        A join needs a policy that admits the room, or a subscription token for
        exactly this room and this user; presence and history need membership.
        """
        if kind in ("presence", "history"):
            return None if room in conn.rooms else "not_a_member"
        if kind != "join":
            return None  # publish and leave: the actor checks membership
        if token is None:
            return self.policies.refusal(room, subject=conn.user)
        if not isinstance(token, str):
            return "malformed"
        try:
            claims = await self.system.ask_async(
                AuthValidate(token=token, token_type="subscription")
            )
        except Unauthorized as exc:
            return str(exc.details.get("reason", "unauthorized"))
        if claims.claims.get("room") != room:
            return "token_for_another_room"
        if claims.subject != conn.user:
            return "token_of_another_user"
        return None

    async def _refresh(self, conn: Connection, token: Any, request_id: Any) -> None:
        if not isinstance(token, str):
            self._error(conn, request_id, "invalid_message", "refresh needs a token")
            return
        try:
            claims = await self.system.ask_async(AuthValidate(token=token))
        except Unauthorized as exc:
            self._close(conn, CLOSE_UNAUTHORIZED, str(exc.details.get("reason", "unauthorized")))
            return
        if claims.subject != conn.user:
            self._close(conn, CLOSE_UNAUTHORIZED, "token of another user")
            return
        conn.expires_at = float(claims.expires_at)
        await self._attach(conn)
        self._push(
            conn, _dumps({"type": "refreshed", "expires_at": conn.expires_at, "id": request_id})
        )

    def _error(
        self, conn: Connection, request_id: Any, code: str, message: str, **details: str
    ) -> None:
        frame = {"type": "error", "code": code, "message": message, **details, "id": request_id}
        self._push(conn, _dumps(frame))

    # -- the rooms' Redis channels, and this node's control channel -----------------------

    async def _read_channels(self) -> None:
        control = f"{self.namespace}:ws.node.{self.node}"
        while True:
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
            except REDIS_ERRORS as exc:
                log.warning("websocket channels: %s; retrying", exc)
                await asyncio.sleep(0.5)
                continue
            if msg is None or msg.get("type") not in ("message", "smessage"):
                continue
            channel = msg["channel"].decode()
            body = self.signer.open(channel, msg["data"])
            if body is None:
                continue
            frame = _parse(body)
            if frame is None:  # browsers only ever get JSON objects; orders are ones too
                REJECTED.reject("websocket", "not_json", f"payload on {channel}", log)
            elif channel.startswith(self._room_prefix):
                self.deliver(channel[len(self._room_prefix) :], body)
            elif channel == control:
                self._spawn(self._control(frame))

    async def _control(self, order: dict[str, Any]) -> None:
        """A request about one of this node's connections, forwarded by another daemon."""
        op = order.get("op")
        try:
            await self._obey(op, order)
        except CorralError:
            pass
        except (KeyError, TypeError, ValueError) as exc:
            REJECTED.reject("websocket", "bad_order", f"{op!r:.40}: {exc!r:.100}", log)

    async def _obey(self, op: Any, order: dict[str, Any]) -> None:
        if op == "disconnect":
            self.disconnect(order["connection_id"], order["code"], order["reason"])
        elif op == "join":
            await self.system.ask_async(
                WsJoinRoom(room=order["room"], connection_id=order["connection_id"])
            )
        elif op == "leave":
            await self.system.ask_async(
                WsLeaveRoom(room=order["room"], connection_id=order["connection_id"])
            )
        else:
            raise ValueError("unknown op")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                await self.system.ask_async(WsTick())
            except CorralError as exc:
                log.debug("websocket tick: %s", exc)


def _bearer(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _parse(data: Any) -> dict[str, Any] | None:
    try:
        frame = json.loads(data)
    except (TypeError, ValueError):
        return None
    return frame if isinstance(frame, dict) else None


def _stop_recovering(conn: Connection, room: str) -> list[str]:
    """The frames that came for ``room`` while ``conn`` recovered its history, if it did."""
    if conn.recovering is None:
        return []
    buffered = conn.recovering.pop(room, [])
    if not conn.recovering:
        conn.recovering = None
    return buffered


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int:
        raise TypeError("since must be an integer offset")
    return value


_REQUESTS: dict[str, Callable[[str, dict[str, Any]], Request[Any]]] = {
    "join": lambda cid, f: WsJoinRoom(
        room=f["room"], connection_id=cid, since=_optional_int(f.get("since")), epoch=f.get("epoch")
    ),
    "leave": lambda cid, f: WsLeaveRoom(room=f["room"], connection_id=cid),
    "publish": lambda cid, f: WsPublish(
        room=f["room"], event=f["event"], data=f.get("data"), connection_id=cid
    ),
    "presence": lambda _cid, f: WsRoomInfo(room=f["room"]),
    "history": lambda _cid, f: WsHistory(
        room=f["room"], since=_optional_int(f.get("since")) or 0, epoch=f.get("epoch")
    ),
}

# Replies that become a frame; join and leave answer with frames the actor queues in order.
_ANSWERS: dict[str, Callable[[Reply], dict[str, Any]]] = {
    "publish": lambda r: {"type": "published", "room": r.room, "offset": r.offset},  # type: ignore[attr-defined]
    "presence": lambda r: {
        "type": "presence",
        "room": r.room,  # type: ignore[attr-defined]
        "members": r.members,  # type: ignore[attr-defined]
        "count": r.count,  # type: ignore[attr-defined]
        "users": r.users,  # type: ignore[attr-defined]
    },
    "history": lambda r: {
        "type": "gap" if r.gap else "history",  # type: ignore[attr-defined]
        "room": r.room,  # type: ignore[attr-defined]
        "messages": r.messages,  # type: ignore[attr-defined]
        "offset": r.offset,  # type: ignore[attr-defined]
        "epoch": r.epoch,  # type: ignore[attr-defined]
    },
}


def _wait_for_loop(future: concurrent.futures.Future[T], timeout: float, doing: str) -> T:
    """The result of work handed to the daemon's loop, or BackendUnavailable (never a crash)."""
    try:
        return future.result(timeout)
    except (TimeoutError, RuntimeError) as exc:
        future.cancel()
        raise BackendUnavailable(
            f"websocket gateway: {doing} did not finish within {timeout:g}s ({exc!r})"
        ) from None


BROWSER_CLIENT = resources.files(__package__).joinpath("corral.js").read_bytes()
"""The browser client served at ``/corral.js`` (see its header for how to use it)."""
_BROWSER_CLIENT_ETAG = f'"{hashlib.sha256(BROWSER_CLIENT).hexdigest()[:16]}"'


async def _browser_client(request: web.Request) -> web.Response:
    headers = {"ETag": _BROWSER_CLIENT_ETAG, "Cache-Control": "no-cache"}
    if request.headers.get("If-None-Match") == _BROWSER_CLIENT_ETAG:
        return web.Response(status=304, headers=headers)
    return web.Response(
        body=BROWSER_CLIENT, content_type="text/javascript", charset="utf-8", headers=headers
    )


def serve_gateway(http: HttpMount, options: WebSocketOptions) -> Gateway:
    """A gateway serving ``/ws`` on the daemon's app, for the manager's actors on it.

    Rooms fan out across daemons on ``options.redis_url``, else on the system's Redis,
    unless ``backend = "memory"``.
    """
    redis_url = "" if options.backend == "memory" else options.redis_url or http.redis_url
    if redis_url and not _redis.ASYNC_SHARDED_PUBSUB:
        raise ConfigError(
            f"managers.{http.name}: rooms fan out across daemons by asyncio sharded pub/sub, "
            "which needs redis-py 8.0 or newer: pip install 'corral[websocket]' "
            '(or set backend = "memory" for a single daemon)'
        )
    gateway = Gateway(
        http.system,
        options,
        redis_url=redis_url,
        namespace=http.namespace,
        tick_interval=options.tick_interval,
        signing_keys=http.signing_keys,
        replay_window=http.replay_window,
        metrics=http.metrics,
    )
    http.app.router.add_get("/ws", gateway.handle)
    http.app.router.add_get("/corral.js", _browser_client)
    http.app.on_startup.append(gateway.started)
    http.app.on_shutdown.append(gateway.shutdown)
    http.app.on_cleanup.append(gateway.closed)
    return gateway
