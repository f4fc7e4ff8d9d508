"""Callback subscriptions: 5,000 of them on one RedisBus vs a bare redis-py reader thread.

Both against the same private redis-server, in the same run, one after the other:

- corral: a :class:`~corral.bus.RedisBus` with 5,000 callback subscriptions, one per
  exact topic (``tick.<i>``); their callbacks run on the bus's shared callback threads
  (``bus.callback_threads``, 4 by default), events published by a second RedisBus
  (encoded as codec envelopes, decoded and checked by the reader);
- reference: one redis-py ``PubSub`` subscribed to the same 5,000 channels, drained by
  one thread that unpacks each payload with ``msgpack`` and calls the callback of its
  channel itself — the smallest reader one would write by hand.

Each event carries the ``time.perf_counter()`` of its publication; its latency is the
time its callback sees it. Paced, events go to the subscriptions in turn, one every
millisecond (the delivery time of one event, not queueing); in a burst, one event to
each subscription, published back to back (queueing included). Rounds alternate the
two sides; each side's best round is kept (the machine is shared). The threads figure
is the process's threads with the subscriptions open, less those before.

Run: ``python bench/subscriptions.py``. Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

import msgpack
import redis
from _report import Row, percentiles, report

from corral.bus import Delivery, RedisBus
from corral.messages.base import Event, message
from tests.redis_server import RedisServer

SUBSCRIPTIONS = 5_000
EVENTS = 2_000
PACE = 0.001  # seconds between events
ROUNDS = 3
WAIT = 10.0  # seconds for the last events of a round to arrive


@message("bench.tick")
class Tick(Event):
    n: int
    sent: float


class Latencies:
    """What the callbacks saw: one latency per event, in seconds."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.done = threading.Event()
        self.expected = 0

    def start(self, expected: int) -> None:
        self.samples = []
        self.expected = expected
        self.done.clear()

    def add(self, sent: float) -> None:
        self.samples.append(time.perf_counter() - sent)  # list.append is atomic
        if len(self.samples) >= self.expected:
            self.done.set()


def publish_all(publish: Callable[[int], None], *, burst: bool) -> None:
    """``publish(n)`` for every event: one every PACE seconds, or, in a burst, one to
    every subscription as fast as they go."""
    if burst:
        for n in range(SUBSCRIPTIONS):
            publish(n)
        return
    start = time.perf_counter()
    for n in range(EVENTS):
        publish(n)
        delay = start + (n + 1) * PACE - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def corral_round(publisher: RedisBus, seen: Latencies, *, burst: bool) -> list[float]:
    seen.start(SUBSCRIPTIONS if burst else EVENTS)

    def publish(n: int) -> None:
        publisher.publish(f"tick.{n % SUBSCRIPTIONS}", Tick(n=n, sent=time.perf_counter()))

    publish_all(publish, burst=burst)
    seen.done.wait(WAIT)
    return seen.samples


def bare_round(client: redis.Redis, seen: Latencies, *, burst: bool) -> list[float]:
    seen.start(SUBSCRIPTIONS if burst else EVENTS)

    def publish(n: int) -> None:
        channel = f"bare:tick.{n % SUBSCRIPTIONS}"
        client.publish(channel, msgpack.packb({"n": n, "sent": time.perf_counter()}))

    publish_all(publish, burst=burst)
    seen.done.wait(WAIT)
    return seen.samples


def bare_reader(
    url: str, seen: Latencies, stop: threading.Event
) -> tuple[threading.Thread, redis.Redis]:
    """One redis-py PubSub on every channel, and the thread that drains it."""
    client = redis.Redis.from_url(url, protocol=2)
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    callbacks: dict[bytes, Callable[[dict[str, object]], None]] = {}

    def callback(payload: dict[str, object]) -> None:
        sent = payload["sent"]
        assert isinstance(sent, float)
        seen.add(sent)

    for i in range(SUBSCRIPTIONS):
        callbacks[f"bare:tick.{i}".encode()] = callback
    pubsub.subscribe(*callbacks)
    for _ in range(SUBSCRIPTIONS):  # every confirmation, before the first event
        while pubsub.get_message(timeout=1.0) is None:
            pass

    def read() -> None:
        while not stop.is_set():
            msg = pubsub.get_message(timeout=0.1)
            if msg is not None and msg["type"] == "message":
                callbacks[msg["channel"]](msgpack.unpackb(msg["data"]))
        pubsub.close()

    thread = threading.Thread(target=read, name="bare-reader", daemon=True)
    thread.start()
    return thread, client


def main() -> None:
    corral_seen, bare_seen = Latencies(), Latencies()
    with RedisServer() as server:
        before = threading.active_count()
        bus = RedisBus(server.url, namespace="bench")
        for i in range(SUBSCRIPTIONS):
            bus.subscribe(f"tick.{i}", callback=lambda d: corral_seen.add(_sent(d)))
        corral_threads = threading.active_count() - before
        publisher = RedisBus(server.url, namespace="bench")
        stop = threading.Event()
        before = threading.active_count()
        reader, client = bare_reader(server.url, bare_seen, stop)
        bare_threads = threading.active_count() - before
        best: dict[tuple[str, bool], tuple[float, float]] = {}
        try:
            for _ in range(ROUNDS):
                for burst in (False, True):
                    rounds = (
                        ("corral", functools.partial(corral_round, publisher, corral_seen)),
                        ("bare", functools.partial(bare_round, client, bare_seen)),
                    )
                    for side, run in rounds:
                        p50, p99 = percentiles(run(burst=burst))
                        if (side, burst) not in best or p99 < best[side, burst][1]:
                            best[side, burst] = (p50, p99)
        finally:
            stop.set()
            reader.join(5)
            client.close()
            publisher.close()
            bus.close()
    rows = [Row("threads used", corral_threads, bare_threads, "threads")]
    for burst, kind in ((False, "paced"), (True, "burst")):
        (corral_p50, corral_p99), (bare_p50, bare_p99) = best["corral", burst], best["bare", burst]
        rows += [
            Row(f"{kind} delivery p50", corral_p50 * 1e3, bare_p50 * 1e3, "ms"),
            Row(f"{kind} delivery p99", corral_p99 * 1e3, bare_p99 * 1e3, "ms"),
        ]
    report(
        f"subscriptions: {SUBSCRIPTIONS:,} callback subscriptions on a RedisBus vs a bare "
        "redis-py reader thread (same run)",
        rows,
        note=(
            f"paced: {EVENTS:,} events, one every {PACE * 1e3:g} ms; burst: one event to each "
            f"subscription, back to back; best of {ROUNDS} rounds.\ntargets: <= 20 threads, "
            "p99 <= 2x the bare reader's. corral's threads: the bus reader and its callback "
            "threads"
        ),
    )


def _sent(delivery: Delivery) -> float:
    tick = delivery.message
    assert isinstance(tick, Tick)
    return tick.sent


if __name__ == "__main__":
    main()
