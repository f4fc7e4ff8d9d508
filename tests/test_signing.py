"""With signing keys, nothing unsigned, forged, signed with another key or replayed is
taken, on any channel: the bus, request streams, replies, cache invalidations (and lease
notices), the websocket room and node channels, durable stream entries.

Real redis-server, real daemons. An attacker here can read and write Redis but does not
hold the key: it captures genuine traffic (SUBSCRIBE, SSUBSCRIBE, XREAD) and sends it
again, changed or not. A message "replayed outside the window" is a genuine one with an
old timestamp, signed as docs/wire.md says with plain msgpack and hmac (what a capture
from long ago is), so no test waits for a window to pass but the bus's, which also
replays a real capture after its window.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import msgpack
import pytest
import redis
import websockets

import corral
from corral._junk import REJECTED
from corral._redis import SyncRedis, connect
from corral._wire import record_key, reply_list_key, stream_key
from corral.actors.cache import CacheManager
from corral.actors.websocket._signing import ChannelSigner
from corral.bus import RedisBus
from corral.client import Client
from corral.clock import ManualClock
from corral.config import BusSection, CodecSection, Config, ManagerSection
from corral.daemon import Daemon
from corral.messages.base import ErrorReply, Event, Message, message
from corral.messages.cache import (
    CacheGet,
    CacheInvalidated,
    CacheLeaseEnded,
    CacheSet,
    CacheStats,
)
from corral.messages.codec import Codec
from corral.messages.state import StateRegister, StateUpdate
from corral.messages.system import Ping, Pong
from corral.messages.websocket import WsEmitToRoom, WsJoinRoom
from corral.streams import DurableSubscription, events_stream_key, partition_of, signed_parts
from corral.system import System
from tests.redis_server import RedisServer
from tests.support import Done, Work, wait_until
from tests.test_cache_redis import read_from_l1
from tests.test_remote import daemon_config
from tests.test_websocket import ask, frame, request, token, ws_url
from tests.test_websocket import config as websocket_config

KEY = "signing-tests-key"
OLD_KEY = "signing-tests-old-key"
WRONG_KEY = "a-key-the-attacker-made-up"
WINDOW = 2.0
"""The replay window of the receivers that take one from the config, in seconds."""


@message("test.signing_note")
class Note(Event):
    n: int


# -- what the attacker sends ------------------------------------------------------------------


def now_ms() -> int:
    return int(time.time() * 1000)


def envelope_signed_at(
    message: Message, ts: int, channel: str, key: str = KEY, **envelope: Any
) -> bytes:
    """A genuine envelope with the timestamp ``ts``, signed for ``channel`` with plain
    msgpack and hmac, as docs/wire.md says (the "s" entry last)."""
    fields = {"t": message.type_name, "v": message.wire_version, "id": os.urandom(16)}
    fields.update({"c": None, "r": None, "ts": ts, **envelope, "b": message.to_wire()})
    unsigned = msgpack.packb(fields, use_bin_type=True)
    name = channel.encode()
    signed = len(name).to_bytes(4, "big") + name + unsigned
    signature = hmac.new(key.encode(), signed, hashlib.sha256).digest()
    return bytes(msgpack.packb({**fields, "s": signature}, use_bin_type=True))


def tampered(data: bytes, **changes: Any) -> bytes:
    """A signed envelope with some entries (or, for ``b_<field>``, body fields) changed
    and its signature kept."""
    raw = msgpack.unpackb(data, raw=False)
    for name, value in changes.items():
        if name.startswith("b_"):
            raw["b"][name[2:]] = value
        else:
            raw[name] = value
    return bytes(msgpack.packb(raw, use_bin_type=True))


def stale(data: bytes, channel: str, window: float) -> bytes:
    """``data`` as if sent twice ``window`` ago: genuinely signed, too old (and, for a
    request, without a deadline, which would keep it acceptable until then)."""
    raw = msgpack.unpackb(data, raw=False)
    message = Codec().decode(data).message
    kept = {k: raw[k] for k in ("c", "r") if k in raw}
    return envelope_signed_at(message, now_ms() - int(2 * window * 1000), channel, **kept)


# -- the bus ------------------------------------------------------------------------------------


def test_the_bus_takes_only_fresh_genuine_events(redis_server: RedisServer) -> None:
    url, channel = redis_server.url, "sig:notes"
    clock = ManualClock()
    receiver = RedisBus(
        url, namespace="sig", codec=Codec(keys=[b"k2", b"k1"], replay_window=2, clock=clock.time)
    )
    sender = RedisBus(url, namespace="sig", codec=Codec(keys=[b"k2"], clock=clock.time))
    old_sender = RedisBus(url, namespace="sig", codec=Codec(keys=[b"k1"]))  # before rotation
    spy = redis.Redis.from_url(url).pubsub()  # type: ignore[no-untyped-call]
    spy.subscribe(channel)
    assert spy.get_message(timeout=5)["type"] == "subscribe"
    try:
        notes, elsewhere = receiver.subscribe("notes"), receiver.subscribe("other")
        sender.publish("notes", Note(n=1))
        old_sender.publish("notes", Note(n=2))
        assert [notes.get(5).message for _ in range(2)] == [Note(n=1), Note(n=2)]  # type: ignore[union-attr]
        genuine = next_data(spy)
        spy.close()
        attacks = {
            "unsigned": Codec().encode(Note(n=3)),
            "wrong key": Codec(keys=[WRONG_KEY.encode()]).encode(Note(n=4), channel=channel),
            "body changed": tampered(genuine, b_n=5),
            "timestamp refreshed": tampered(genuine, ts=now_ms()),
            "duplicate": genuine,
            "outside the window": envelope_signed_at(Note(n=6), now_ms() - 5000, channel, "k2"),
        }
        raw = redis.Redis.from_url(url)
        for payload in attacks.values():
            assert raw.publish(channel, payload) == 1
        assert raw.publish("sig:other", genuine) == 1  # signed for another channel
        wait_until(lambda: receiver.stats()["rejected"] == len(attacks) + 1)
        clock.advance(2.5)  # the captured event itself, once the window has passed
        assert raw.publish(channel, genuine) == 1
        wait_until(lambda: receiver.stats()["rejected"] == len(attacks) + 2)
        sender.publish("notes", Note(n=7))
        assert notes.get(5).message == Note(n=7)  # type: ignore[union-attr]
        assert notes.get(0.2) is None and elsewhere.get(0.2) is None
        raw.close()
    finally:
        for bus in (receiver, sender, old_sender):
            bus.close()


def next_data(pubsub: Any, timeout: float = 5.0) -> bytes:
    """The payload of the next message (or sharded message) on ``pubsub``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = pubsub.get_message(timeout=0.2)
        if item is not None and item["type"] in ("message", "smessage"):
            return bytes(item["data"])
    raise AssertionError("nothing published")


# -- request streams and replies ----------------------------------------------------------------


def signed_daemon_config(url: str) -> Config:
    base = daemon_config(url)
    return base.replace(
        bus=BusSection(backend="redis", url=url, namespace="sig", reconnect_max=0.5),
        codec=CodecSection(signing_keys=[KEY], replay_window=WINDOW),
    )


@pytest.fixture
def signed_daemon(redis_server: RedisServer) -> Iterator[Daemon]:
    with Daemon(signed_daemon_config(redis_server.url)) as running:
        yield running


@pytest.fixture
def signed_client(redis_server: RedisServer) -> Iterator[Client]:
    with corral.connect(
        redis_server.url, namespace="sig", signing_keys=[KEY], replay_window=WINDOW
    ) as remote:
        yield remote


def captured_request(url: str, stream: str, send: Callable[[], Any]) -> tuple[bytes, Any]:
    """The envelope of the request ``send`` adds to ``stream``, read by an eavesdropper
    blocked in XREAD (served at the XADD, before a daemon acknowledges and deletes the
    entry), and what ``send`` returned."""
    raw = redis.Redis.from_url(url)
    start = raw.xinfo_stream(stream)["last-generated-id"] if raw.exists(stream) else b"0-0"
    seen: list[Any] = []
    eavesdropper = threading.Thread(target=lambda: seen.extend(read_next(url, stream, start)))
    eavesdropper.start()
    wait_until(lambda: any(c["name"] == "eavesdropper" and "b" in c["flags"]
                           for c in raw.client_list()))  # fmt: skip
    result = send()
    eavesdropper.join(10)
    raw.close()
    assert seen, "no request seen"
    return bytes(seen[0][1][0][1][b"m"]), result


def read_next(url: str, stream: str, after: bytes) -> Any:
    with redis.Redis.from_url(url) as client:
        client.client_setname("eavesdropper")
        return client.xread({stream: after}, count=1, block=5000)


def test_a_request_stream_runs_only_fresh_genuine_requests_once(
    redis_server: RedisServer, signed_daemon: Daemon, signed_client: Client
) -> None:
    url, stream = redis_server.url, stream_key("sig", "worker")
    genuine, done = captured_request(url, stream, lambda: signed_client.ask(Work(), timeout=1))
    assert done.handled == 1
    in_a_minute = now_ms() + 60_000
    reply_to = signed_client.reply_topic
    attacks = {
        "unsigned": Codec().encode(Work(), reply_to=reply_to, deadline=in_a_minute),
        "wrong key": Codec(keys=[WRONG_KEY.encode()]).encode(
            Work(), reply_to=reply_to, deadline=in_a_minute, channel=stream
        ),
        "body changed": tampered(genuine, b_action="sleep"),
        "deadline extended": tampered(genuine, d=in_a_minute),
        "reply topic changed": tampered(genuine, r="reply.attacker"),
        "outside the window": stale(genuine, stream, WINDOW),
    }
    raw = redis.Redis.from_url(url)
    for payload in attacks.values():
        raw.xadd(stream, {"m": payload})
    raw.xadd(stream_key("sig", "system"), {"m": genuine})  # signed for another stream
    raw.xadd(stream, {"m": genuine})  # a duplicate, within its deadline
    remote = signed_daemon.remote
    assert remote is not None
    wait_until(lambda: remote.counts["rejected"] == len(attacks) + 1)
    wait_until(lambda: remote.counts["answered_from_record"] == 1)
    time.sleep(WINDOW + 0.2)  # the capture itself, past its deadline and its window
    raw.xadd(stream, {"m": genuine})
    wait_until(lambda: remote.counts["rejected"] == len(attacks) + 2)
    assert signed_client.ask(Work()).handled == 2  # the worker ran the genuine one only
    raw.close()


def test_a_replayed_read_is_refused_too(
    redis_server: RedisServer, signed_daemon: Daemon, signed_client: Client
) -> None:
    """With keys an idempotent request leaves a run record as well (without its reply)."""
    url, stream = redis_server.url, stream_key("sig", "system")
    genuine, pong = captured_request(url, stream, lambda: signed_client.ask(Ping(payload=b"p")))
    assert pong == Pong(payload=b"p")
    request_id = msgpack.unpackb(genuine)["id"]
    raw = redis.Redis.from_url(url)
    assert raw.get(record_key("sig", "system", request_id)) == b"F"
    raw.xadd(stream, {"m": genuine})  # the daemon answers on the request's reply list
    reply_list = reply_list_key("sig", "system", request_id)
    popped: Any = raw.blpop([reply_list], timeout=5)
    codec = Codec(keys=[KEY.encode()])
    answer = codec.decode(popped[1], channel=reply_list).message
    assert isinstance(answer, ErrorReply) and answer.code == "conflict"
    assert answer.details["duplicate"] is True
    raw.close()


def test_a_client_takes_only_fresh_genuine_replies_on_its_reply_topic(
    redis_server: RedisServer, signed_daemon: Daemon, signed_client: Client
) -> None:
    url, channel = redis_server.url, f"sig:{signed_client.reply_topic}"
    spy = redis.Redis.from_url(url).pubsub()  # type: ignore[no-untyped-call]
    spy.ssubscribe(channel)
    assert spy.get_message(timeout=5)["type"] == "ssubscribe"
    assert asyncio.run(signed_client.ask_async(Work())).handled == 1
    earlier = next_data(spy)  # a genuine reply, to an earlier request
    spy.close()
    stream = stream_key("sig", "worker")
    asked: dict[str, Done] = {}

    def slow_ask() -> None:
        asked["done"] = asyncio.run(signed_client.ask_async(Work(action="sleep", seconds=1.0)))

    caller = threading.Thread(target=slow_ask)
    request, _ = captured_request(url, stream, caller.start)
    request_id = msgpack.unpackb(request)["id"]
    forged_done = Done(incarnation=1, handled=999, name="worker")
    attacks = {
        "unsigned": Codec().encode(forged_done, correlation=request_id),
        "wrong key": Codec(keys=[WRONG_KEY.encode()]).encode(
            forged_done, correlation=request_id, channel=channel
        ),
        "correlation changed": tampered(earlier, c=request_id),
        "body changed": tampered(earlier, c=request_id, b_handled=999),
        "duplicate": earlier,
        "outside the window": stale(earlier, channel, WINDOW),
    }
    raw = redis.Redis.from_url(url)
    rejected = signed_client.bus.stats()["rejected"]
    for payload in attacks.values():
        assert raw.spublish(channel, payload) == 1
    caller.join(10)
    assert asked["done"].handled == 2  # the daemon's reply, not one of those
    assert signed_client.bus.stats()["rejected"] == rejected + len(attacks)
    raw.close()


def test_a_client_takes_only_fresh_genuine_replies_from_a_reply_list(
    redis_server: RedisServer, signed_daemon: Daemon, signed_client: Client
) -> None:
    url, stream = redis_server.url, stream_key("sig", "worker")
    earlier_request, _ = captured_request(url, stream, lambda: signed_client.ask(Work()))
    earlier_list = reply_list_key("sig", "worker", msgpack.unpackb(earlier_request)["id"])
    asked: dict[str, Done] = {}

    def slow_ask() -> None:
        asked["done"] = signed_client.ask(Work(action="sleep", seconds=1.0))

    caller = threading.Thread(target=slow_ask)
    request, _ = captured_request(url, stream, caller.start)
    request_id = msgpack.unpackb(request)["id"]
    reply_list = reply_list_key("sig", "worker", request_id)
    forged_done = Done(incarnation=1, handled=999, name="worker")
    signer = Codec(keys=[KEY.encode()])
    attacks = {
        "unsigned": Codec().encode(forged_done, correlation=request_id),
        "wrong key": Codec(keys=[WRONG_KEY.encode()]).encode(
            forged_done, correlation=request_id, channel=reply_list
        ),
        "signed for another list": signer.encode(
            forged_done, correlation=request_id, channel=earlier_list
        ),
        "signed for the reply topic": signer.encode(
            forged_done, correlation=request_id, channel=f"sig:{signed_client.reply_topic}"
        ),
        "another request's reply": signer.encode(
            forged_done, correlation=b"e" * 16, channel=reply_list
        ),
        "outside the window": envelope_signed_at(
            forged_done, now_ms() - int(2 * WINDOW * 1000), reply_list, c=request_id
        ),
    }
    raw = redis.Redis.from_url(url)
    before = sum(REJECTED.counts().values())
    raw.rpush(reply_list, *attacks.values())
    caller.join(10)
    assert asked["done"].handled == 2  # the daemon's reply, not one of those
    assert sum(REJECTED.counts().values()) == before + len(attacks)
    raw.close()


# -- cache invalidations and lease notices ------------------------------------------------------


def signed_cache(url: str) -> System:
    """A tiered cache whose L1 only corral's (signed) invalidations reach: without Redis's
    tracking, a write behind its back stays unseen until a forged invalidation is obeyed."""
    main = {"type": "tiered", "url": url, "l1_ttl": 60.0, "track_external_writes": False}
    options = {"backends": {"main": main}}
    config = Config().replace(
        codec=CodecSection(signing_keys=[KEY]),
        managers={"cache": ManagerSection(options=options)},
    )
    return System(config, managers=[CacheManager]).start()


def rejected_invalidations(system: System) -> int:
    count: int = system.ask(CacheStats()).backends["main"]["invalidations_rejected"]
    return count


def test_a_cache_obeys_only_fresh_genuine_invalidations(redis_server: RedisServer) -> None:
    url, channel = redis_server.url, "corral:cache:main:invalidated"
    reader, writer = signed_cache(url), signed_cache(url)
    raw = redis.Redis.from_url(url)
    spy = raw.pubsub()  # type: ignore[no-untyped-call]
    spy.ssubscribe(channel)
    assert spy.get_message(timeout=5)["type"] == "ssubscribe"
    try:
        writer.ask(CacheSet(key="k", value=1))
        read_from_l1(reader, "k", 1)
        raw.set("corral:cache:main:{k}", msgpack.packb(2))  # behind the caches' backs
        assert reader.ask(CacheGet(key="k")).value == 1
        next_data(spy)  # the invalidation of "k"
        writer.ask(CacheSet(key="other", value=0))
        genuine = next_data(spy)  # the writer's invalidation of "other"
        spy.close()
        wrong = Codec(keys=[WRONG_KEY.encode()])
        attacks = {
            "unsigned": Codec().encode(CacheInvalidated(origin="x", keys=["k"])),
            "wrong key": wrong.encode(CacheInvalidated(origin="x", keys=["k"]), channel=channel),
            "keys changed": tampered(genuine, b_keys=["k"]),
            "duplicate": genuine,
            "outside the window": envelope_signed_at(
                CacheInvalidated(origin="x", keys=["k"]), now_ms() - 120_000, channel
            ),
            "lease notice, unsigned": Codec().encode(CacheLeaseEnded(origin="x", key="k")),
            "lease notice, wrong key": wrong.encode(
                CacheLeaseEnded(origin="x", key="k"), channel=channel
            ),
        }
        for payload in attacks.values():
            assert raw.spublish(channel, payload) == 2  # the reader's listener, the writer's
        wait_until(lambda: rejected_invalidations(reader) == len(attacks))
        assert reader.ask(CacheGet(key="k")).value == 1  # its L1 kept the key
        writer.ask(CacheSet(key="k", value=3))  # a genuine invalidation is obeyed
        wait_until(lambda: reader.ask(CacheGet(key="k")).value == 3)
    finally:
        raw.close()
        reader.stop()
        writer.stop()


# -- websocket room and node channels -----------------------------------------------------------


def channel_payload(channel: str, kind: bytes, signed: bytes, tail: bytes, ts: int) -> bytes:
    """A websocket channel payload signed with KEY at ``ts``, as docs/wire.md says."""
    stamp = ts.to_bytes(8, "big") + os.urandom(16)
    name = channel.encode()
    mac = hmac.new(KEY.encode(), len(name).to_bytes(4, "big") + name, hashlib.sha256)
    mac.update(kind + stamp + signed)
    return mac.digest() + kind + stamp + signed + tail


def test_websocket_channels_carry_only_fresh_genuine_payloads(redis_server: RedisServer) -> None:
    keyed = websocket_config(redis_server.url, signing_keys=[KEY]).replace(
        codec=CodecSection(signing_keys=[KEY], replay_window=WINDOW)
    )
    emitter, receiver = Daemon(keyed), Daemon(keyed)
    emitter.start()
    receiver.start()
    raw = redis.Redis.from_url(redis_server.url)
    try:
        asyncio.run(websocket_scenario(emitter, receiver, raw))
    finally:
        raw.close()
        receiver.stop()
        emitter.stop()


async def websocket_scenario(emitter: Daemon, receiver: Daemon, raw: redis.Redis) -> None:
    ws = await websockets.connect(ws_url(receiver, f"?token={token(receiver)}"))
    cid = (await frame(ws))["connection_id"]
    room, control = "wst:ws.room.news", f"wst:ws.node.{cid.rpartition('.')[0]}"
    for name in ("news", "other"):
        assert (await request(ws, type="join", room=name))["type"] == "joined"
    spy = raw.pubsub()  # type: ignore[no-untyped-call]
    spy.subscribe(room)
    spy.ssubscribe(control)
    await ask(emitter, WsEmitToRoom(room="news", event="posted", data={"id": 1}))
    assert (await frame(ws))["event"] == "posted"
    genuine = await asyncio.to_thread(next_data, spy)
    head_end = genuine.rindex(b'"offset":') + len(b'"offset":')
    head, tail = genuine[57:head_end], genuine[head_end:]
    wrong = ChannelSigner([WRONG_KEY.encode()])
    attacks = [
        (room, json.dumps({"type": "message", "room": "news", "event": "x"}).encode()),
        (room, wrong.message_prefix(room, head.decode()) + head + tail),
        (room, genuine.replace(b'"id":1', b'"id":2')),
        (room, genuine),  # a duplicate
        (room, channel_payload(room, b"m", head, tail, now_ms() - 5000)),  # outside the window
        ("wst:ws.room.other", genuine),  # signed for another room
    ]
    # An order to the receiver's node, taken once: it joins the connection to "vip".
    await ask(emitter, WsJoinRoom(room="vip", connection_id=cid))
    assert (await frame(ws))["type"] == "joined"
    order = await asyncio.to_thread(next_data, spy)
    spy.close()
    assert (await request(ws, type="leave", room="vip"))["type"] == "left"
    body = order[57:]
    attacks += [
        (control, body),  # unsigned
        (control, wrong.seal(control, body.decode())),
        (control, order),  # a duplicate
        (control, channel_payload(control, b"f", body, b"", now_ms() - 5000)),
    ]
    for channel, payload in attacks:  # orders to a node go by sharded pub/sub
        send = raw.spublish if channel == control else raw.publish
        assert send(channel, payload) == 1
    # Read in the order they were published, after those: the next frame is this one.
    await ask(emitter, WsEmitToRoom(room="news", event="posted", data={"id": 3}))
    assert (await frame(ws))["data"] == {"id": 3}
    assert (await request(ws, type="ping"))["type"] == "pong"
    health = receiver.system.health().managers["websocket"].health
    assert health is not None and health.metrics["forged"] == len(attacks)
    await ws.close()


# -- durable stream entries ---------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["redis_server", "redis_cluster"])
def test_durable_subscribers_take_only_genuine_entries(
    topology: str, request: pytest.FixtureRequest
) -> None:
    """On a cluster too: the signed change takes two calls of the state script, in the
    partition's slot."""
    url = request.getfixturevalue(topology).url
    config = Config().replace(
        bus=BusSection(backend="redis", url=url, namespace="sig"),
        codec=CodecSection(signing_keys=[KEY, OLD_KEY]),
        managers={"state": ManagerSection(options={"partitions": 2})},
    )
    stream = events_stream_key("sig", 0)
    with System(config) as system:
        system.start()
        for state_id in ("a", "b", "c", "d"):
            system.ask(StateRegister(state_id=state_id, state_type="T", data={"n": 0}))
        assert {partition_of(state_id, 2) for state_id in "abcd"} == {0, 1}
        sub = DurableSubscription(
            url, stream=stream, from_offset=0, signing_keys=[KEY.encode(), OLD_KEY.encode()]
        )
        raw = connect(url, setting="the attacker's client")
        entries = stream_entries(raw, stream)
        genuine = [delivery.message for delivery in take(sub, len(entries))]
        assert [e.offset for e in genuine] == list(range(1, len(entries) + 1))
        first, last = entries[0], entries[-1]
        offset = len(entries)
        other = stream_entries(raw, events_stream_key("sig", 1))[0]
        wrong_key = dict(last)
        wrong_key[b"s"] = hmac.new(
            WRONG_KEY.encode(), b"".join(framed(stream, offset + 2, last)), hashlib.sha256
        ).digest()
        forgeries: list[dict[Any, Any]] = [
            {k: v for k, v in last.items() if k != b"s"},  # unsigned
            wrong_key,
            {**last, b"body": last[b"body"].replace(b"T", b"U")},  # body changed
            first,  # a copy of a genuine entry, at another offset
            other,  # a genuine entry of another stream
        ]
        for index, fields in enumerate(forgeries, offset + 1):
            raw.xadd(stream, fields, id=f"{index}-0")
        assert sub.get(1.5) is None  # none of them delivered
        assert sub.rejected == len(forgeries)
        system.ask(StateUpdate(state_id=genuine[-1].state_id, data={"n": 9}))
        gap, event = take(sub, 2)
        assert gap.message.reason == "epoch_changed"
        assert (event.message.new, event.message.offset) == ({"n": 9}, 1)
        sub.close()
        raw.close()


def stream_entries(raw: SyncRedis, stream: str) -> list[dict[bytes, bytes]]:
    """The fields of every entry of ``stream``, in order."""
    entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", raw.xrange(stream))
    return [fields for _, fields in entries]


def framed(stream: str, offset: int, fields: dict[bytes, bytes]) -> list[bytes]:
    """What a durable entry's signature covers, written out as docs/wire.md says."""
    parts = signed_parts(stream, offset, fields)
    return [b for part in parts[:-1] for b in (len(part).to_bytes(4, "big"), part)] + [parts[-1]]


def take(sub: DurableSubscription, count: int) -> list[Any]:
    deliveries = [sub.get(5) for _ in range(count)]
    assert all(d is not None for d in deliveries), deliveries
    return deliveries
