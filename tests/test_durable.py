"""Durable state-change events through System.subscribe, connect().subscribe and corral events."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import pytest
import redis

import corral
from corral.config import BusSection, Config, DaemonSection, ManagerSection
from corral.daemon import Daemon
from corral.errors import ConfigError, InvalidMessage, NotFound
from corral.messages.state import StateChanged, StateGet, StateRegister, StateUpdate
from corral.messages.stream import StreamGap
from corral.streams import events_stream_key
from tests.redis_server import RedisServer
from tests.support import next_event, start_corral


def config(url: str) -> Config:
    return Config().replace(
        bus=BusSection(backend="redis", url=url, namespace="dur"),
        daemon=DaemonSection(port=0, heartbeat_interval=0.2),
        # One partition: these tests resume from a plain offset and epoch.
        managers={"state": ManagerSection(options={"partitions": 1})},
    )


@pytest.fixture
def daemon(redis_server: RedisServer) -> Iterator[Daemon]:
    with Daemon(config(redis_server.url)) as running:
        yield running


def test_system_subscribe_from_an_offset_replays_then_follows(daemon: Daemon) -> None:
    system = daemon.system
    for n in range(5):
        system.ask(StateRegister(state_id=f"u{n}", state_type="User", data={"n": n}))
    with system.subscribe("state.changed.User.*", from_offset=2) as replay:
        offsets = [next_event(replay, StateChanged)[1].offset for _ in range(3)]
        assert offsets == [3, 4, 5]
        system.ask(StateUpdate(state_id="u0", data={"n": 10}))
        topic, live = next_event(replay, StateChanged)
        assert (topic, live.offset, live.transition) == ("state.changed.User.u0", 6, "update")


def test_remote_subscribe_from_an_offset(daemon: Daemon, redis_server: RedisServer) -> None:
    daemon.system.ask(StateRegister(state_id="s1", state_type="Session"))
    with corral.connect(redis_server.url, namespace="dur") as remote:
        remote.ask(StateUpdate(state_id="s1", data={"seen": True}))
        with remote.subscribe("state.changed.*", from_offset=0) as replay:
            first = next_event(replay, StateChanged)[1]
            second = next_event(replay, StateChanged)[1]
        assert [(first.transition, first.offset), (second.transition, second.offset)] == [
            ("create", 1),
            ("update", 2),
        ]


def test_an_unknown_epoch_gets_a_gap_notice(daemon: Daemon) -> None:
    daemon.system.ask(StateRegister(state_id="r1", state_type="Resource"))
    with daemon.system.subscribe("state.changed.*", from_offset=1, epoch="not-this-one") as sub:
        topic, gap = next_event(sub, StreamGap)
        assert topic == "stream.gap"
        assert gap.reason == "epoch_changed"


def test_offsets_need_the_bus_on_redis() -> None:
    with (
        corral.System() as system,
        pytest.raises(ConfigError, match="replays a stream kept in Redis"),
    ):
        system.subscribe("state.changed.*", from_offset=0)


def test_events_command_from_an_offset(daemon: Daemon, redis_server: RedisServer) -> None:
    for n in range(3):
        daemon.system.ask(StateRegister(state_id=f"f{n}", state_type="Feature"))
    process = start_corral(
        "events", "state.changed.*", "--from-offset", "1", "--json",
        "--url", redis_server.url, "-c", os.devnull,
        env={"CORRAL_BUS_NAMESPACE": "dur"},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        lines = [json.loads(process.stdout.readline()) for _ in range(2)]
        assert [line["fields"]["offset"] for line in lines] == [2, 3]
        assert lines[0]["topic"] == "state.changed.Feature.f1"
    finally:
        process.kill()
        process.wait()


def test_events_command_resumes_every_partition_from_the_cursor_it_printed(
    redis_server: RedisServer,
) -> None:
    partitioned = config(redis_server.url).replace(managers={"state": ManagerSection()})
    command = ("events", "state.changed.*", "--json", "--url", redis_server.url,
               "-c", os.devnull)  # fmt: skip
    env = {"CORRAL_BUS_NAMESPACE": "dur"}

    def follow(start: str, count: int) -> tuple[set[str], str]:
        process = start_corral(*command, "--from-offset", start, env=env)
        try:
            assert process.stdout is not None and process.stderr is not None
            seen = {
                json.loads(process.stdout.readline())["fields"]["state_id"] for _ in range(count)
            }
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=20)
        finally:
            process.kill()
        assert process.returncode == 0, err
        return seen, err.rpartition("resume with --from-offset ")[2].strip()

    with Daemon(partitioned) as daemon:
        for n in range(20):
            daemon.system.ask(StateRegister(state_id=f"p{n}", state_type="Part"))
        first, cursor = follow("0", 20)
        assert first == {f"p{n}" for n in range(20)}
        assert len(cursor.split(",")) == 16
        for n in range(20, 25):
            daemon.system.ask(StateRegister(state_id=f"p{n}", state_type="Part"))
        later, _ = follow(cursor, 5)
    assert later == {f"p{n}" for n in range(20, 25)}


def test_a_lost_stream_is_a_gap_not_silence(daemon: Daemon) -> None:
    # The subscriber knew epoch "before-restart"; Redis came back empty (no stream at all).
    with daemon.system.subscribe("state.changed.*", from_offset=3, epoch="before-restart") as sub:
        topic, gap = next_event(sub, StreamGap)
        assert (topic, gap.reason, gap.previous_epoch) == (
            "stream.gap",
            "epoch_changed",
            "before-restart",
        )
        for n in range(3):
            daemon.system.ask(StateRegister(state_id=f"n{n}", state_type="User"))
        offsets = [next_event(sub, StateChanged)[1].offset for _ in range(3)]
        assert offsets == [1, 2, 3]  # every event of the new epoch, once each


def test_a_lost_stream_resumed_without_epoch_is_a_gap_not_silence(daemon: Daemon) -> None:
    # The subscriber kept only its offset; Redis came back empty.
    with daemon.system.subscribe("state.changed.*", from_offset=100) as sub:
        topic, gap = next_event(sub, StreamGap)
        assert (topic, gap.reason, gap.first_missing) == ("stream.gap", "offset_out_of_range", 101)
        for n in range(3):
            daemon.system.ask(StateRegister(state_id=f"n{n}", state_type="User"))
        offsets = [next_event(sub, StateChanged)[1].offset for _ in range(3)]
        assert offsets == [1, 2, 3]


@pytest.mark.parametrize(
    ("write", "error"),
    [
        (
            StateRegister(state_id="t", state_type="Session", ttl=float("inf")),
            "ttl: must be > 0 and <= 315360000 s",
        ),
        (
            StateRegister(state_id="t", state_type="Session", ttl=1e12),
            "ttl: must be > 0 and <= 315360000 s",
        ),
        (StateRegister(state_id="t", state_type="Session", data={"n": 2**64}), "cannot be stored"),
    ],
)
def test_values_that_cannot_be_stored_change_nothing(
    daemon: Daemon, write: StateRegister, error: str
) -> None:
    with pytest.raises(InvalidMessage, match=error):
        daemon.system.ask(write)
    with pytest.raises(NotFound):
        daemon.system.ask(StateGet(state_id="t"))
    assert daemon.system.health().managers["state"].restarts == 0


def test_a_lost_epoch_starts_a_new_stream(daemon: Daemon, redis_server: RedisServer) -> None:
    system = daemon.system
    first = system.ask(StateRegister(state_id="m1", state_type="User"))
    with redis.Redis.from_url(redis_server.url) as raw:
        stream = events_stream_key("dur", 0)
        old_epoch = raw.hget(f"{stream}:meta", "epoch")
        raw.delete(f"{stream}:meta")  # evicted, say, while the stream stayed
        with system.subscribe("state.changed.*", from_offset=0) as sub:
            system.ask(StateRegister(state_id="m2", state_type="User"))  # no failure
            _, event = next_event(sub, StateChanged)
        assert (event.state_id, event.offset) == ("m2", 1)
        assert event.epoch.encode() != old_epoch
        assert raw.xlen(stream) == 1  # the old epoch's entries went with it
    assert first.version == 1
