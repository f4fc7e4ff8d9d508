"""The websocket manager: real daemons, real `websockets` clients, a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import redis
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.frames import Frame
from websockets.protocol import State
from websockets.uri import parse_uri

import corral
from corral import _redis
from corral.actors.websocket import WebSocketOptions
from corral.config import (
    BusSection,
    CodecSection,
    Config,
    DaemonSection,
    ManagerSection,
    parse_options,
)
from corral.daemon import Daemon
from corral.errors import ConfigError, NotFound
from corral.messages.auth import AuthIssue, AuthIssueSubscription
from corral.messages.system import Health
from corral.messages.websocket import (
    WsDisconnect,
    WsEmitToRoom,
    WsHistory,
    WsJoinRoom,
    WsRoomInfo,
)
from tests.redis_server import RedisServer

SECRET = "websocket-tests-signing-secret-32b"
OPEN_ROOMS = {"*": "clients"}
"""The policies of tests about something else than authorization: every room is open."""


def config(
    redis_url: str = "",
    *,
    auth: dict[str, Any] | None = None,
    signing_keys: list[str] | None = None,
    room_policies: dict[str, str] | None = OPEN_ROOMS,
    **options: Any,
) -> Config:
    """Auth and websocket managers; ``room_policies=None`` keeps the manager's default."""
    if room_policies is not None:
        options["room_policies"] = room_policies
    bus = BusSection(backend="redis", url=redis_url, namespace="wst") if redis_url else BusSection()
    return Config().replace(
        bus=bus,
        codec=CodecSection(signing_keys=signing_keys or []),
        daemon=DaemonSection(port=0, heartbeat_interval=0.2, heartbeat_ttl=1.0),
        managers={
            "auth": ManagerSection(
                class_path="corral.actors.auth:AuthManager",
                options={"signing_key": SECRET, **(auth or {})},
            ),
            "websocket": ManagerSection(
                class_path="corral.actors.websocket:WebSocketManager",
                depends_on=["auth"],
                options=options,
            ),
        },
    )


class Running:
    """Daemons started by a test, stopped at its end."""

    def __init__(self) -> None:
        self.daemons: list[Daemon] = []

    def start(self, cfg: Config) -> Daemon:
        daemon = Daemon(cfg)
        daemon.start()
        self.daemons.append(daemon)
        return daemon

    def stop(self, daemon: Daemon) -> None:
        self.daemons.remove(daemon)
        daemon.stop()


@pytest.fixture
def running() -> Iterator[Running]:
    started = Running()
    yield started
    for daemon in started.daemons:
        daemon.stop()


def token(daemon: Daemon, user: str = "user:1") -> str:
    return daemon.system.ask(AuthIssue(subject=user, refresh=False)).access_token


def ws_url(daemon: Daemon, query: str = "") -> str:
    return f"ws://127.0.0.1:{daemon.port}/ws{query}"


async def connect(daemon: Daemon, user: str = "user:1", **kwargs: Any) -> ClientConnection:
    ws = await websockets.connect(ws_url(daemon, f"?token={token(daemon, user)}"), **kwargs)
    welcome = await frame(ws)
    assert welcome["type"] == "welcome" and welcome["user"] == user
    return ws


async def frame(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return parsed


async def request(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
    await ws.send(json.dumps(fields))
    return await frame(ws)


async def close_code(ws: ClientConnection, timeout: float = 5.0) -> tuple[int, str]:
    """Read until the server closes; the close code and reason it sent."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await drain(ws, timeout)
    assert closed.value.rcvd is not None, "closed without a close frame"
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def drain(ws: ClientConnection, timeout: float) -> None:
    while True:
        await asyncio.wait_for(ws.recv(), timeout)


def ask(daemon: Daemon, message: Any) -> Any:
    return asyncio.to_thread(daemon.system.ask, message)


def test_auth_by_header_query_or_first_frame_and_refusals(running: Running) -> None:
    daemon = running.start(config())

    async def scenario() -> None:
        good = token(daemon)
        async with websockets.connect(
            ws_url(daemon), additional_headers={"Authorization": f"Bearer {good}"}
        ) as ws:
            assert (await frame(ws))["type"] == "welcome"
        async with websockets.connect(ws_url(daemon)) as ws:
            assert (await request(ws, type="auth", token=good))["type"] == "welcome"
            assert (await request(ws, type="ping", id=7)) == {"type": "pong", "id": 7}
        async with websockets.connect(ws_url(daemon, "?token=not.a.jwt")) as ws:
            assert await close_code(ws) == (4401, "malformed")
        async with websockets.connect(ws_url(daemon)) as ws:
            await ws.send(json.dumps({"type": "join", "room": "r"}))
            assert await close_code(ws) == (4401, "no token")

    asyncio.run(scenario())


def test_expired_token_gets_a_refresh_window_then_4401(running: Running) -> None:
    daemon = running.start(config(auth={"access_ttl": 1, "leeway": 0.0}, refresh_window=0.6))

    async def scenario() -> None:
        lazy = await connect(daemon)
        keen = await connect(daemon)
        notice = await frame(keen, timeout=3)
        assert notice["type"] == "refresh_required"
        refreshed = await request(keen, type="refresh", token=token(daemon))
        assert refreshed["type"] == "refreshed"
        assert (await frame(lazy, timeout=3))["type"] == "refresh_required"
        assert await close_code(lazy) == (4401, "expired")
        assert (await request(keen, type="ping"))["type"] == "pong"  # still connected
        await keen.close()
        stale = token(daemon)
        await asyncio.sleep(1.2)
        async with websockets.connect(ws_url(daemon, f"?token={stale}")) as ws:
            assert await close_code(ws) == (4401, "expired")

    asyncio.run(scenario())


def test_emit_from_a_remote_service_reaches_clients_of_the_other_daemon(
    redis_server: RedisServer, running: Running
) -> None:
    first = running.start(config(redis_server.url))
    second = running.start(config(redis_server.url))

    async def scenario() -> None:
        here = await connect(first, "user:a")
        there = [await connect(second, f"user:{i}") for i in range(3)]
        for ws in [here, *there]:
            assert (await request(ws, type="join", room="news"))["type"] == "joined"
        with corral.connect(redis_server.url, namespace="wst") as service:
            emitted = await asyncio.to_thread(
                service.ask, WsEmitToRoom(room="news", event="posted", data={"id": 1})
            )
            for ws in [here, *there]:
                got = await frame(ws)
                assert got == {
                    "type": "message", "room": "news", "event": "posted", "data": {"id": 1},
                    "offset": emitted.offset, "epoch": emitted.epoch,
                }  # fmt: skip
            info = await asyncio.to_thread(service.ask, WsRoomInfo(room="news"))
            assert info.count == 4 and info.users == 4
            nodes = {m["node"] for m in info.members}
            assert len(nodes) == 2
            # An embedding service moves a connection of the second daemon, from anywhere.
            cid = info.members[0]["connection_id"]
            await asyncio.to_thread(service.ask, WsJoinRoom(room="vip", connection_id=cid))
            await wait_for_count(first, "vip", 1)
            gone = await asyncio.to_thread(service.ask, WsDisconnect(user="user:1"))
            assert gone.count == 1
        assert await close_code(there[1]) == (4000, "disconnected")
        with pytest.raises(NotFound):
            await ask(first, WsDisconnect(connection_id="nobody.1"))

    asyncio.run(scenario())


async def wait_for_count(daemon: Daemon, room: str, count: int) -> None:
    deadline = time.monotonic() + 5
    while (await ask(daemon, WsRoomInfo(room=room))).count != count:
        assert time.monotonic() < deadline, f"{room} never had {count} members"
        await asyncio.sleep(0.05)


def test_a_stopped_daemons_members_expire_with_the_presence_ttl(
    redis_server: RedisServer, running: Running
) -> None:
    stays = running.start(config(redis_server.url, presence_ttl=0.6))
    dies = running.start(config(redis_server.url, presence_ttl=0.6))

    async def scenario() -> None:
        a = await connect(stays, "user:stays")
        b = await connect(dies, "user:dies")
        for ws in (a, b):
            await request(ws, type="join", room="lobby")
        await asyncio.sleep(1.0)  # past the TTL: the beats keep both alive
        presence = await request(a, type="presence", room="lobby")
        assert sorted(m["user"] for m in presence["members"]) == ["user:dies", "user:stays"]
        # The daemon stops without its members leaving (its manager stops first): a crash, seen
        # from Redis. Its entries stop being refreshed and expire.
        await asyncio.to_thread(running.stop, dies)
        await wait_for_count(stays, "lobby", 1)
        presence = await request(a, type="presence", room="lobby")
        assert [m["user"] for m in presence["members"]] == ["user:stays"]

    asyncio.run(scenario())


def test_reconnect_with_offset_recovers_or_gets_a_gap(
    redis_server: RedisServer, running: Running
) -> None:
    daemon = running.start(config(redis_server.url, history_size=3))

    async def scenario() -> None:
        ws = await connect(daemon)
        joined = await request(ws, type="join", room="feed")
        await ask(daemon, WsEmitToRoom(room="feed", event="n", data=1))
        seen = await frame(ws)
        await ws.close()
        for n in (2, 3):
            await ask(daemon, WsEmitToRoom(room="feed", event="n", data=n))
        ws = await connect(daemon)
        back = await request(
            ws, type="join", room="feed", since=seen["offset"], epoch=seen["epoch"]
        )
        assert back["recovered"] is True and back["epoch"] == joined["epoch"]
        assert [(await frame(ws))["data"] for _ in range(2)] == [2, 3]
        await ask(daemon, WsEmitToRoom(room="feed", event="n", data=4))
        assert (await frame(ws))["data"] == 4  # live again, nothing twice
        for n in range(5, 10):
            await ask(daemon, WsEmitToRoom(room="feed", event="n", data=n))
        late = await connect(daemon)
        back = await request(
            late, type="join", room="feed", since=seen["offset"], epoch=seen["epoch"]
        )
        assert back["recovered"] is False
        gap = await frame(late)
        assert gap["type"] == "gap" and gap["since"] == seen["offset"] and gap["offset"] == 9
        other_epoch = await request(late, type="history", room="feed", since=8, epoch="feedbeef")
        assert other_epoch["type"] == "gap"
        page = await ask(daemon, WsHistory(room="feed", since=7, epoch=seen["epoch"]))
        assert [m["data"] for m in page.messages] == [8, 9] and not page.gap

    asyncio.run(scenario())


class SilentClient:
    """A WebSocket client on a raw socket with a 4 KiB receive buffer that reads nothing
    until told to (``websockets``' sans-I/O protocol does the framing)."""

    def __init__(self, url: str) -> None:
        where = parse_uri(url)
        self.protocol = ClientProtocol(where)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((where.host, where.port))
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        while self.protocol.state is not State.OPEN:
            self.protocol.receive_data(self.sock.recv(65536))
        self.protocol.events_received()

    def _flush(self) -> None:
        self.sock.sendall(b"".join(self.protocol.data_to_send()))

    def send(self, frame: dict[str, Any]) -> None:
        self.send_text(json.dumps(frame).encode())

    def send_text(self, data: bytes) -> None:
        """``data`` in a text frame, UTF-8 or not."""
        self.protocol.send_text(data)
        self._flush()

    def read_frames(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` text frames, parsed, blocking until they come."""
        self.sock.settimeout(10)
        frames: list[dict[str, Any]] = []
        while len(frames) < count:
            self.protocol.receive_data(self.sock.recv(1 << 20))
            frames += [
                json.loads(bytes(event.data))
                for event in self.protocol.events_received()
                if isinstance(event, Frame)
            ]
            self._flush()  # pongs
        return frames

    def read_until_closed(self) -> tuple[int, str]:
        self.sock.settimeout(10)
        while self.protocol.close_rcvd is None:
            data = self.sock.recv(1 << 20)
            if not data:
                self.protocol.receive_eof()
                break
            self.protocol.receive_data(data)
        self.sock.close()
        assert self.protocol.close_rcvd is not None, "closed without a close frame"
        return self.protocol.close_rcvd.code, self.protocol.close_rcvd.reason


def manager_health(daemon: Daemon) -> Health:
    health = daemon.system.health().managers["websocket"].health
    assert health is not None
    return health


def slow_closes(daemon: Daemon) -> int:
    return int(manager_health(daemon).metrics["slow"])


def test_a_slow_client_is_closed_4008_while_50_others_get_everything(running: Running) -> None:
    daemon = running.start(config(send_queue_size=32, close_timeout=10.0))
    batch, payload = 10, "x" * 16000

    async def scenario() -> None:
        readers = [await connect(daemon, f"user:{i}") for i in range(50)]
        slow = SilentClient(ws_url(daemon, f"?token={token(daemon, 'user:slow')}"))
        slow.send({"type": "join", "room": "firehose"})
        for ws in readers:
            await ws.send(json.dumps({"type": "join", "room": "firehose"}))
        for ws in readers:
            assert (await frame(ws))["type"] == "joined"
        await wait_for_count(daemon, "firehose", 51)
        received: list[list[int]] = [[] for _ in readers]

        async def read_all(ws: ClientConnection, into: list[int]) -> None:
            while (got := await frame(ws, timeout=20))["event"] == "tick":
                into.append(got["data"]["n"])

        reading = [
            asyncio.ensure_future(read_all(ws, r)) for ws, r in zip(readers, received, strict=True)
        ]
        sent = 0
        # The slow client reads nothing: once the kernel's buffers are full, its queue fills.
        while slow_closes(daemon) == 0 and sent < 2000:
            for _ in range(batch):
                data = {"n": sent, "p": payload}
                await ask(daemon, WsEmitToRoom(room="firehose", event="tick", data=data))
                sent += 1
            while min(len(r) for r in received) < sent and not any(t.done() for t in reading):
                await asyncio.sleep(0.002)
        await ask(daemon, WsEmitToRoom(room="firehose", event="end"))
        await asyncio.gather(*reading)
        assert all(got == list(range(sent)) for got in received)
        assert await asyncio.to_thread(slow.read_until_closed) == (4008, "slow")

    asyncio.run(scenario())


def test_a_client_that_stops_reading_gets_every_frame_in_order_when_it_resumes(
    running: Running,
) -> None:
    daemon = running.start(config())
    paused = SilentClient(ws_url(daemon, f"?token={token(daemon)}"))
    paused.send({"type": "join", "room": "feed"})
    assert [f["type"] for f in paused.read_frames(2)] == ["welcome", "joined"]
    # More than the socket buffers hold (4 MB at most here): the rest waits in the gateway.
    payload, backlog = "x" * 16000, 400
    for n in range(backlog):
        daemon.system.ask(WsEmitToRoom(room="feed", event="tick", data={"n": n, "p": payload}))
    assert [f["data"]["n"] for f in paused.read_frames(backlog)] == list(range(backlog))
    for n in range(backlog, backlog + 5):
        daemon.system.ask(WsEmitToRoom(room="feed", event="tick", data={"n": n}))
    assert [f["data"]["n"] for f in paused.read_frames(5)] == list(range(backlog, backlog + 5))
    assert slow_closes(daemon) == 0


def test_the_gateway_declines_compression_and_frames_still_flow(running: Running) -> None:
    daemon = running.start(config())

    async def scenario() -> None:
        ws = await connect(daemon)  # websockets offers permessage-deflate by default
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        assert (await request(ws, type="join", room="r"))["type"] == "joined"
        await ask(daemon, WsEmitToRoom(room="r", event="e", data={"text": "é" * 300}))
        got = await frame(ws)
        assert got["event"] == "e" and got["data"] == {"text": "é" * 300}

    asyncio.run(scenario())


def test_bad_frames_get_an_error_or_a_close_never_a_crash(running: Running) -> None:
    daemon = running.start(config(max_frame_size=1024, inbound_rate=20.0, inbound_burst=20))

    async def scenario() -> None:
        ws = await connect(daemon)
        for bad in ("{nope", "[1, 2]", json.dumps({"type": "dance"}), json.dumps({"room": "r"})):
            await ws.send(bad)
            got = await frame(ws)
            assert got["type"] == "error", bad
        assert (await request(ws, type="join"))["code"] == "invalid_message"
        assert (await request(ws, type="join", room="bad room!"))["code"] == "invalid_message"
        assert (await request(ws, type="join", room="r", since="yesterday"))["type"] == "error"
        assert (await request(ws, type="publish", room="r", event="e"))["code"] == "unauthorized"
        await ws.send(b"\x00binary")
        assert (await frame(ws))["code"] == "bad_frame"
        assert (await request(ws, type="ping"))["type"] == "pong"
        await ws.send("x" * 5000)
        assert (await close_code(ws))[0] == 1009
        flood = await connect(daemon)
        with contextlib.suppress(websockets.ConnectionClosed):  # the close may come before
            for _ in range(40):  # twice the burst, at once
                await flood.send(json.dumps({"type": "ping"}))
        assert await close_code(flood) == (4029, "flooding")
        health = daemon.system.health()
        assert health.managers["websocket"].restarts == 0
        assert health.managers["websocket"].state == "running"

    asyncio.run(scenario())


def test_fragments_pings_early_frames_and_closes_follow_rfc_6455(running: Running) -> None:
    daemon = running.start(config())

    async def scenario() -> None:
        async with websockets.connect(ws_url(daemon, f"?token={token(daemon)}")) as ws:
            await ws.send(json.dumps({"type": "join", "room": "r"}))  # before its welcome
            assert [(await frame(ws))["type"] for _ in range(2)] == ["welcome", "joined"]
            await ws.send(['{"type": "ping",', ' "id": 3}'])  # one message in two frames
            assert await frame(ws) == {"type": "pong", "id": 3}
            await asyncio.wait_for(await ws.ping(b"hi"), 5)
            await ws.close(code=1000, reason="bye")
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000
        async with websockets.connect(ws_url(daemon)) as ws:
            await ws.send(json.dumps({"type": "auth", "token": token(daemon)}))
            await ws.send(json.dumps({"type": "ping", "id": 4}))
            assert [(await frame(ws))["type"] for _ in range(2)] == ["welcome", "pong"]

    asyncio.run(scenario())
    not_utf8 = SilentClient(ws_url(daemon, f"?token={token(daemon)}"))
    not_utf8.send_text(b"\xff\xfe")
    assert not_utf8.read_until_closed()[0] == 1007
    unmasked = SilentClient(ws_url(daemon, f"?token={token(daemon)}"))
    unmasked.sock.sendall(b"\x81\x02{}")
    assert unmasked.read_until_closed()[0] == 1002
    assert daemon.system.health().managers["websocket"].state == "running"


def test_clients_publish_when_allowed_and_see_presence_events(running: Running) -> None:
    daemon = running.start(config(client_publish=True, presence_events=True))

    async def scenario() -> None:
        alice = await connect(daemon, "alice")
        bob = await connect(daemon, "bob")
        await request(alice, type="join", room="chat")
        assert (await frame(alice))["data"]["user"] == "alice"  # her own arrival
        await request(bob, type="join", room="chat")
        joined = await frame(alice)
        assert joined["type"] == "join" and joined["data"]["user"] == "bob"
        assert (await frame(bob))["type"] == "join"  # bob sees his own arrival too
        await bob.send(
            json.dumps({"type": "publish", "room": "chat", "event": "say", "data": "hi"})
        )
        said = await frame(alice)
        assert (said["event"], said["data"]) == ("say", "hi")
        bobs = sorted([await frame(bob), await frame(bob)], key=lambda f: str(f["type"]))
        assert [f["type"] for f in bobs] == ["message", "published"]  # his own, and the receipt
        assert bobs[1]["offset"] == said["offset"]
        assert (await request(bob, type="leave", room="chat"))["type"] == "left"
        left = await frame(alice)
        assert left["type"] == "leave" and left["data"]["user"] == "bob"

    asyncio.run(scenario())


def next_message(pubsub: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        message = pubsub.get_message(timeout=0.5)
        if message is not None and message["type"] == "message":
            assert isinstance(message, dict)
            return message
        assert time.monotonic() < deadline, "nothing published"


FORGED_MESSAGE = {
    "type": "message", "room": "news", "event": "forged", "data": 1, "offset": 99,
    "epoch": "deadbeef",
}  # fmt: skip


def test_signed_channels_take_only_what_a_holder_of_the_key_published(
    redis_server: RedisServer, running: Running
) -> None:
    keys = ["old-channel-key", "channel-signing-key"]
    emitter = running.start(config(redis_server.url, signing_keys=keys[1:]))
    receiver = running.start(  # signs with the old key, verifies with both: a rotation
        config(redis_server.url, signing_keys=keys, presence_events=True)
    )
    frame_text = json.dumps(FORGED_MESSAGE)
    forged_head = frame_text[: frame_text.index('"offset":') + len('"offset":')]

    async def scenario(raw: redis.Redis) -> None:
        ws = await websockets.connect(ws_url(receiver, f"?token={token(receiver)}"))
        cid = (await frame(ws))["connection_id"]
        joined = await request(ws, type="join", room="news")
        assert (await frame(ws))["type"] == "join"  # its own arrival, signed, back from Redis
        room, control = "wst:ws.room.news", f"wst:ws.node.{cid.rpartition('.')[0]}"
        order = json.dumps({"op": "disconnect", "connection_id": cid, "code": 4000, "reason": "x"})
        forgeries = [
            (room, frame_text.encode()),  # unsigned
            (room, bytes(32) + b"f" + frame_text.encode()),  # a made-up signature
            (room, bytes(32) + b"m" + forged_head.encode() + b'1,"epoch":"ab"}'),
            (room, b"\xff\xfe not text"),
            (control, order.encode()),
            (control, bytes(32) + b"f" + order.encode()),
        ]
        for channel, payload in forgeries:  # orders to a node go by sharded pub/sub
            send = raw.spublish if channel == control else raw.publish
            assert send(channel, payload) == 1
        listener = raw.pubsub()  # type: ignore[no-untyped-call]
        listener.subscribe(room)
        emitted = await ask(emitter, WsEmitToRoom(room="news", event="posted", data={"id": 1}))
        got = await frame(ws)
        assert (got["event"], got["offset"]) == ("posted", emitted.offset)
        # A genuine payload seen on the channel, its unsigned tail bent to override the data.
        genuine: bytes = (await asyncio.to_thread(next_message, listener))["data"]
        listener.close()
        head = genuine[: genuine.rindex(b'"offset":') + len(b'"offset":')]
        assert raw.publish(room, head + b'7,"epoch":"ab","data":"evil"}') == 1
        assert (await request(ws, type="ping"))["type"] == "pong"  # nothing forged came, still open
        health = await asyncio.to_thread(manager_health, receiver)
        assert health.metrics["forged"] == len(forgeries) + 1 and health.details["signed"]
        # The history: an entry XADDed without the key makes a gap, never a recovery of it.
        page = await ask(receiver, WsHistory(room="news", since=joined["offset"]))
        assert [m["event"] for m in page.messages] == ["posted"] and not page.gap
        history, offset = "wst:{ws:room:news}:history", "wst:{ws:room:news}:offset"
        raw.xadd(history, {"f": frame_text}, id=f"0-{emitted.offset + 1}")
        raw.incr(offset)
        page = await ask(receiver, WsHistory(room="news", since=joined["offset"]))
        assert page.gap and page.messages == []
        health = await asyncio.to_thread(manager_health, receiver)
        assert health.metrics["forged_history"] == 1
        # A genuine order to the receiver's node: the emitter puts the connection in a room.
        await ask(emitter, WsJoinRoom(room="vip", connection_id=cid))
        assert (await frame(ws))["type"] == "joined"
        assert (await frame(ws))["type"] == "join"

    with redis.Redis.from_url(redis_server.url, protocol=2) as raw:
        asyncio.run(scenario(raw))


def test_without_keys_the_channels_carry_bare_frames_as_before(
    redis_server: RedisServer, running: Running
) -> None:
    daemon = running.start(config(redis_server.url))

    async def scenario() -> None:
        ws = await connect(daemon)
        await request(ws, type="join", room="news")
        with redis.Redis.from_url(redis_server.url) as raw:
            assert raw.publish("wst:ws.room.news", json.dumps(FORGED_MESSAGE)) == 1
        assert await frame(ws) == FORGED_MESSAGE
        emitted = await ask(daemon, WsEmitToRoom(room="news", event="posted"))
        assert (await frame(ws))["offset"] == emitted.offset
        page = await ask(daemon, WsHistory(room="news", since=0, epoch=emitted.epoch))
        assert [m["event"] for m in page.messages] == ["posted"]

    asyncio.run(scenario())


# -- who may join which room --------------------------------------------------------------

PERSONAL_AND_PUBLIC = {"user:{sub}": "clients", "public:admin": "server", "public:*": "clients"}


async def refusal(ws: ClientConnection, **fields: Any) -> str:
    """The reason of the ``forbidden`` error frame that answers ``fields``."""
    refused = await request(ws, **fields)
    assert (refused["type"], refused["code"], refused["room"]) == (
        "error", "forbidden", fields["room"],
    ), refused  # fmt: skip
    reason: str = refused["reason"]
    return reason


def test_a_user_joins_their_own_room_and_public_ones_never_another_users(
    running: Running,
) -> None:
    daemon = running.start(config(room_policies=PERSONAL_AND_PUBLIC))

    async def scenario() -> None:
        owner = await connect(daemon, "42")
        mallory = await connect(daemon, "mallory")
        assert await refusal(mallory, type="join", room="user:42") == "no_policy"
        assert (await request(owner, type="join", room="user:42"))["type"] == "joined"
        assert (await request(mallory, type="join", room="user:mallory"))["type"] == "joined"
        for ws in (owner, mallory):
            assert (await request(ws, type="join", room="public:lobby"))["type"] == "joined"
        assert await refusal(mallory, type="join", room="public:admin") == "server_only"
        assert await refusal(mallory, type="join", room="private:x") == "no_policy"
        # What the room says is not for her: neither its messages, nor its history or presence.
        await ask(daemon, WsEmitToRoom(room="user:42", event="password_reset", data="s3cret"))
        assert (await frame(owner))["data"] == "s3cret"
        assert await refusal(mallory, type="history", room="user:42", since=0) == "not_a_member"
        assert await refusal(mallory, type="presence", room="user:42") == "not_a_member"
        assert (await request(mallory, type="ping"))["type"] == "pong"  # refused, not closed
        assert (await request(owner, type="history", room="user:42"))["type"] == "history"
        # Only the service puts people in server rooms: WsJoinRoom is never refused.
        members = (await request(mallory, type="presence", room="public:lobby"))["members"]
        mine = next(m["connection_id"] for m in members if m["user"] == "mallory")
        await ask(daemon, WsJoinRoom(room="public:admin", connection_id=mine))
        assert (await frame(mallory))["type"] == "joined"
        assert manager_health(daemon).metrics["forbidden"] == 5
        with pytest.raises(NotFound):
            await ask(daemon, WsJoinRoom(room="public:admin", connection_id="nobody.1"))

    asyncio.run(scenario())


def test_by_default_only_the_personal_room_is_open(running: Running) -> None:
    daemon = running.start(config(room_policies=None))

    async def scenario() -> None:
        ws = await connect(daemon, "42")
        assert (await request(ws, type="join", room="user:42"))["type"] == "joined"
        for room in ("user:43", "news", "public:lobby"):
            assert await refusal(ws, type="join", room=room) == "no_policy"
        # A subject with glob characters is taken literally, never as a pattern.
        star = await connect(daemon, "*")
        assert await refusal(star, type="join", room="user:42") == "no_policy"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("policies", "problem"),
    [
        ({"user:{sub}": "everyone"}, "expected 'clients' or 'server', got 'everyone'"),
        ({"user:{id}": "clients"}, "unknown placeholder {id}"),
        ({"": "server"}, "a pattern must not be empty"),
    ],
)
def test_a_bad_room_policy_is_a_config_error_naming_it(
    policies: dict[str, str], problem: str
) -> None:
    naming = r"^managers\.websocket\.room_policies: .*" + re.escape(problem)
    with pytest.raises(ConfigError, match=naming):
        parse_options(WebSocketOptions, {"room_policies": policies}, manager="websocket")


def subscription_token(daemon: Daemon, user: str, room: str, ttl: float | None = None) -> str:
    issued = daemon.system.ask(AuthIssueSubscription(subject=user, room=room, ttl=ttl))
    return str(issued.access_token)


def test_a_subscription_token_admits_exactly_its_room_its_user_and_until_its_exp(
    running: Running,
) -> None:
    daemon = running.start(config(room_policies=None, auth={"leeway": 0.0}))

    async def scenario() -> None:
        ws = await connect(daemon, "mallory")
        game7 = subscription_token(daemon, "mallory", "game:7")
        assert await refusal(ws, type="join", room="game:7") == "no_policy"  # no token
        assert await refusal(ws, type="join", room="game:8", token=game7) == (
            "token_for_another_room"
        )
        others = subscription_token(daemon, "42", "game:7")
        assert await refusal(ws, type="join", room="game:7", token=others) == (
            "token_of_another_user"
        )
        genuine = jwt.get_unverified_header(game7)
        claims = jwt.decode(game7, options={"verify_signature": False})
        forged = jwt.encode(claims, "x" * 32, algorithm="HS256", headers={"kid": genuine["kid"]})
        assert await refusal(ws, type="join", room="game:7", token=forged) == "bad_signature"
        access = token(daemon, "mallory")  # an access token is no subscription token
        assert await refusal(ws, type="join", room="game:7", token=access) == "wrong_token_type"
        soon = subscription_token(daemon, "mallory", "game:9", ttl=1)
        assert await refusal(ws, type="join", room="game:7", token=12) == "malformed"
        joined = await request(ws, type="join", room="game:7", token=game7)
        assert (joined["type"], joined["room"]) == ("joined", "game:7")
        assert (await request(ws, type="presence", room="game:7"))["count"] == 1
        await asyncio.sleep(1.2)
        assert await refusal(ws, type="join", room="game:9", token=soon) == "expired"
        # A subscription token opens no connection.
        async with websockets.connect(ws_url(daemon, f"?token={game7}")) as bearer:
            assert await close_code(bearer) == (4401, "wrong_token_type")

    asyncio.run(scenario())


def test_join_room_finds_connections_on_any_daemon_or_says_not_found(
    redis_server: RedisServer, running: Running
) -> None:
    first = running.start(config(redis_server.url, room_policies=None))
    second = running.start(config(redis_server.url, room_policies=None))

    async def scenario() -> None:
        ws = await connect(second, "42")
        assert (await request(ws, type="join", room="user:42"))["type"] == "joined"
        presence = await request(ws, type="presence", room="user:42")
        cid = presence["members"][0]["connection_id"]
        node = cid.rpartition(".")[0]
        joined = await ask(first, WsJoinRoom(room="vip", connection_id=cid))  # forwarded
        assert joined.count == -1
        assert (await frame(ws))["room"] == "vip"
        for unknown in (f"{node}.999", "deadbeef.1", "nobody"):
            with pytest.raises(NotFound):
                await ask(first, WsJoinRoom(room="vip", connection_id=unknown))
        await ws.close()
        deadline = time.monotonic() + 5
        while True:  # the socket's close reaches its daemon's manager
            try:
                await ask(first, WsJoinRoom(room="vip", connection_id=cid))
            except NotFound:
                break
            assert time.monotonic() < deadline, "a closed connection was still found"
            await asyncio.sleep(0.05)

    asyncio.run(scenario())


def test_on_redis_it_needs_the_asyncio_sharded_pub_sub_of_redis_8(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_redis, "ASYNC_SHARDED_PUBSUB", False)  # as redis-py 7 and older
    with pytest.raises(
        ConfigError, match=r"needs redis-py 8\.0 or newer: pip install 'corral\[websocket\]'"
    ):
        Daemon(config("redis://127.0.0.1:1/0"))
    Daemon(config()).system.stop()  # on memory, one daemon: no Redis pub/sub at all
