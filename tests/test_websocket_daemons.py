"""The websocket manager across two real ``corral run`` processes on one redis-server."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

import corral
from corral.errors import NotFound
from corral.messages.auth import AuthIssue, AuthIssueSubscription
from corral.messages.websocket import WsEmitToRoom, WsJoinRoom, WsRoomInfo
from tests.redis_server import ClusterGroup, RedisServer
from tests.support import read_until, start_corral

SECRET = "websocket-daemons-signing-secret-32"


def write_config(tmp_path: Path, redis_url: str) -> Path:
    path = tmp_path / "corral.toml"
    path.write_text(
        f'[bus]\nbackend = "redis"\nurl = "{redis_url}"\nnamespace = "wsd"\n'
        "[daemon]\nport = 0\nheartbeat_interval = 0.2\nheartbeat_ttl = 1.0\n"
        f'[managers.auth]\nsigning_key = "{SECRET}"\n'
        '[managers.websocket]\ndepends_on = ["auth"]\npresence_ttl = 1.0\n'
        'room_policies = { "user:{sub}" = "clients", "news" = "clients", "vip:*" = "server" }\n'
    )
    return path


def start_daemon(config: Path) -> tuple[subprocess.Popen[str], str]:
    process = start_corral("run", "-c", str(config))
    log = read_until(process, "running 3 managers")
    match = re.search(r"serving http://(\S+) ", log)
    assert match, log
    return process, match.group(1)


async def member(address: str, token: str) -> ClientConnection:
    ws = await websockets.connect(f"ws://{address}/ws?token={token}")
    assert json.loads(await ws.recv())["type"] == "welcome"
    await ws.send(json.dumps({"type": "join", "room": "news"}))
    assert json.loads(await ws.recv())["type"] == "joined"
    return ws


async def room_count(remote: corral.Client, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (await asyncio.to_thread(remote.ask, WsRoomInfo(room="news"))).count != count:
        assert time.monotonic() < deadline, f"the room never had {count} members"
        await asyncio.sleep(0.1)


def test_fan_out_and_presence_across_two_corral_run_processes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    fan_out_across_two_daemons(redis_server.url, tmp_path)


def test_fan_out_and_presence_across_two_daemons_on_a_cluster(
    redis_cluster: ClusterGroup, tmp_path: Path
) -> None:
    fan_out_across_two_daemons(redis_cluster.node_url(1), tmp_path)


def fan_out_across_two_daemons(url: str, tmp_path: Path) -> None:
    """An emit reaches both daemons' clients; a SIGKILLed daemon's member leaves presence."""
    config = write_config(tmp_path, url)
    (survivor, here), (victim, there) = start_daemon(config), start_daemon(config)
    try:
        with corral.connect(url, namespace="wsd") as remote:
            tokens = [
                remote.ask(AuthIssue(subject=f"user:{n}", refresh=False)).access_token
                for n in range(2)
            ]

            async def scenario() -> None:
                a = await member(here, tokens[0])
                b = await member(there, tokens[1])
                emitted = await asyncio.to_thread(
                    remote.ask, WsEmitToRoom(room="news", event="posted", data={"id": 7})
                )
                for ws in (a, b):  # the emit reached both daemons' clients
                    got: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    assert (got["event"], got["data"], got["offset"]) == (
                        "posted", {"id": 7}, emitted.offset,
                    )  # fmt: skip
                await room_count(remote, 2)
                victim.kill()  # SIGKILL: its members never leave; their presence expires
                assert victim.wait(timeout=10) == -signal.SIGKILL
                await room_count(remote, 1)
                info = await asyncio.to_thread(remote.ask, WsRoomInfo(room="news"))
                assert [m["user"] for m in info.members] == ["user:0"]
                await a.close()

            asyncio.run(scenario())
    finally:
        for process in (survivor, victim):
            process.kill()
            process.wait()


def test_room_policies_and_joins_across_two_corral_run_processes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    policies_across_two_daemons(redis_server.url, tmp_path)


def test_room_policies_and_joins_across_two_daemons_on_a_cluster(
    redis_cluster: ClusterGroup, tmp_path: Path
) -> None:
    policies_across_two_daemons(redis_cluster.node_url(2), tmp_path)


def policies_across_two_daemons(url: str, tmp_path: Path) -> None:
    """Each daemon refuses what the policies refuse; the service reaches either daemon's
    sockets through any daemon, and an unknown connection is NotFound wherever it is asked."""
    config = write_config(tmp_path, url)
    (first, _), (second, there) = start_daemon(config), start_daemon(config)
    try:
        with corral.connect(url, namespace="wsd") as remote:
            access = remote.ask(AuthIssue(subject="42", refresh=False)).access_token
            ticket = remote.ask(AuthIssueSubscription(subject="42", room="game:7")).access_token

            async def request(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
                await ws.send(json.dumps(fields))
                answer: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
                return answer

            async def scenario() -> None:
                ws = await websockets.connect(f"ws://{there}/ws?token={access}")
                cid = json.loads(await ws.recv())["connection_id"]
                refused = await request(ws, type="join", room="user:43")
                assert (refused["code"], refused["reason"]) == ("forbidden", "no_policy")
                refused = await request(ws, type="join", room="vip:1")
                assert (refused["code"], refused["reason"]) == ("forbidden", "server_only")
                assert (await request(ws, type="join", room="user:42"))["type"] == "joined"
                joined = await request(ws, type="join", room="game:7", token=ticket)
                assert joined["type"] == "joined"
                # The service's WsJoinRoom, taken by either daemon, reaches the socket.
                for n in range(4):
                    await asyncio.to_thread(
                        remote.ask, WsJoinRoom(room=f"vip:{n}", connection_id=cid)
                    )
                    got = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    assert (got["type"], got["room"]) == ("joined", f"vip:{n}")
                for unknown in (f"{cid}0", "deadbeef.1"):
                    with pytest.raises(NotFound):
                        await asyncio.to_thread(
                            remote.ask, WsJoinRoom(room="vip:1", connection_id=unknown)
                        )
                await ws.close()

            asyncio.run(scenario())
    finally:
        for process in (first, second):
            process.kill()
            process.wait()
