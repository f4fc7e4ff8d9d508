"""Fan-out: one emitter, one room of 500 WebSocket clients, three servers in the same run.

- corral: a :class:`~corral.daemon.Daemon` with the ``auth`` and ``websocket``
  managers; the clients connect to ``/ws?token=<jwt>`` (tokens issued by the auth
  manager) and send a ``join`` frame; the emitter is ``System.ask(WsEmitToRoom(...))``
  in the daemon's process. Rooms on the memory backend, and again on Redis (a
  private redis-server: the Lua emit script PUBLISHes, the daemon's room channel
  reader fans out), which is the path every multi-daemon deployment takes, and on
  Redis with ``codec.signing_keys`` (HMAC-signed room channel) to show what signing costs;
- python-socketio: ``socketio.AsyncServer`` on aiohttp, the clients entered into one
  room when they connect, the emitter ``await sio.emit("tick", data, room=...)``;
- bare ``websockets``: a ``websockets.asyncio.server`` with ``websockets.broadcast``.

Every server runs in a process of its own; the 500 clients of each run in one asyncio
loop in another process, so the two cores are both used and the server's GIL is not
shared with its clients. The clients are the same for all three: a small RFC 6455
client on ``asyncio.Protocol`` (handshake checked, masked client frames, server pings
answered; the socket.io ones speak engine.io v4 over the websocket transport),
cheap enough that the servers, not the clients, are measured.

Each payload carries its emit time: at the receivers, deliveries/s is the round's
deliveries over (last receipt - first emit), the best of a few bursts of emits sent as
fast as the emitter can; latency (receipt - emit) is given for those bursts (mostly
queueing) and for emits paced every 20 ms (the fan-out time of one message).

A second round puts 3,000 sockets in one room of corral (memory backend) and of the bare
``websockets`` server: the servers' resident memory per connection, and the latency of
paced broadcasts to all of them.

Run: ``python bench/fanout.py`` (``--large``: the 3,000-socket round only). Prints figures
and ratios; asserts nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from _report import Row, percentiles, report

from tests.redis_server import RedisServer

CLIENTS = 500
LARGE_ROOM = 3000  # sockets in the memory and broadcast-latency round
LARGE_SIDES = ("corral", "websockets")
LARGE_PACED = 100  # a p99 of fewer samples is their maximum
LARGE_PACE = 0.1
BURST = 200  # emits per burst: 100k deliveries
ROUNDS = 3
PACED = 50
PACE = 0.02  # seconds between paced emits
ROOM = "bench"
PAD = "x" * 64  # a payload of a realistic size besides its counters
CONNECTING = 50  # handshakes in flight at once (under the servers' listen backlogs)
IDLE_TIMEOUT = 5.0  # a round ends when nothing arrived for this long
STEP_TIMEOUT = 60.0
SECRET = "fanout-bench-signing-secret-32-bytes"
SIDES = ("corral", "corral-redis", "corral-signed", "socketio", "websockets")
FIGURES = (  # row name, round kind, result key, unit
    ("deliveries/s", "burst", "rate", "/s"),
    ("burst p50", "burst", "p50_ms", "ms"),
    ("burst p99", "burst", "p99_ms", "ms"),
    ("paced p50", "paced", "p50_ms", "ms"),
    ("paced p99", "paced", "p99_ms", "ms"),
)


def payload(round_id: int, index: int) -> dict[str, Any]:
    return {"r": round_id, "i": index, "ts": time.time(), "pad": PAD}


def commands() -> Iterator[list[str]]:
    """The orchestrator's orders on stdin, one per line, split into words; ``rss`` is
    answered here (this process's resident memory, bytes)."""
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            return
        if words[0] == "rss":
            print(resident_bytes(), flush=True)
            continue
        yield words


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- servers: one process each ----------------------------------------------------------


def serve_corral(redis_url: str, clients: int, *, signed: bool) -> None:
    from corral.config import CodecSection, Config, DaemonSection, ManagerSection  # noqa: PLC0415
    from corral.daemon import Daemon  # noqa: PLC0415
    from corral.messages.auth import AuthIssue  # noqa: PLC0415
    from corral.messages.websocket import WsEmitToRoom  # noqa: PLC0415

    options: dict[str, Any] = {"backend": "memory"}
    if redis_url:
        options = {"backend": "redis", "redis_url": redis_url}
    options["room_policies"] = {ROOM: "clients"}  # the clients join it themselves
    config = Config().replace(
        daemon=DaemonSection(port=0),
        codec=CodecSection(signing_keys=[SECRET] if signed else []),
        managers={
            "auth": ManagerSection(
                class_path="corral.actors.auth:AuthManager", options={"signing_key": SECRET}
            ),
            "websocket": ManagerSection(
                class_path="corral.actors.websocket:WebSocketManager",
                depends_on=["auth"],
                options=options,
            ),
        },
    )
    daemon = Daemon(config)
    daemon.start()
    try:
        system = daemon.system
        tokens = [
            system.ask(AuthIssue(subject=f"user:{n}", refresh=False)).access_token
            for n in range(clients)
        ]
        print(json.dumps({"port": daemon.port, "tokens": tokens}), flush=True)
        for words in commands():
            round_id, count = int(words[1]), int(words[2])
            interval = float(words[3]) if words[0] == "paced" else 0.0
            started = time.perf_counter()
            for index in range(count):
                if interval:
                    time.sleep(max(0.0, started + index * interval - time.perf_counter()))
                system.ask(WsEmitToRoom(room=ROOM, event="tick", data=payload(round_id, index)))
            print("done", flush=True)
    finally:
        daemon.stop()


async def serve_socketio() -> None:
    import socketio  # type: ignore[import-untyped]  # noqa: PLC0415
    from aiohttp import web  # noqa: PLC0415

    sio = socketio.AsyncServer(async_mode="aiohttp", ping_interval=60, ping_timeout=60)
    app = web.Application()
    sio.attach(app)

    @sio.event  # type: ignore[untyped-decorator]
    async def connect(sid: str, _environ: dict[str, Any], _auth: Any = None) -> None:
        await sio.enter_room(sid, ROOM)

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    server: Any = site._server
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)

    async def emit(round_id: int, index: int) -> None:
        await sio.emit("tick", payload(round_id, index), room=ROOM)

    await obey(emit)
    await runner.cleanup()


async def serve_websockets() -> None:
    from websockets.asyncio.server import ServerConnection, broadcast, serve  # noqa: PLC0415

    members: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        members.add(ws)
        try:
            await ws.send("ready")
            await ws.wait_closed()
        finally:
            members.discard(ws)

    async with serve(
        handler, "127.0.0.1", 0, ping_interval=None, compression=None, backlog=1024
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(json.dumps({"port": port}), flush=True)

        async def emit(round_id: int, index: int) -> None:
            broadcast(members, json.dumps({"event": "tick", "data": payload(round_id, index)}))
            await asyncio.sleep(0)  # an emitting coroutine lets the loop breathe, as emit does

        await obey(emit)


async def obey(emit: Any) -> None:
    """Run the orchestrator's bursts and paced rounds with ``emit`` on this loop."""
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        words = line.split()
        if not words or words[0] == "quit":
            return
        if words[0] == "rss":
            print(resident_bytes(), flush=True)
            continue
        round_id, count = int(words[1]), int(words[2])
        interval = float(words[3]) if words[0] == "paced" else 0.0
        started = time.perf_counter()
        for index in range(count):
            if interval:
                await asyncio.sleep(max(0.0, started + index * interval - time.perf_counter()))
            await emit(round_id, index)
        print("done", flush=True)


# -- clients: all of one side in one process --------------------------------------------

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Receipts:
    """Every delivery's latency, by round; the round's first emit and last receipt."""

    def __init__(self) -> None:
        self.latencies: defaultdict[int, list[float]] = defaultdict(list)
        self.first_emit: dict[int, float] = {}
        self.last_receipt: dict[int, float] = {}

    def record(self, data: dict[str, Any]) -> None:
        now = time.time()
        round_id, emitted = data["r"], data["ts"]
        self.latencies[round_id].append(now - emitted)
        if emitted < self.first_emit.get(round_id, now):
            self.first_emit[round_id] = emitted
        self.last_receipt[round_id] = now


class Client(asyncio.Protocol):
    """One WebSocket client: handshake, frame parsing, masked sends; subclasses read text."""

    def __init__(self, path: str, port: int, receipts: Receipts) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        )
        self.key = base64.b64encode(os.urandom(16))
        self.receipts = receipts
        self.buffer = bytearray()
        self.upgraded = False
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = self.key.decode()
        transport.write(f"{self.request}Sec-WebSocket-Key: {key}\r\n\r\n".encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready: {exc}"))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.upgraded and not self._upgrade():
            return
        pos, size = 0, len(buffer)
        while size - pos >= 2:
            first, length = buffer[pos], buffer[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                start += 2
                length = int.from_bytes(buffer[pos + 2 : start], "big")
            elif length == 127:
                start += 8
                length = int.from_bytes(buffer[pos + 2 : start], "big")
            end = start + length
            if end > size:
                break
            pos = end
            opcode = first & 0x0F
            if not first & 0x80:
                raise ConnectionError("fragmented frames are not expected here")
            if opcode == 0x1:
                self.on_text(buffer[start:end].decode())
            elif opcode == 0x9:
                self.send_frame(0xA, bytes(buffer[start:end]))
            elif opcode == 0x8:
                self.send_frame(0x8, bytes(buffer[start : start + 2]))
        if pos:
            del buffer[:pos]

    def _upgrade(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head)}
        accept = base64.b64encode(hashlib.sha1(self.key + _ACCEPT_GUID).digest()).decode()
        if not head[0].startswith("HTTP/1.1 101") or headers.get("sec-websocket-accept") != accept:
            raise ConnectionError(f"handshake refused: {head[0]}")
        self.upgraded = True
        return True

    def send_frame(self, opcode: int, data: bytes) -> None:
        assert self.transport is not None
        mask, size = os.urandom(4), len(data)
        if size < 126:
            header = bytes([0x80 | opcode, 0x80 | size])
        else:
            header = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
        masked = bytes(byte ^ mask[n & 3] for n, byte in enumerate(data))
        self.transport.write(header + mask + masked)

    def send_text(self, text: str) -> None:
        self.send_frame(0x1, text.encode())

    def on_text(self, text: str) -> None:
        raise NotImplementedError


class CorralClient(Client):
    def on_text(self, text: str) -> None:
        frame = json.loads(text)
        kind = frame["type"]
        if kind == "message":
            self.receipts.record(frame["data"])
        elif kind == "welcome":
            self.send_text(json.dumps({"type": "join", "room": ROOM}))
        elif kind == "joined":
            self.ready.set_result(None)
        else:
            raise ConnectionError(f"unexpected frame {text[:200]}")


class SocketioClient(Client):
    """engine.io v4 over the websocket transport: open ``0``, connect ``40``, ping ``2``."""

    def on_text(self, text: str) -> None:
        if text.startswith("42"):
            self.receipts.record(json.loads(text[2:])[1])
        elif text == "2":
            self.send_text("3")
        elif text.startswith("0"):
            self.send_text("40")
        elif text.startswith("40"):
            self.ready.set_result(None)


class PlainClient(Client):
    def on_text(self, text: str) -> None:
        if text == "ready":
            self.ready.set_result(None)
        else:
            self.receipts.record(json.loads(text)["data"])


async def run_clients(side: str, port: int, count: int, tokens: list[str]) -> None:
    loop = asyncio.get_running_loop()
    receipts = Receipts()
    gate = asyncio.Semaphore(CONNECTING)
    clients: list[Client] = []

    async def open_one(n: int) -> None:
        if side.startswith("corral"):
            client: Client = CorralClient(f"/ws?token={tokens[n]}", port, receipts)
        elif side == "socketio":
            client = SocketioClient("/socket.io/?EIO=4&transport=websocket", port, receipts)
        else:
            client = PlainClient("/", port, receipts)
        async with gate:
            await loop.create_connection(lambda: client, "127.0.0.1", port)
            await asyncio.wait_for(client.ready, STEP_TIMEOUT)
        clients.append(client)

    await asyncio.gather(*(open_one(n) for n in range(count)))
    print(json.dumps({"clients": len(clients)}), flush=True)
    while True:
        words = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not words or words[0] == "quit":
            break
        round_id, expected = int(words[1]), int(words[2]) * len(clients)
        seen, quiet_since = -1, time.monotonic()
        while (got := len(receipts.latencies[round_id])) < expected:
            if got != seen:
                seen, quiet_since = got, time.monotonic()
            elif time.monotonic() - quiet_since > IDLE_TIMEOUT:
                break
            await asyncio.sleep(0.01)
        latencies = receipts.latencies.pop(round_id)
        elapsed = receipts.last_receipt[round_id] - receipts.first_emit[round_id]
        p50, p99 = percentiles(latencies)
        print(
            json.dumps(
                {
                    "deliveries": len(latencies),
                    "expected": expected,
                    "rate": len(latencies) / elapsed,
                    "p50_ms": p50 * 1000,
                    "p99_ms": p99 * 1000,
                }
            ),
            flush=True,
        )
    for client in clients:
        if client.transport is not None:
            client.transport.close()


# -- the orchestrator -------------------------------------------------------------------


class Child:
    """A child process of this script, spoken to in lines (stdin) and read from (stdout)."""

    def __init__(self, *args: str) -> None:
        self.name = " ".join(args[:2])
        self.process = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put("")

    def tell(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def read(self) -> str:
        line = self.lines.get(timeout=STEP_TIMEOUT)
        if not line:
            raise RuntimeError(f"{self.name} exited ({self.process.wait()})")
        return line.strip()

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.tell("quit")
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def measure(side: str, redis_url: str) -> dict[str, dict[str, float]]:
    """The best burst (by deliveries/s) and the paced round of one side."""
    server = Child("--serve", side, redis_url, str(CLIENTS))
    client: Child | None = None
    try:
        hello = json.loads(server.read())
        client = Child("--clients", side, str(hello["port"]), str(CLIENTS))
        client.tell(json.dumps(hello.get("tokens", [])))
        client.read()  # every client joined

        def one_round(round_id: int, order: str) -> dict[str, float]:
            assert client is not None
            server.tell(order)
            server.read()
            client.tell(f"report {round_id} {order.split()[2]}")
            result: dict[str, float] = json.loads(client.read())
            if result["deliveries"] < result["expected"]:
                print(f"{side}: round {round_id} lost {result['expected'] - result['deliveries']}")
            return result

        one_round(0, f"burst 0 {BURST // 4}")  # warm-up
        bursts = [one_round(r, f"burst {r} {BURST}") for r in range(1, ROUNDS + 1)]
        paced = one_round(ROUNDS + 1, f"paced {ROUNDS + 1} {PACED} {PACE}")
        return {"burst": max(bursts, key=lambda b: b["rate"]), "paced": paced}
    finally:
        if client is not None:
            client.stop()
        server.stop()


def measure_large(side: str) -> dict[str, float]:
    """Resident memory per connection and paced broadcast latency with LARGE_ROOM sockets."""
    server = Child("--serve", side, "", str(LARGE_ROOM))
    client: Child | None = None
    try:
        hello = json.loads(server.read())
        server.tell("rss")
        before = int(server.read())
        client = Child("--clients", side, str(hello["port"]), str(LARGE_ROOM))
        client.tell(json.dumps(hello.get("tokens", [])))
        client.read()  # every client joined
        server.tell("rss")
        per_connection = (int(server.read()) - before) / LARGE_ROOM
        server.tell(f"paced 1 {LARGE_PACED} {LARGE_PACE}")
        server.read()
        client.tell(f"report 1 {LARGE_PACED}")
        paced: dict[str, float] = json.loads(client.read())
        if paced["deliveries"] < paced["expected"]:
            print(f"{side}: lost {paced['expected'] - paced['deliveries']} in the large room")
        return {"kb": per_connection / 1024, **paced}
    finally:
        if client is not None:
            client.stop()
        server.stop()


def main(*, large_only: bool = False) -> None:
    started = time.perf_counter()
    large = {side: measure_large(side) for side in LARGE_SIDES}
    report(
        f"WebSocket room of {LARGE_ROOM} sockets (memory backend): resident memory per "
        f"connection, and {LARGE_PACED} broadcasts every {LARGE_PACE * 1000:.0f} ms",
        [
            Row("memory per connection", large["corral"]["kb"], large["websockets"]["kb"], "KB"),
            Row("broadcast p50", large["corral"]["p50_ms"], large["websockets"]["p50_ms"], "ms"),
            Row("broadcast p99", large["corral"]["p99_ms"], large["websockets"]["p99_ms"], "ms"),
        ],
        note=(
            "reference: a bare websockets server with websockets.broadcast (no compression).\n"
            "Memory: the server's resident set after every socket joined, minus before, over\n"
            "the sockets; latency: receipt - emit at the clients. Lower is better (targets:\n"
            "<= 1.3x for both)."
        ),
    )
    if large_only:
        return
    with RedisServer() as redis_server:
        results = {side: measure(side, redis_server.url) for side in SIDES}
    rows: list[Row] = []
    for corral_side in ("corral", "corral-redis"):
        for reference in ("socketio", "websockets"):
            ours, theirs = results[corral_side], results[reference]
            label = f"{corral_side} vs {reference}"
            rows += [
                Row(f"{label}: {name}", ours[phase][key], theirs[phase][key], unit)
                for name, phase, key, unit in FIGURES
            ]
    signed, unsigned = results["corral-signed"], results["corral-redis"]
    rows += [
        Row(
            f"corral-signed vs corral-redis: {name}", signed[phase][key], unsigned[phase][key], unit
        )
        for name, phase, key, unit in FIGURES
        if name in ("deliveries/s", "paced p50")
    ]
    report(
        f"WebSocket fan-out: {CLIENTS} clients in one room, one emitter; bursts of {BURST} "
        f"emits (best of {ROUNDS}), paced: {PACED} emits every {PACE * 1000:.0f} ms",
        rows,
        note=(
            "corral = Daemon + auth + websocket managers, emits by System.ask(WsEmitToRoom);\n"
            "corral-redis = the same with rooms on a private redis-server (Lua emit + PUBLISH\n"
            "+ channel reader); corral-signed = corral-redis with codec.signing_keys (signed\n"
            "room channel). Servers and clients in separate processes. Deliveries/s: higher\n"
            "is better (targets: >= 2x socketio, >= 0.7x websockets); latencies (receipt - emit,\n"
            f"ms): lower is better. Total {time.perf_counter() - started:.0f} s."
        ),
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    if sys.argv[1:2] == ["--serve"]:
        which = sys.argv[2]
        if which.startswith("corral"):
            serve_corral(
                sys.argv[3] if which != "corral" else "",
                int(sys.argv[4]),
                signed=which == "corral-signed",
            )
        elif which == "socketio":
            asyncio.run(serve_socketio())
        else:
            asyncio.run(serve_websockets())
    elif sys.argv[1:2] == ["--clients"]:
        asyncio.run(
            run_clients(
                sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.stdin.readline())
            )
        )
    else:
        main(large_only=sys.argv[1:2] == ["--large"])
