"""Durable subscriptions over the state manager's event stream: resume from an offset,
gap notices for trimmed history and a changed epoch, topic filtering."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from corral.actors.state import StateManager
from corral.config import Config
from corral.messages.state import StateChanged, StateRegister, StateUpdate
from corral.messages.stream import StreamGap
from corral.streams import DurableSubscription, events_stream_key
from corral.supervisor import ChildSpec
from corral.system import System
from tests.redis_server import ClusterGroup, RedisServer

STREAM = events_stream_key("corral", 0)


def state_system(url: str, **options: object) -> System:
    # One partition, so one stream: these tests are about reading it.
    options = {"backend": "redis", "partitions": 1, **options}
    spec = ChildSpec(name="state", manager=StateManager, options=options, redis_url=url)
    return System(Config(), managers=[spec]).start()


@pytest.fixture
def system(redis_server: RedisServer) -> Iterator[System]:
    system = state_system(redis_server.url)
    yield system
    system.stop()


def changes(system: System, state_id: str, count: int, state_type: str = "User") -> None:
    system.ask(StateRegister(state_id=state_id, state_type=state_type, data={"n": 0}))
    for n in range(1, count):
        system.ask(StateUpdate(state_id=state_id, data={"n": n}))


def take(sub: DurableSubscription, count: int) -> list[Any]:
    """The next ``count`` messages: StateChanged events and StreamGap notices."""
    taken: list[Any] = []
    for _ in range(count):
        delivery = sub.get(timeout=5)
        assert delivery is not None, f"only {len(taken)} of {count} deliveries"
        assert isinstance(delivery.message, StateChanged | StreamGap)
        taken.append(delivery.message)
    return taken


def test_a_subscriber_that_missed_1000_events_gets_them_all_in_order(
    system: System, redis_server: RedisServer
) -> None:
    changes(system, "u1", 10)
    with DurableSubscription(redis_server.url, stream=STREAM, pattern="state.changed.*") as sub:
        seen = take(sub, 10)
    resume_at, epoch = sub.offset, sub.epoch
    assert resume_at == 10 and [e.offset for e in seen] == list(range(1, 11))

    for n in range(1000):  # while it is away
        system.ask(StateUpdate(state_id="u1", data={"n": 100 + n}))
    with DurableSubscription(
        redis_server.url, stream=STREAM, pattern="state.changed.*", from_offset=resume_at,
        epoch=epoch,
    ) as sub:  # fmt: skip
        missed = take(sub, 1000)
        system.ask(StateUpdate(state_id="u1", data={"n": "live"}))
        (live,) = take(sub, 1)
        assert sub.get(timeout=0.1) is None  # no duplicates
    assert [e.offset for e in missed] == list(range(11, 1011))
    assert [e.new for e in missed if isinstance(e, StateChanged)] == [
        {"n": 100 + n} for n in range(1000)]  # fmt: skip
    assert isinstance(live, StateChanged) and (live.offset, live.new) == (1011, {"n": "live"})


def test_trimmed_history_yields_a_gap_notice_then_what_is_left(redis_server: RedisServer) -> None:
    system = state_system(redis_server.url, stream_max_len=10)
    try:
        changes(system, "u1", 50)
        with DurableSubscription(redis_server.url, stream=STREAM, from_offset=5) as sub:
            gap, *rest = take(sub, 11)
    finally:
        system.stop()
    assert isinstance(gap, StreamGap)
    assert (gap.reason, gap.first_missing, gap.last_missing) == ("trimmed", 6, 40)
    assert [e.offset for e in rest] == list(range(41, 51))


def test_a_changed_epoch_yields_a_gap_notice_and_starts_over(
    system: System, redis_server: RedisServer
) -> None:
    changes(system, "u1", 3)
    with DurableSubscription(redis_server.url, stream=STREAM, from_offset=3) as sub:
        assert sub.get(timeout=0.2) is None
        old_epoch = sub.epoch
        with redis.Redis.from_url(redis_server.url) as client:
            client.flushall()  # the stream's life ends: Redis lost everything
        changes(system, "u1", 2)
        gap, first, second = take(sub, 3)
    assert isinstance(gap, StreamGap) and gap.reason == "epoch_changed"
    assert (gap.first_missing, gap.last_missing, gap.previous_epoch) == (4, -1, old_epoch)
    assert gap.epoch != old_epoch
    assert [e.offset for e in (first, second)] == [1, 2]


def test_a_new_epoch_written_past_the_readers_offset_is_not_taken_for_the_old_one(
    system: System, redis_server: RedisServer
) -> None:
    changes(system, "u1", 3)
    with DurableSubscription(redis_server.url, stream=STREAM) as sub:
        old = take(sub, 3)
        with redis.Redis.from_url(redis_server.url) as client:
            client.delete(f"{STREAM}:meta")  # evicted while the stream stayed
        changes(system, "u2", 5)  # the new epoch's offsets 4 and 5 follow the reader's 3
        gap, *new = take(sub, 6)
        assert sub.get(timeout=0.1) is None
    assert isinstance(gap, StreamGap) and gap.reason == "epoch_changed"
    assert gap.previous_epoch == old[0].epoch
    assert [(e.state_id, e.offset) for e in new] == [("u2", n) for n in range(1, 6)]
    assert {e.epoch for e in new} != {old[0].epoch}


def test_an_unknown_epoch_is_a_gap_from_the_start(
    system: System, redis_server: RedisServer
) -> None:
    changes(system, "u1", 2)
    with DurableSubscription(
        redis_server.url, stream=STREAM, from_offset=7, epoch="elsewhere"
    ) as sub:
        gap, *events = take(sub, 3)
    assert isinstance(gap, StreamGap) and gap.previous_epoch == "elsewhere"
    assert [e.offset for e in events] == [1, 2]


def test_only_matching_topics_are_delivered(system: System, redis_server: RedisServer) -> None:
    changes(system, "u1", 3)
    changes(system, "s1", 2, state_type="Session")
    with DurableSubscription(
        redis_server.url, stream=STREAM, pattern="state.changed.Session.*"
    ) as sub:
        events = take(sub, 2)
        assert sub.get(timeout=0.1) is None
    assert [(e.state_id, e.offset) for e in events if isinstance(e, StateChanged)] == [
        ("s1", 4), ("s1", 5)]  # fmt: skip


def test_the_subscription_waits_out_a_redis_restart(fresh_redis_server: RedisServer) -> None:
    server = fresh_redis_server
    server.stop()
    server.args = ("--appendonly", "yes", "--appendfsync", "always")
    server.start()
    system = state_system(server.url)
    try:
        changes(system, "u1", 2)
        with DurableSubscription(server.url, stream=STREAM, block_seconds=0.2) as sub:
            take(sub, 2)
            server.restart()
            system.ask(StateUpdate(state_id="u1", data={"n": "after"}))
            (event,) = take(sub, 1)
    finally:
        system.stop()
    assert isinstance(event, StateChanged) and event.offset == 3


# -- an offset past the end: a gap, never silence (Kafka's OffsetOutOfRange) ---------------


class Topology:
    """A real Redis, standalone or cluster, that a test can empty as a lost Redis would be."""

    def __init__(self, url: str, flushall: Callable[[], object]) -> None:
        self.url = url
        self.flushall = flushall


@pytest.fixture(params=["standalone", "cluster"])
def topology(request: pytest.FixtureRequest) -> Topology:
    if request.param == "cluster":
        cluster: ClusterGroup = request.getfixturevalue("redis_cluster")
        return Topology(cluster.node_url(1), cluster.flushall)
    server: RedisServer = request.getfixturevalue("redis_server")

    def flushall() -> None:
        with redis.Redis.from_url(server.url) as client:
            client.flushall()

    return Topology(server.url, flushall)


@pytest.mark.parametrize("written_since", [0, 3])
def test_resuming_without_epoch_after_a_reset_yields_a_gap_then_all_new_events(
    topology: Topology, written_since: int
) -> None:
    system = state_system(topology.url)
    try:
        changes(system, "u1", 5)
        with DurableSubscription(topology.url, stream=STREAM) as sub:
            take(sub, 5)
        resume_at = sub.offset  # and no epoch: the shape most code keeps
        topology.flushall()  # Redis lost everything
        if written_since:
            changes(system, "u2", written_since)
        with DurableSubscription(topology.url, stream=STREAM, from_offset=resume_at) as sub:
            gap, *before = take(sub, 1 + written_since)
            changes(system, "u3", 100)
            after = take(sub, 100)
            assert sub.get(timeout=0.2) is None
    finally:
        system.stop()
    assert isinstance(gap, StreamGap)
    assert (gap.reason, gap.first_missing, gap.last_missing) == ("offset_out_of_range", 6, -1)
    assert [e.offset for e in [*before, *after]] == list(range(1, 101 + written_since))
    assert {e.state_id for e in after} == {"u3"}


def test_an_offset_past_the_end_of_its_epoch_yields_a_gap_then_every_new_event(
    topology: Topology,
) -> None:
    system = state_system(topology.url)
    try:
        changes(system, "u1", 3)
        with DurableSubscription(topology.url, stream=STREAM) as sub:
            take(sub, 3)
        epoch = sub.epoch
        # Ahead of the stream: it lost its latest entries (a failover to a lagging
        # replica), or the offset was never right. The next writes take offsets 4 and 5.
        with DurableSubscription(topology.url, stream=STREAM, from_offset=10, epoch=epoch) as sub:
            (gap,) = take(sub, 1)
            changes(system, "u2", 2)
            new = take(sub, 2)
            assert sub.get(timeout=0.2) is None
    finally:
        system.stop()
    assert isinstance(gap, StreamGap)
    assert (gap.reason, gap.first_missing, gap.epoch, gap.previous_epoch) == (
        "offset_out_of_range", 11, epoch, epoch,
    )  # fmt: skip
    assert [(e.state_id, e.offset) for e in new] == [("u2", 4), ("u2", 5)]
