"""System: routing by name, asyncio, custom managers, config-driven managers, the run command."""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

import corral
from corral.config import BusSection, Config, Section, SupervisorSection, load_config
from corral.errors import ConfigError, InvalidMessage, ManagerUnavailable, NotFound, Timeout
from corral.messages.base import Event, message
from corral.messages.system import Ping, Pong, SupervisorChildChanged, SystemHealthCheck
from corral.supervisor import ChildSpec
from tests.redis_server import RedisServer
from tests.support import Work, Worker, next_event, read_until, run_corral, start_corral


@corral.message("test.greet")
class Greet(corral.Request["Greeting"]):
    manager = "greeter"
    who: str


@corral.message("test.greeting")
class Greeting(corral.Reply):
    text: str


@message("test.shout")
class Shout(Event):
    text: str


@dataclass(frozen=True, kw_only=True)
class GreeterOptions(Section):
    greeting: str = "hello"
    repeat: int = field(default=1, metadata={"ge": 1})


class Greeter(corral.Manager[GreeterOptions]):
    name = "greeter"

    @corral.handles(Greet)
    def greet(self, msg: Greet) -> Greeting:
        if msg.who == "nobody":
            raise NotFound("no such person", {"who": msg.who})
        return Greeting(text=" ".join([f"{self.options.greeting} {msg.who}"] * self.options.repeat))


def test_typed_manager_options_from_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "corral.toml"
    path.write_text('[managers.greeter]\ngreeting = "hi"\nrepeat = 2\n')
    with corral.System(load_config(path, env={}), managers=[Greeter]) as system:
        assert system.ask(Greet(who="bo")).text == "hi bo hi bo"


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ("repeat = 'x'", "managers.greeter.repeat: expected int, got str"),
        ("repeat = 0", "managers.greeter.repeat: must be >= 1, got 0"),
        (
            "colour = 'red'",
            "managers.greeter.colour: not an option of the greeter manager "
            "(options: greeting, repeat)",
        ),
    ],
)
def test_bad_manager_options_fail_at_construction(tmp_path: Path, table: str, error: str) -> None:
    path = tmp_path / "corral.toml"
    path.write_text(f"[managers.greeter]\n{table}\n")
    with pytest.raises(ConfigError) as caught:
        corral.System(load_config(path, env={}), managers=[Greeter])
    assert str(caught.value) == f"file {path}: {error}"


def test_the_readme_example_runs() -> None:
    with corral.System(managers=[Greeter]) as system:
        assert system.ask(Greet(who="ada")) == Greeting(text="hello ada")
        with pytest.raises(NotFound, match="no such person") as caught:
            system.ask(Greet(who="nobody"))
        assert caught.value.details == {"who": "nobody"}
        assert system.ask(Ping(payload=b"hi")) == Pong(payload=b"hi")


def test_in_process_messages_are_validated_before_a_manager_sees_them() -> None:
    with corral.System(managers=[Greeter]) as system:
        with pytest.raises(InvalidMessage, match="who: expected str, got int"):
            system.ask(Greet(who=42))  # type: ignore[arg-type]
        with pytest.raises(InvalidMessage, match="text: expected str, got bytes"):
            system.publish("shouts", Shout(text=b"loud"))  # type: ignore[arg-type]
        health = system.health().managers["greeter"].health
        assert health is not None
        assert health.metrics["handled"] == 0


def test_unknown_manager_and_unhandled_message_get_clear_errors() -> None:
    with corral.System() as system:
        with pytest.raises(
            ManagerUnavailable, match=r"no manager named 'greeter' \(managers: system\)"
        ):
            system.ask(Greet(who="ada"))
        with pytest.raises(InvalidMessage, match=r"manager 'system' does not handle test\.work"):
            system.ask(Work(target="system"))


def test_ask_times_out_cleanly() -> None:
    with corral.System(managers=[ChildSpec(name="worker", manager=Worker)]) as system:
        with pytest.raises(Timeout, match=r"no reply to test\.work from 'worker' within 0\.2s"):
            system.ask(Work(action="sleep", seconds=1.0), timeout=0.2)
        assert system.ask(Work()).name == "worker"  # the actor is still serving


def test_ask_async_does_not_block_the_event_loop() -> None:
    async def scenario(system: corral.System) -> tuple[int, list[Pong]]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        slow = system.ask_async(Work(action="sleep", seconds=0.3))
        pings = [system.ask_async(Ping(payload=bytes([i]))) for i in range(20)]
        results = await asyncio.gather(slow, *pings)
        stop.set()
        await task
        return ticks, results[1:]  # type: ignore[return-value]

    with corral.System(managers=[ChildSpec(name="worker", manager=Worker)]) as system:
        ticks, pongs = asyncio.run(scenario(system))
    assert [p.payload for p in pongs] == [bytes([i]) for i in range(20)]
    assert ticks >= 10  # the loop kept running for the 0.3 s the worker slept


def test_ask_async_raises_the_managers_error_and_times_out() -> None:
    async def scenario(system: corral.System) -> None:
        with pytest.raises(NotFound):
            await system.ask_async(Greet(who="nobody"))
        with pytest.raises(Timeout):
            await system.ask_async(Work(action="sleep", seconds=1.0), timeout=0.1)

    managers: list[type[corral.Manager[Any]] | ChildSpec] = [
        Greeter,
        ChildSpec(name="worker", manager=Worker),
    ]
    with corral.System(managers=managers) as system:
        asyncio.run(scenario(system))


def test_system_health_is_a_message_too() -> None:
    with corral.System(managers=[Greeter]) as system:
        health = system.ask(SystemHealthCheck())
        assert health.status == "healthy"
        assert set(health.managers) == {"system", "greeter"}


def test_managers_from_config_by_class_path(tmp_path: Path) -> None:
    path = tmp_path / "corral.toml"
    path.write_text(
        '[managers.worker]\nclass_path = "tests.support:Worker"\ncritical = true\n'
        'depends_on = ["system"]\n'
    )
    with corral.System(load_config(path, env={})) as system:
        assert system.ask(Work()).name == "worker"
        assert system.supervisor.names == ["system", "worker"]
        assert system.health().managers["worker"].critical


@pytest.mark.parametrize(
    ("table", "error"),
    [
        (
            "[managers.mystery]\ncritical = true\n",
            "managers.mystery: unknown manager; set class_path",
        ),
        (
            '[managers.x]\nclass_path = "tests.support:Nope"\n',
            "managers.x.class_path: cannot load 'tests.support:Nope'",
        ),
        (
            '[managers.x]\nclass_path = "tests.support:Work"\n',
            "managers.x.class_path: 'tests.support:Work' is not a corral Manager",
        ),
        (
            '[managers.x]\nclass_path = "tests.support:Worker"\ndepends_on = ["db"]\n',
            "managers.x.depends_on: no manager named 'db'",
        ),
    ],
)
def test_bad_manager_config_is_a_clear_error(tmp_path: Path, table: str, error: str) -> None:
    path = tmp_path / "corral.toml"
    path.write_text(table)
    with pytest.raises(ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
        corral.System(load_config(path, env={}))


def test_lifecycle_events_cross_processes_over_redis(redis_server: RedisServer) -> None:
    config = Config().replace(
        bus=BusSection(backend="redis", url=redis_server.url, namespace="t"),
        supervisor=SupervisorSection(backoff_initial=0.01, backoff_jitter=0.0),
    )
    watcher = corral.System(config).start()
    try:
        events = watcher.subscribe("supervisor.child.*")
        with corral.System(config, managers=[ChildSpec(name="worker", manager=Worker)]) as other:
            other.tell(Work(action="crash"))
            topic, event = next_event(events, SupervisorChildChanged)
            while event.change != "failed":
                topic, event = next_event(events, SupervisorChildChanged)
            assert topic == "supervisor.child.failed"
            assert event.child == "worker"
            assert "RuntimeError: boom" in event.reason
    finally:
        watcher.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_starts_the_supervisor_and_stops_cleanly_on_a_signal(signum: int) -> None:
    process = start_corral("run")
    try:
        started = read_until(process, "running 1 managers")
        assert "system" in started
        process.send_signal(signum)
        assert process.wait(timeout=20) == 0
        assert process.stderr is not None
        rest = process.stderr.read()
        assert "manager system stopped" in rest
        assert "stopped cleanly" in rest
    finally:
        process.kill()
        process.wait()


def test_run_logs_json_lines() -> None:
    process = start_corral("run", "--log-format", "json")
    try:
        line = read_until(process, "running 1 managers").splitlines()[-1]
        record = json.loads(line)
        assert record["level"] == "info"
        assert record["logger"] == "corral"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
        process.wait()


def test_run_exits_nonzero_when_the_supervisor_gives_up(tmp_path: Path) -> None:
    config = tmp_path / "corral.toml"
    config.write_text(
        "[supervisor]\nmax_restarts = 2\nperiod = 60\nbackoff_initial = 0.01\n"
        '[managers.worker]\nclass_path = "tests.support:Worker"\ncritical = true\n'
        "fail_starts = { worker = 100 }\n"
    )
    process = start_corral("run", "-c", str(config))
    try:
        assert process.wait(timeout=30) == 1
        assert process.stderr is not None
        log = process.stderr.read()
        assert "supervisor gives up: 3 restarts within 60s (max 2)" in log
        assert "worker refuses to start" in log
    finally:
        process.kill()
        process.wait()


def test_run_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "corral.toml"
    config.write_text("[supervisor]\nmax_restarts = 'many'\n")
    process = start_corral("run", "-c", str(config))
    assert process.wait(timeout=20) == 2
    assert process.stderr is not None
    assert "supervisor.max_restarts: expected int, got str" in process.stderr.read()


def test_messages_command_lists_the_registry() -> None:
    result = run_corral("messages")
    assert result.returncode == 0, result.stderr
    assert "system.ping v1 (request -> system)" in result.stdout
    assert "    payload: bytes (optional)" in result.stdout


def test_config_from_the_environment_reaches_the_system() -> None:
    system = corral.System(load_config(env={"CORRAL_SYSTEM_ASK_TIMEOUT": "0.25"}))
    assert system.ask_timeout == 0.25


def test_a_childs_health_reads_in_the_design_documents_shape() -> None:
    with corral.System(Config()) as system:
        system.ask(Ping(payload=b"x"))
        child = system.health().managers["system"]
        assert child.health is not None
        assert child.metrics == child.health.metrics and child.metrics["handled"] >= 1
        assert child.details == child.health.details
        assert child.dependencies == child.health.dependencies
        unprobed = msgspec.structs.replace(child, health=None)
        assert (unprobed.metrics, unprobed.details, unprobed.dependencies) == ({}, {}, {})
