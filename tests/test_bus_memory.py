"""MemoryBus and Subscription, and the glob rules both buses share, checked against Redis."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Iterator

import pytest
import redis

from corral.bus import Bus, Delivery, MemoryBus, RedisBus, Subscription, compile_glob, is_pattern
from corral.errors import BackendUnavailable
from corral.messages.base import Event, Message, message
from tests.redis_server import RedisServer
from tests.support import wait_until


@message("test.bus_memory_event")
class BusEvent(Event):
    n: int
    text: str = ""


@pytest.fixture
def bus() -> Iterator[MemoryBus]:
    with MemoryBus() as bus:
        yield bus


def drain(sub: Subscription) -> list[Delivery]:
    """What is queued on ``sub`` now, without waiting."""
    out = []
    while (delivery := sub.get(timeout=0)) is not None:
        out.append(delivery)
    return out


def numbers(deliveries: Iterable[Delivery]) -> list[int]:
    out = []
    for delivery in deliveries:
        assert isinstance(delivery.message, BusEvent)
        out.append(delivery.message.n)
    return out


# -- glob rules -----------------------------------------------------------------------------

GLOB_CASES: list[tuple[str, str, bool]] = [
    ("state.changed.*", "state.changed.user.42", True),
    ("state.changed.*", "state.changed.", True),
    ("state.changed.*", "state.changed", False),
    ("state.*.user.*", "state.changed.user.42", True),
    ("*", "health.changed", True),
    ("a*b*c", "abc", True),
    ("a*b*c", "axxbyyc", True),
    ("a*b*c", "acb", False),
    ("a**c", "ac", True),
    ("h?llo", "hello", True),
    ("h?llo", "hllo", False),
    ("h?llo", "heello", False),
    ("h[ae]llo", "hallo", True),
    ("h[ae]llo", "hillo", False),
    ("h[^e]llo", "hallo", True),
    ("h[^e]llo", "hello", False),
    ("h[a-c]llo", "hbllo", True),
    ("h[a-c]llo", "hdllo", False),
    ("h[c-a]llo", "hbllo", True),  # a reversed range is swapped
    ("h[^a-c]llo", "hdllo", True),
    ("h[^a-c]llo", "hbllo", False),
    (r"x[\a-c]", "x-", True),  # an escaped character does not start a range
    (r"x[\a-c]", "xb", False),
    (r"x[\]]*", "x]y", True),
    ("x[a-]y", "x_", True),  # "a-]" is the range ]..a, and the set runs on to the end
    ("x[a-]y", "xay", False),
    ("x[]y*", "x]y", False),  # "[]" is an empty set: it matches nothing
    ("x[^]y", "xay", True),
    ("x[^]y", "xy", False),
    ("ab[cd", "abc", True),  # an unclosed set ends with the pattern
    ("ab[cd", "abcd", False),
    ("ab[", "abx", False),
    (r"a\b*", "ab", True),
    (r"a\b*", r"a\b", False),
    ("*\\\\", "x\\", True),
    ("*\\", "x\\", True),  # a trailing backslash is itself
    ("a.?", "a.b", True),
    ("a.?", "axb", False),
    ("A*", "a", False),
    ("a?b", "a\nb", True),
    ("room.?", "room.é", False),  # Redis matches bytes: é is two of them
    ("room.??", "room.é", True),
    ("room.[^a]*", "room.é", True),
    ("room.*", "room.日本", True),
]
PATTERNS = sorted({pattern for pattern, _, _ in GLOB_CASES})
TOPICS = sorted({topic for _, topic, _ in GLOB_CASES})


def redis_matches(url: str, patterns: list[str], topics: list[str]) -> set[tuple[str, str]]:
    """The (pattern, topic) pairs that a real Redis PSUBSCRIBE matches."""
    prefix = b"g:"
    with redis.Redis.from_url(url, protocol=2) as client, client.pubsub() as pubsub:
        pubsub.psubscribe(*(prefix + p.encode() for p in patterns))
        pubsub.subscribe(prefix + b"end")
        confirmed = 0
        while confirmed < len(patterns) + 1:
            msg = pubsub.get_message(timeout=5)
            assert msg is not None, "Redis did not confirm the subscriptions"
            confirmed += msg["type"] in ("subscribe", "psubscribe")
        for topic in topics:
            client.publish(prefix + topic.encode(), b"")
        client.publish(prefix + b"end", b"")
        matches: set[tuple[str, str]] = set()
        while True:
            msg = pubsub.get_message(timeout=5)
            assert msg is not None, "the end marker never arrived"
            if msg["type"] == "message":
                return matches
            matches.add((msg["pattern"][2:].decode(), msg["channel"][2:].decode()))


@pytest.fixture
def redis_truth(redis_server: RedisServer) -> set[tuple[str, str]]:
    return redis_matches(redis_server.url, PATTERNS, TOPICS)


def test_is_pattern() -> None:
    assert not is_pattern("state.changed.user.42")
    assert not is_pattern(r"a\b]^-")
    assert all(is_pattern(p) for p in ("a*", "a?", "a[b", "[", "*"))


def test_the_table_says_what_redis_does(redis_truth: set[tuple[str, str]]) -> None:
    wrong = [(p, t, e) for p, t, e in GLOB_CASES if ((p, t) in redis_truth) is not e]
    assert wrong == []


def test_compile_glob_matches_exactly_what_redis_matches(
    redis_truth: set[tuple[str, str]],
) -> None:
    ours = {
        (p, t)
        for p in PATTERNS
        for t in TOPICS
        if compile_glob(p).match(t.encode().decode("latin-1"))
    }
    assert ours == redis_truth


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_both_buses_deliver_what_redis_matches(
    kind: str, redis_server: RedisServer, redis_truth: set[tuple[str, str]]
) -> None:
    bus: Bus = MemoryBus() if kind == "memory" else RedisBus(redis_server.url, namespace="glob")
    with bus:
        subs = {pattern: bus.subscribe(pattern) for pattern in PATTERNS}
        end = bus.subscribe("glob.end")
        for n, topic in enumerate(TOPICS):
            bus.publish(topic, BusEvent(n=n))
        # Redis relays in order: once the marker is here, everything before it is too.
        bus.publish("glob.end", BusEvent(n=-1))
        assert end.get(timeout=5) is not None
        delivered = {
            (pattern, delivery.topic)
            for pattern, sub in subs.items()
            for delivery in drain(sub)
            if delivery.topic != "glob.end"
        }
    assert delivered == redis_truth


# -- delivery -------------------------------------------------------------------------------


def test_exact_and_pattern_subscriptions_get_the_message_itself(bus: MemoryBus) -> None:
    exact = bus.subscribe("state.changed.user.42")
    users = bus.subscribe("state.changed.user.*")
    orders = bus.subscribe("state.changed.order.*")
    event = BusEvent(n=1, text="hi")

    bus.publish("state.changed.user.42", event)

    for sub in (exact, users):
        delivery = sub.get(timeout=0)
        assert delivery == Delivery("state.changed.user.42", event)
        assert delivery.message is event
    assert orders.get(timeout=0) is None
    stats = bus.stats()
    assert (stats["published"], stats["delivered"], stats["dropped"]) == (1, 2, 0)


def test_every_subscription_on_a_topic_gets_a_copy(bus: MemoryBus) -> None:
    subs = [bus.subscribe("health.changed") for _ in range(3)]
    bus.publish("health.changed", BusEvent(n=7))
    assert [numbers(drain(sub)) for sub in subs] == [[7], [7], [7]]
    subs[0].close()
    bus.publish("health.changed", BusEvent(n=8))
    assert [numbers(drain(sub)) for sub in subs] == [[], [8], [8]]


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_publish_listeners_see_what_this_bus_publishes_not_what_it_receives(
    kind: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    def make() -> Bus:
        return MemoryBus() if kind == "memory" else RedisBus(redis_server.url, namespace="tap")

    with make() as bus, make() as other:
        seen: list[tuple[str, int]] = []

        def note(topic: str, event: Message) -> None:
            assert isinstance(event, BusEvent)
            seen.append((topic, event.n))

        def broken(_topic: str, _event: Message) -> None:
            raise RuntimeError("listener trouble")

        bus.on_publish(note)
        bus.on_publish(broken)
        everything = bus.subscribe("*")
        with caplog.at_level(logging.ERROR, logger="corral.bus"):
            bus.publish("health.changed", BusEvent(n=1))
            other.publish("health.changed", BusEvent(n=2))  # received only, on Redis
            bus.publish("state.changed.user.42", BusEvent(n=3))
        received: list[Delivery] = []

        def all_received() -> bool:  # the other bus's event too, on Redis
            received.extend(drain(everything))
            return len(received) == (3 if kind == "redis" else 2)

        wait_until(all_received, timeout=5)
        assert seen == [("health.changed", 1), ("state.changed.user.42", 3)]
        assert bus.stats()["callback_errors"] == 2
        assert "a publish listener failed on health.changed" in caplog.text


def test_a_backslash_alone_does_not_make_a_pattern(bus: MemoryBus) -> None:
    sub = bus.subscribe(r"a\b")
    bus.publish("ab", BusEvent(n=1))
    bus.publish(r"a\b", BusEvent(n=2))
    assert numbers(drain(sub)) == [2]


@pytest.mark.parametrize("topic", ["", "state.*", "a?b", "a[b"])
def test_publish_refuses_empty_and_glob_topics(bus: MemoryBus, topic: str) -> None:
    with pytest.raises(ValueError, match="topic"):
        bus.publish(topic, BusEvent(n=1))


def test_a_full_queue_drops_and_counts(bus: MemoryBus) -> None:
    sub = bus.subscribe("flood", queue_size=2)
    for n in range(5):
        bus.publish("flood", BusEvent(n=n))

    assert sub.dropped == 3
    assert numbers(drain(sub)) == [0, 1]
    stats = bus.stats()
    assert (stats["published"], stats["delivered"], stats["dropped"]) == (5, 2, 3)
    bus.publish("flood", BusEvent(n=5))
    assert numbers(drain(sub)) == [5]


def test_the_bus_queue_size_is_the_default() -> None:
    with MemoryBus(queue_size=1) as bus:
        sub = bus.subscribe("t")
        bus.publish("t", BusEvent(n=1))
        bus.publish("t", BusEvent(n=2))
        assert sub.dropped == 1


def test_counts_stay_exact_under_concurrent_publishers(bus: MemoryBus) -> None:
    sub = bus.subscribe("t", queue_size=3000)

    def publish_many() -> None:
        for n in range(1000):
            bus.publish("t", BusEvent(n=n))

    threads = [threading.Thread(target=publish_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = bus.stats()
    assert (stats["published"], stats["delivered"], stats["dropped"]) == (4000, 3000, 1000)
    assert sub.dropped == 1000
    assert len(drain(sub)) == 3000


# -- the callback form ----------------------------------------------------------------------


def test_callback_runs_on_a_thread_of_the_bus_and_survives_errors(
    bus: MemoryBus, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []
    threads: set[threading.Thread] = set()

    def callback(delivery: Delivery) -> None:
        threads.add(threading.current_thread())
        seen.extend(numbers([delivery]))
        if seen[-1] == 1:
            raise RuntimeError("callback trouble")

    with caplog.at_level(logging.ERROR, logger="corral.bus"):
        sub = bus.subscribe("t", callback=callback)
        for n in range(3):
            bus.publish("t", BusEvent(n=n))
        wait_until(lambda: len(seen) == 3)

    assert seen == [0, 1, 2]
    assert len(threads) == 1
    assert threading.current_thread() not in threads
    assert sub.callback_errors == 1
    assert bus.stats()["callback_errors"] == 1
    (record,) = caplog.records
    assert "callback failed" in record.getMessage()
    assert record.exc_info is not None
    sub.close()
    bus.close()
    assert not any(thread.is_alive() for thread in threads)


def test_a_callback_may_close_its_own_subscription(bus: MemoryBus) -> None:
    subs: list[Subscription] = []
    seen: list[int] = []

    def callback(delivery: Delivery) -> None:
        seen.extend(numbers([delivery]))
        subs[0].close()

    subs.append(bus.subscribe("t", callback=callback))
    bus.publish("t", BusEvent(n=1))
    wait_until(lambda: subs[0].closed)
    bus.publish("t", BusEvent(n=2))
    assert seen == [1]
    assert bus.stats()["subscriptions"] == 0


def _callback_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("corral-bus-callback")]


def test_many_callback_subscriptions_share_a_few_threads() -> None:
    before = len(_callback_threads())
    with MemoryBus(callback_threads=3) as bus:
        seen: list[int] = []
        lock = threading.Lock()

        def callback(delivery: Delivery) -> None:
            with lock:
                seen.extend(numbers([delivery]))

        for n in range(2000):
            bus.subscribe(f"t.{n}", callback=callback)
        assert len(_callback_threads()) - before == 3
        for n in range(2000):
            bus.publish(f"t.{n}", BusEvent(n=n))
        wait_until(lambda: len(seen) == 2000, timeout=10)
        assert sorted(seen) == list(range(2000))
        assert len(_callback_threads()) - before == 3
    assert len(_callback_threads()) == before


def test_a_bus_starts_callback_threads_only_as_callback_subscriptions_come() -> None:
    before = len(_callback_threads())
    with MemoryBus(callback_threads=4) as bus:
        bus.subscribe("read.by.hand")
        assert len(_callback_threads()) == before
        bus.subscribe("a", callback=lambda delivery: None)
        assert len(_callback_threads()) - before == 1
        bus.subscribe("b", callback=lambda delivery: None)
        assert len(_callback_threads()) - before == 2


@pytest.mark.parametrize("threads", [1, 16, 17, 0])
def test_the_callback_threads_are_bounded(threads: int) -> None:
    if 1 <= threads <= 16:
        MemoryBus(callback_threads=threads).close()
    else:
        with pytest.raises(ValueError, match="between 1 and 16"):
            MemoryBus(callback_threads=threads)


def test_each_subscription_sees_its_deliveries_in_order_one_at_a_time() -> None:
    with MemoryBus(callback_threads=4) as bus:
        seen: dict[int, list[int]] = {s: [] for s in range(20)}
        running: dict[int, int] = dict.fromkeys(seen, 0)
        overlaps: list[int] = []
        lock = threading.Lock()

        def follower(s: int) -> Callable[[Delivery], None]:
            def callback(delivery: Delivery) -> None:
                with lock:
                    running[s] += 1
                    if running[s] > 1:
                        overlaps.append(s)
                seen[s].extend(numbers([delivery]))
                with lock:
                    running[s] -= 1

            return callback

        for s in seen:
            bus.subscribe("t", callback=follower(s))

        def publish(first: int) -> None:
            for n in range(first, first + 500):
                bus.publish("t", BusEvent(n=n))

        publish(0)
        publisher = threading.Thread(target=publish, args=(500,))
        publisher.start()
        publisher.join()
        wait_until(lambda: all(len(got) == 1000 for got in seen.values()), timeout=10)
        assert all(got == list(range(1000)) for got in seen.values())
        assert overlaps == []


def test_a_raising_or_blocked_callback_holds_up_only_its_own_subscription(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with MemoryBus(callback_threads=2) as bus:
        release = threading.Event()
        blocked_on: list[int] = []
        healthy: list[int] = []

        def blocks(delivery: Delivery) -> None:
            blocked_on.extend(numbers([delivery]))
            release.wait(10)

        def raises(delivery: Delivery) -> None:
            raise RuntimeError("callback trouble")

        slow = bus.subscribe("t", callback=blocks)
        broken = bus.subscribe("t", callback=raises)
        bus.subscribe("t", callback=lambda delivery: healthy.extend(numbers([delivery])))
        with caplog.at_level(logging.CRITICAL, logger="corral.bus"):
            for n in range(200):
                bus.publish("t", BusEvent(n=n))
            wait_until(lambda: len(healthy) == 200 and broken.callback_errors == 200, timeout=10)
        assert healthy == list(range(200))
        assert blocked_on == [0]
        release.set()
        wait_until(lambda: len(blocked_on) == 200, timeout=10)
        assert blocked_on == list(range(200))
        assert slow.callback_errors == 0


def test_closing_waits_for_the_running_callback_and_runs_no_more() -> None:
    with MemoryBus() as bus:
        entered = threading.Event()
        release = threading.Event()
        finished: list[int] = []

        def callback(delivery: Delivery) -> None:
            entered.set()
            release.wait(10)
            finished.extend(numbers([delivery]))

        sub = bus.subscribe("t", callback=callback)
        bus.publish("t", BusEvent(n=1))
        bus.publish("t", BusEvent(n=2))
        assert entered.wait(5)
        closer = threading.Thread(target=sub.close)
        closer.start()
        wait_until(lambda: sub.closed)
        assert closer.is_alive()  # waits for the callback in progress
        release.set()
        closer.join(5)
        assert not closer.is_alive()
        assert finished == [1]


# -- the asyncio form -----------------------------------------------------------------------


def test_async_iteration_does_not_block_the_event_loop(bus: MemoryBus) -> None:
    sub = bus.subscribe("t")
    # Should iteration ever block the loop, this unblocks it so that the test fails, not hangs.
    safety = threading.Timer(5, sub.close)
    safety.start()

    async def main() -> list[int]:
        async def publish_later() -> None:
            await asyncio.sleep(0.01)  # runs only if the consumer leaves the loop free
            await asyncio.get_running_loop().run_in_executor(None, publish_three)

        def publish_three() -> None:  # from another thread: wakes the loop thread-safely
            for n in range(3):
                bus.publish("t", BusEvent(n=n))

        producer = asyncio.create_task(publish_later())
        got: list[int] = []
        async with asyncio.timeout(5):
            async for delivery in sub:
                got.extend(numbers([delivery]))
                if len(got) == 3:
                    break
        await producer
        return got

    try:
        assert asyncio.run(main()) == [0, 1, 2]
    finally:
        safety.cancel()


def test_async_iteration_ends_when_the_subscription_closes(bus: MemoryBus) -> None:
    sub = bus.subscribe("t")

    async def main() -> list[int]:
        got: list[int] = []
        threading.Timer(0.01, sub.close).start()
        async with asyncio.timeout(5):
            async for delivery in sub:
                got.extend(numbers([delivery]))
        return got

    assert asyncio.run(main()) == []
    assert sub.closed


# -- closing --------------------------------------------------------------------------------


def test_close_wakes_a_blocked_reader_and_ends_iteration(bus: MemoryBus) -> None:
    sub = bus.subscribe("t")
    assert sub.get(timeout=0.01) is None
    seen: list[int] = []

    def read_all() -> None:
        for delivery in sub:
            seen.extend(numbers([delivery]))

    reader = threading.Thread(target=read_all)
    reader.start()
    bus.publish("t", BusEvent(n=1))
    bus.publish("t", BusEvent(n=2))
    wait_until(lambda: seen == [1, 2])
    sub.close()
    reader.join(timeout=5)
    assert not reader.is_alive()


def test_a_closed_subscription_gets_nothing_and_closing_twice_is_fine(bus: MemoryBus) -> None:
    with bus.subscribe("t") as sub:
        bus.publish("t", BusEvent(n=1))
    assert sub.closed
    assert sub.get(timeout=0) is None  # what was queued goes with it
    sub.close()
    bus.publish("t", BusEvent(n=2))
    stats = bus.stats()
    assert (stats["delivered"], stats["dropped"], stats["subscriptions"]) == (1, 0, 0)


def test_closing_the_bus_closes_its_subscriptions() -> None:
    bus = MemoryBus()
    sub = bus.subscribe("t")
    called = bus.subscribe("u", callback=lambda delivery: None)
    assert bus.healthy
    bus.close()
    bus.close()
    assert sub.closed
    assert called.closed
    assert not bus.healthy
    with pytest.raises(BackendUnavailable):
        bus.publish("t", BusEvent(n=1))
    with pytest.raises(BackendUnavailable):
        bus.subscribe("t")


def test_stats_name_every_counter(bus: MemoryBus) -> None:
    assert set(bus.stats()) >= {"published", "delivered", "dropped", "rejected", "reconnects"}
