"""Small helpers shared by the tests: waiting for a condition, test managers and messages."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from corral.bus import Subscription
from corral.errors import NotFound
from corral.manager import Manager, handles
from corral.messages.base import Message, Reply, Request, message
from corral.messages.system import Health
from corral.system import System

E = TypeVar("E", bound=Message)


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""A /metrics page: (sample name, its labels) -> value."""


def scrape(url: str) -> Samples:
    """``GET <url>/metrics``, parsed::

    scrape(url)[metric("corral_manager_up", manager="cache")]   # 1.0
    """
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    """The key of one sample in :func:`scrape`'s answer."""
    return name, frozenset(labels.items())


def corral_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "corral.cli", *args]


def _environment(env: dict[str, str] | None) -> dict[str, str]:
    # Port 0 unless a config file says otherwise: tests never fight over 8650.
    return {**os.environ, "CORRAL_DAEMON_PORT": "0", **(env or {})}


def run_corral(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``corral ARGS`` to completion."""
    return subprocess.run(
        corral_command(*args), capture_output=True, text=True, timeout=60,
        env=_environment(env), check=False,
    )  # fmt: skip


def start_corral(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``corral ARGS`` in the background, its output piped."""
    return subprocess.Popen(
        corral_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_environment(env),
    )  # fmt: skip


def read_until(process: subprocess.Popen[str], needle: str, timeout: float = 20.0) -> str:
    """Read a process's stderr until a line holds ``needle``; return all it read."""
    assert process.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} not logged; got:\n{''.join(seen)}")


def next_event(subscription: Subscription, kind: type[E], timeout: float = 5.0) -> tuple[str, E]:
    """The next delivery on a subscription, checked to be of ``kind``: (topic, event)."""
    delivery = subscription.get(timeout=timeout)
    assert delivery is not None, f"no {kind.__name__} within {timeout}s"
    assert isinstance(delivery.message, kind), delivery
    return delivery.topic, delivery.message


def mailbox_depth(system: System, name: str) -> int:
    """How many messages wait in the mailbox of the manager now serving ``name``."""
    ref = system.supervisor.live_ref(name)
    return ref.actor_inbox.qsize() if ref is not None else -1  # type: ignore[attr-defined]


Action = Literal["ok", "refuse", "crash", "exit", "sleep", "stop", "block", "together"]


@message("test.work")
class Work(Request["Done"]):
    manager = "worker"
    action: Action = "ok"
    seconds: float = 0.0
    target: str = ""

    def route(self) -> str:
        return self.target or "worker"


@message("test.done")
class Done(Reply):
    incarnation: int
    handled: int
    name: str


class Worker(Manager):
    """A manager that does what it is told: answer, refuse, crash, exit, sleep, stop, and
    answer together the works queued behind one ("together").

    Options: ``journal`` (a list that gets "start <name>" / "stop <name>"),
    ``fail_starts`` (a dict whose [name] counts down on_start failures), ``exit_on_start``
    (the same with SystemExit),
    ``status`` (the Health status it reports), ``gate`` (a threading.Event "block" waits on).
    """

    name = "worker"
    incarnations: dict[str, int] = {}

    def on_start(self) -> None:
        name = self.corral_context.name
        failures = self.options.get("fail_starts")
        if failures and failures.get(name, 0) > 0:
            failures[name] -= 1
            raise RuntimeError(f"{name} refuses to start")
        exits = self.options.get("exit_on_start")
        if exits and exits.get(name, 0) > 0:
            exits[name] -= 1
            raise SystemExit(f"{name} exits in on_start")
        Worker.incarnations[name] = Worker.incarnations.get(name, 0) + 1
        self.incarnation = Worker.incarnations[name]
        self.count = 0
        journal = self.options.get("journal")
        if journal is not None:
            journal.append(f"start {name}")

    def on_stop(self) -> None:
        journal = self.options.get("journal")
        if journal is not None:
            journal.append(f"stop {self.corral_context.name}")

    def health(self) -> Health:
        return Health(status=self.options.get("status", "healthy"))

    @handles(Work)
    def work(self, msg: Work) -> Done:
        self.count += 1
        if msg.action == "refuse":
            raise NotFound("nothing here", {"asked": msg.action})
        if msg.action == "crash":
            raise RuntimeError("boom")
        if msg.action == "exit":
            raise SystemExit(3)
        if msg.action == "sleep":
            time.sleep(msg.seconds)
        if msg.action == "block":
            gate: threading.Event = self.options["gate"]
            gate.wait(msg.seconds or 10)
        if msg.action == "stop":
            self.stop()
        done = Done(incarnation=self.incarnation, handled=self.count, name=self.corral_context.name)
        if msg.action == "together":
            for _, reply in self.take_queued(Work, 100):
                self.count += 1
                reply.resolve(msgspec.structs.replace(done, handled=self.count))
        return done
