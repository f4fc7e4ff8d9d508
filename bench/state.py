"""State: a transition through the state actor on Redis against redis-py by hand, in one run.

- transition, one caller and 4 threads on one state (where WATCH retries):
  ``StateUpdate`` through ``System.ask`` (one Lua script: checks, write,
  history, version, stream, then the event published on the Redis bus) vs the same
  change hand-written with redis-py WATCH/MULTI/EXEC (WATCH, HGETALL, check, then
  MULTI: HSET, RPUSH, LTRIM, XADD, PUBLISH, EXEC), and vs a plain redis-py GET;
- events/s delivered to one subscriber: a ``DurableSubscription`` reading the state
  event stream vs a raw redis-py pub/sub loop (``get_message`` + msgpack decode)
  receiving the same payloads from a pipelining publisher.

Run: ``python bench/state.py``. Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import cast

import msgpack
import redis
from _report import Row, report, timed

from corral.actors.state import StateManager
from corral.config import BusSection, Config
from corral.messages.state import (
    DEFAULT_PARTITIONS,
    StateCommit,
    StateRegister,
    StateUpdate,
    StateWrite,
)
from corral.streams import DurableSubscription, events_stream_key, partition_of
from corral.supervisor import ChildSpec
from corral.system import System
from tests.redis_server import RedisServer

TRANSITIONS = 3_000
THREADS = 4
EVENTS = 30_000
STREAM = partition_of("e", DEFAULT_PARTITIONS)  # the partition of the state "e" below
BATCH = 500


def by_hand(client: redis.Redis, n: int) -> int:
    """One versioned update the WATCH/MULTI/EXEC way; returns how often it had to retry."""
    retries = 0
    key, history = "hand:{s}:u1", "hand:{s}:h:u1"
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                current = pipe.hgetall(key)
                if current.get(b"status") != b"active":
                    raise RuntimeError("not active")
                version = int(current[b"version"]) + 1
                body = msgpack.packb({"n": n, "version": version})
                pipe.multi()
                pipe.hset(key, mapping={"data": body, "version": version})
                pipe.rpush(history, body)
                pipe.ltrim(history, -100, -1)
                pipe.xadd("hand:{s}:events", {"body": body}, maxlen=100_000)
                pipe.publish("hand:state.changed.User.u1", body)
                pipe.execute()
                return retries
            except redis.WatchError:
                retries += 1


def transitions(server: RedisServer) -> list[Row]:
    config = Config().replace(bus=BusSection(backend="redis", url=server.url))
    spec = ChildSpec(name="state", manager=StateManager, options={"backend": "redis"},
                     redis_url=server.url)  # fmt: skip
    client = redis.Redis.from_url(server.url, protocol=2)
    client.hset("hand:{s}:u1", mapping={"status": "active", "version": 1, "data": b"\x80"})
    client.set("plain", b"x" * 40)
    with System(config, managers=[spec]) as system:
        system.ask(StateRegister(state_id="u1", state_type="User"))
        counter = iter(range(10**9))
        actor = timed(
            lambda: system.ask(StateUpdate(state_id="u1", data={"n": next(counter)})),
            TRANSITIONS, repeat=3,
        )  # fmt: skip
        actor_contended, _ = contended(
            lambda: lambda n: system.ask(StateUpdate(state_id="u1", data={"n": n}))
        )
    hand = timed(lambda: by_hand(client, next(counter)), TRANSITIONS, repeat=3)
    hand_contended, retries = contended(
        lambda: functools.partial(by_hand, redis.Redis.from_url(server.url, protocol=2))
    )
    get = timed(lambda: client.get("plain"), TRANSITIONS, repeat=3)
    client.close()
    return [
        Row("transition: actor vs WATCH/MULTI/EXEC", actor, hand, "ops/s"),
        Row(
            f"{THREADS} threads, one state: actor vs WATCH/MULTI/EXEC ({retries} retries)",
            actor_contended,
            hand_contended,
            "ops/s",
        ),
        Row("transition: actor vs plain GET", actor, get, "ops/s"),
    ]


def contended(make_call: Callable[[], Callable[[int], object]]) -> tuple[float, int]:
    """Transitions/s with THREADS threads changing one state at once, and the retries made."""
    per_thread = TRANSITIONS // THREADS
    retries = [0] * THREADS

    def work(index: int) -> None:
        call = make_call()
        for n in range(per_thread):
            outcome = call(n)
            if isinstance(outcome, int):
                retries[index] += outcome

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return per_thread * THREADS / (time.perf_counter() - started), sum(retries)


def durable_delivery(server: RedisServer) -> float:
    spec = ChildSpec(name="state", manager=StateManager,
                     options={"backend": "redis", "stream_max_len": EVENTS * 2},
                     redis_url=server.url, namespace="bench")  # fmt: skip
    with System(Config(), managers=[spec]) as system:
        system.ask(StateRegister(state_id="e", state_type="User"))
        for start in range(0, EVENTS, BATCH):
            writes = [StateWrite(state_id="e", transition="update", data={"n": n})
                      for n in range(start, start + BATCH)]  # fmt: skip
            system.ask(StateCommit(writes=writes), timeout=30)
    started = time.perf_counter()
    with DurableSubscription(
        server.url, stream=events_stream_key("bench", STREAM), pattern="state.changed.*"
    ) as sub:
        for _ in range(EVENTS + 1):
            assert sub.get(timeout=10) is not None
    return (EVENTS + 1) / (time.perf_counter() - started)


def raw_subscriber(server: RedisServer) -> float:
    client = redis.Redis.from_url(server.url, protocol=2)
    entries = cast("list[tuple[bytes, dict[bytes, bytes]]]",
                   client.xrange(events_stream_key("bench", STREAM), count=1))  # fmt: skip
    body = entries[0][1][b"body"]
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe("raw")
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    received = 0

    def publish() -> None:
        publisher = redis.Redis.from_url(server.url, protocol=2)
        pipe = publisher.pipeline(transaction=False)
        for n in range(EVENTS):
            pipe.publish("raw", body)
            if n % 100 == 99:
                pipe.execute()
        pipe.execute()
        publisher.close()

    thread = threading.Thread(target=publish)
    started = time.perf_counter()
    thread.start()
    while received < EVENTS:
        message = pubsub.get_message(timeout=5)
        if message is None:
            break
        msgpack.unpackb(message["data"], raw=False)
        received += 1
    elapsed = time.perf_counter() - started
    thread.join()
    pubsub.close()
    client.close()
    return received / elapsed


def main() -> None:
    logging.disable(logging.WARNING)
    with RedisServer() as server:
        rows = transitions(server)
        durable = durable_delivery(server)
        raw = raw_subscriber(server)
    rows.append(Row("events delivered: durable subscription vs raw pub/sub loop", durable, raw,
                    "events/s"))  # fmt: skip
    report("state manager on Redis (targets: >= 3x WATCH/MULTI/EXEC; >= 0.8x raw subscriber)", rows)


if __name__ == "__main__":
    main()
