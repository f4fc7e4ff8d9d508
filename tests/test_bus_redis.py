"""RedisBus against a real redis-server: delivery, subscriptions, reconnection, rejection."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import redis

from corral.bus import Delivery, RedisBus, Subscription
from corral.errors import BackendUnavailable
from corral.messages.base import Event, message
from corral.messages.codec import Codec
from tests.redis_server import RedisServer
from tests.support import wait_until


@message("test.bus_event")
class BusEvent(Event):
    n: int
    text: str = ""


MakeBus = Callable[..., RedisBus]


def fast_bus(url: str, *, health_check_interval: float = 5.0, **options: Any) -> RedisBus:
    """A RedisBus that retries every few tens of milliseconds."""
    return RedisBus(
        url,
        reconnect_initial=0.02,
        reconnect_max=0.1,
        health_check_interval=health_check_interval,
        **options,
    )


@pytest.fixture
def make_bus(redis_server: RedisServer) -> Iterator[MakeBus]:
    """Build RedisBuses (on the shared server unless given a URL), closed after the test."""
    buses: list[RedisBus] = []

    def make(url: str | None = None, **options: Any) -> RedisBus:
        bus = fast_bus(url or redis_server.url, **options)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        bus.close()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_server.url, protocol=2) as client:
        yield client


def numbers(deliveries: Iterable[Delivery | None]) -> list[int]:
    out = []
    for delivery in deliveries:
        assert delivery is not None
        assert isinstance(delivery.message, BusEvent)
        out.append(delivery.message.n)
    return out


def next_n(sub: Subscription, count: int = 1) -> list[int]:
    """The next ``count`` deliveries' numbers, waiting up to 5 s for each."""
    return numbers(sub.get(timeout=5) for _ in range(count))


def assert_delivers(publisher: RedisBus, sub: Subscription, topic: str, n: int) -> None:
    publisher.publish(topic, BusEvent(n=n))
    assert next_n(sub) == [n]


# -- delivery and subscriptions ---------------------------------------------------------------


def test_exact_and_pattern_delivery_between_buses(make_bus: MakeBus) -> None:
    receiver, sender = make_bus(), make_bus()
    exact = receiver.subscribe("state.changed.user.42")
    users = receiver.subscribe("state.changed.user.*")

    sender.publish("state.changed.order.1", BusEvent(n=0))
    sender.publish("state.changed.user.42", BusEvent(n=1, text="hi"))

    expected = Delivery("state.changed.user.42", BusEvent(n=1, text="hi"))
    assert exact.get(timeout=5) == expected
    assert users.get(timeout=5) == expected
    assert receiver.stats()["delivered"] == 2
    assert sender.stats()["published"] == 2


def test_exact_topics_use_subscribe_and_share_one_redis_subscription(
    fresh_redis_server: RedisServer,
) -> None:
    topic, channel = "state.changed.user.42", b"corral:state.changed.user.42"
    with (
        RedisBus(fresh_redis_server.url) as bus,
        redis.Redis.from_url(fresh_redis_server.url, protocol=2) as client,
    ):
        first, second = bus.subscribe(topic), bus.subscribe(topic)
        assert client.pubsub_numpat() == 0
        assert client.pubsub_channels("corral:*") == [channel]
        assert client.pubsub_numsub(channel) == [(channel, 1)]

        bus.publish(topic, BusEvent(n=1))
        assert next_n(first) + next_n(second) == [1, 1]

        first.close()
        assert_delivers(bus, second, topic, 2)
        assert client.pubsub_numsub(channel) == [(channel, 1)]
        second.close()
        wait_until(lambda: client.pubsub_numsub(channel) == [(channel, 0)])

        pattern = bus.subscribe("state.changed.*")
        assert client.pubsub_numpat() == 1
        pattern.close()
        wait_until(lambda: client.pubsub_numpat() == 0)


def test_a_full_queue_drops_and_counts(make_bus: MakeBus) -> None:
    receiver, sender = make_bus(), make_bus()
    sub = receiver.subscribe("flood", queue_size=3)
    for n in range(10):
        sender.publish("flood", BusEvent(n=n))

    wait_until(lambda: receiver.stats()["delivered"] + receiver.stats()["dropped"] == 10)
    assert sub.dropped == 7
    assert receiver.stats()["dropped"] == 7
    assert next_n(sub, 3) == [0, 1, 2]


def test_callback_and_asyncio_forms(make_bus: MakeBus) -> None:
    receiver, sender = make_bus(), make_bus()
    seen: list[int] = []
    receiver.subscribe("health.changed", callback=lambda d: seen.extend(numbers([d])))
    sub = receiver.subscribe("health.*")

    async def consume() -> list[int]:
        got: list[int] = []
        async with asyncio.timeout(5):
            async for delivery in sub:
                got.extend(numbers([delivery]))
                if len(got) == 2:
                    return got
        raise AssertionError("the subscription closed early")

    def publish_two() -> None:  # from another thread, while the loop waits
        for n in (1, 2):
            sender.publish("health.changed", BusEvent(n=n))

    threading.Timer(0.01, publish_two).start()
    assert asyncio.run(consume()) == [1, 2]
    wait_until(lambda: seen == [1, 2])


# -- forged and broken messages -------------------------------------------------------------


def test_forged_messages_are_rejected_when_the_codec_has_keys(
    make_bus: MakeBus, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    key = [b"the key"]
    receiver, sender = make_bus(codec=Codec(keys=key)), make_bus(codec=Codec(keys=key))
    sub = receiver.subscribe("health.changed")
    channel = "corral:health.changed"

    with caplog.at_level(logging.WARNING, logger="corral.bus"):
        client.publish(channel, Codec(keys=[b"a wrong key"]).encode(BusEvent(n=1)))
        client.publish(channel, Codec().encode(BusEvent(n=2)))  # unsigned
        client.publish(channel, b"\x93garbage")
        sender.publish("health.changed", BusEvent(n=3))
        assert next_n(sub) == [3]

    assert receiver.stats()["rejected"] == 3
    assert sub.dropped == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per kind of junk; the rest within 10 s are counted only
    assert "corral:health.changed" in warnings[0]
    assert "signature does not match" in warnings[0]


def test_garbage_is_rejected_without_keys_and_valid_messages_pass(
    make_bus: MakeBus, client: redis.Redis
) -> None:
    receiver = make_bus()
    sub = receiver.subscribe("health.changed")
    client.publish("corral:health.changed", b"not msgpack at all \xc1")
    client.publish("corral:health.changed", Codec().encode(BusEvent(n=1)))
    assert next_n(sub) == [1]
    assert receiver.stats()["rejected"] == 1
    assert receiver.healthy


# -- outages ----------------------------------------------------------------------------------


def test_resubscribes_after_redis_restarts(fresh_redis_server: RedisServer) -> None:
    with fast_bus(fresh_redis_server.url) as bus:
        exact = bus.subscribe("health.changed")
        pattern = bus.subscribe("state.changed.*")
        assert bus.healthy

        fresh_redis_server.restart()

        wait_until(lambda: bus.healthy and bus.stats()["reconnects"] == 1)
        assert_delivers(bus, exact, "health.changed", 1)
        assert_delivers(bus, pattern, "state.changed.user.1", 2)


def test_reconnects_after_its_connection_is_killed(make_bus: MakeBus, client: redis.Redis) -> None:
    bus = make_bus()
    sub = bus.subscribe("health.changed")
    assert client.client_kill_filter(_type="pubsub") >= 1

    wait_until(lambda: bus.healthy and bus.stats()["reconnects"] == 1)
    assert_delivers(bus, sub, "health.changed", 1)


def test_publish_raises_backend_unavailable_while_redis_is_down(
    fresh_redis_server: RedisServer,
) -> None:
    with fast_bus(fresh_redis_server.url) as bus:
        sub = bus.subscribe("health.changed")
        fresh_redis_server.kill()
        wait_until(lambda: not bus.healthy)

        with pytest.raises(BackendUnavailable, match="unavailable") as raised:
            bus.publish("health.changed", BusEvent(n=1))
        assert isinstance(raised.value.__cause__, redis.RedisError)
        late = bus.subscribe("state.changed.*")  # recorded now, subscribed on reconnection

        fresh_redis_server.start()
        wait_until(lambda: bus.healthy)
        assert_delivers(bus, sub, "health.changed", 2)
        assert_delivers(bus, late, "state.changed.user.1", 3)
        assert bus.stats()["reconnects"] == 1


def test_a_bus_made_while_redis_is_down_connects_later(fresh_redis_server: RedisServer) -> None:
    fresh_redis_server.kill()
    with fast_bus(fresh_redis_server.url) as bus:
        assert not bus.healthy
        sub = bus.subscribe("health.changed")

        fresh_redis_server.start()

        wait_until(lambda: bus.healthy)
        assert_delivers(bus, sub, "health.changed", 1)
        assert bus.stats()["reconnects"] == 0


def test_a_silent_connection_is_noticed(fresh_redis_server: RedisServer) -> None:
    with fast_bus(fresh_redis_server.url, health_check_interval=0.2) as bus:
        sub = bus.subscribe("health.changed")
        fresh_redis_server.pause()  # the socket stays open, nothing answers
        try:
            wait_until(lambda: not bus.healthy)
        finally:
            fresh_redis_server.resume()

        wait_until(lambda: bus.healthy, timeout=10)
        assert bus.stats()["reconnects"] >= 1
        assert_delivers(bus, sub, "health.changed", 1)


# -- closing ----------------------------------------------------------------------------------


def readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("corral-bus-reader")]


def test_close_releases_the_reader_and_the_connections(fresh_redis_server: RedisServer) -> None:
    before = len(readers())
    with redis.Redis.from_url(fresh_redis_server.url, protocol=2) as client:
        bus = RedisBus(fresh_redis_server.url)
        sub = bus.subscribe("health.changed")
        bus.publish("health.changed", BusEvent(n=1))
        assert len(readers()) == before + 1

        bus.close()
        bus.close()

        assert sub.closed
        assert not bus.healthy
        assert len(readers()) == before
        wait_until(lambda: client.client_list(_type="pubsub") == [])
        with pytest.raises(BackendUnavailable):
            bus.publish("health.changed", BusEvent(n=2))


def test_a_thousand_callback_subscriptions_run_on_the_bus_callback_threads(
    make_bus: MakeBus,
) -> None:
    def callback_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("corral-bus-callback")]

    before = len(callback_threads())
    bus = make_bus(callback_threads=2)
    publisher = make_bus()
    seen: dict[int, list[int]] = {n: [] for n in range(1000)}

    def follow(n: int) -> Callable[[Delivery], None]:
        def callback(delivery: Delivery) -> None:
            assert isinstance(delivery.message, BusEvent)
            seen[n].append(delivery.message.n)

        return callback

    for n in seen:
        bus.subscribe(f"t.{n}", callback=follow(n))
    assert len(callback_threads()) - before == 2
    for round_ in range(3):
        for n in seen:
            publisher.publish(f"t.{n}", BusEvent(n=round_))
    wait_until(lambda: all(len(got) == 3 for got in seen.values()), timeout=10)
    assert all(got == [0, 1, 2] for got in seen.values())
    bus.close()
    assert len(callback_threads()) == before


def test_stats_name_every_counter(make_bus: MakeBus) -> None:
    stats = make_bus().stats()
    assert set(stats) >= {"published", "delivered", "dropped", "rejected", "reconnects"}
    assert all(value == 0 for name, value in stats.items() if name != "subscriptions")
