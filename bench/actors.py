"""Actors: corral's typed managers against bare pykka, in the same run.

- typed tell throughput: ``System.tell`` (validation, routing by name, bounded
  mailbox, typed dispatch, counters) vs ``ActorRef.tell`` to a bare pykka actor
  doing the same work;
- ask latency p50/p99: ``System.ask`` vs ``ActorRef.ask``;
- crash -> next successful ask: how long a caller holding the name waits while
  the supervisor restarts a crashed manager (no reference: pykka has no supervisor);
- where an ask's time goes: the parts of it that run on one thread, each timed alone
  against pykka's (validation and routing by name have none), the rest of the p50
  being the two thread hand-offs and the dispatch.

Run: ``python bench/actors.py``. Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import time
from typing import Any

import pykka
from _report import Row, percentiles, report, timed

from corral._runtime import Envelope, Mailbox, ReplyFuture
from corral.config import Config, SupervisorSection
from corral.errors import ManagerUnavailable
from corral.manager import Manager, handles
from corral.messages.base import Reply, Request, message
from corral.supervisor import ChildSpec
from corral.system import System

TELLS = 50_000
ASKS = 5_000
CRASHES = 20
ROUNDS = 7


@message("bench.count")
class Count(Request["Counted"]):
    manager = "counter"
    amount: int = 1
    crash: bool = False


@message("bench.counted")
class Counted(Reply):
    total: int


class Counter(Manager):
    name = "counter"

    def on_start(self) -> None:
        self.total = 0

    @handles(Count)
    def count(self, msg: Count) -> Counted:
        if msg.crash:
            raise RuntimeError("crash on request")
        self.total += msg.amount
        return Counted(total=self.total)


class BareCounter(pykka.ThreadingActor):
    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def on_receive(self, message: Any) -> Any:
        self.total += message.amount
        return Counted(total=self.total)


def tell_rate_corral(system: System) -> float:
    start_total = system.ask(Count(amount=0)).total
    msg = Count()
    started = time.perf_counter()
    for _ in range(TELLS):
        system.tell(msg)
    final = system.ask(Count(amount=0), timeout=60).total
    elapsed = time.perf_counter() - started
    assert final - start_total == TELLS
    return TELLS / elapsed


def tell_rate_pykka(ref: pykka.ActorRef[Any]) -> float:
    start_total = ref.ask(Count(amount=0), block=True).total
    msg = Count()
    started = time.perf_counter()
    for _ in range(TELLS):
        ref.tell(msg)
    final = ref.ask(Count(amount=0), block=True, timeout=60).total
    elapsed = time.perf_counter() - started
    assert final - start_total == TELLS
    return TELLS / elapsed


def ask_latencies(ask: Any) -> tuple[float, float]:
    msg = Count()
    samples = []
    for _ in range(ASKS):
        started = time.perf_counter()
        ask(msg)
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def crash_recovery(system: System) -> tuple[float, float]:
    samples = []
    for _ in range(CRASHES):
        system.ask(Count(amount=0))
        started = time.perf_counter()
        with contextlib.suppress(ManagerUnavailable):
            system.ask(Count(crash=True))
        system.ask(Count(amount=0))
        samples.append(time.perf_counter() - started)
    return percentiles(samples)


def ask_parts(system: System) -> list[Row]:
    """The single-thread parts of an ask, in us per call, against pykka's."""
    msg = Count()
    mailbox, inbox = Mailbox(TELLS, 1.0, "bench"), queue.Queue[Envelope[Any]]()

    def through(box: Mailbox | queue.Queue[Envelope[Any]]) -> None:
        box.put(Envelope(msg))
        box.get()

    parts = [
        ("validate + route by name", lambda: system._route(msg), None),
        (
            "envelope + reply future",
            lambda: Envelope(msg, reply_to=ReplyFuture()),
            lambda: Envelope(msg, reply_to=pykka.ThreadingFuture()),
        ),
        ("mailbox put + get", lambda: through(mailbox), lambda: through(inbox)),
    ]
    rows = []
    for name, ours, theirs in parts:
        figure = reference = 0.0
        for _ in range(3):  # interleaved, best of each
            figure = max(figure, timed(ours, ASKS, repeat=3))
            reference = (
                reference if theirs is None else max(reference, timed(theirs, ASKS, repeat=3))
            )
        per_call = 1e6 / reference if reference else None
        rows.append(Row(f"ask part: {name} (us)", 1e6 / figure, per_call, "us"))
    return rows


def main() -> None:
    logging.disable(logging.CRITICAL)  # the crash benchmark would log every crash
    policy = SupervisorSection(
        max_restarts=CRASHES * 2,
        period=60.0,
        backoff_initial=0.001,
        backoff_max=0.001,
        backoff_jitter=0.0,
        probe_interval=5.0,
    )
    config = Config().replace(supervisor=policy)
    system = System(
        config, managers=[ChildSpec(name="counter", manager=Counter, mailbox_size=TELLS * 2)]
    ).start()
    bare = BareCounter.start()
    gc.disable()
    try:
        best: dict[str, float] = {}
        p50s: dict[str, float] = {}
        p99s: dict[str, float] = {}
        for _ in range(ROUNDS):  # interleaved, best of each: the machine is noisy
            best["corral"] = max(best.get("corral", 0.0), tell_rate_corral(system))
            best["pykka"] = max(best.get("pykka", 0.0), tell_rate_pykka(bare))
            for name, ask in (("corral", system.ask), ("pykka", bare.ask)):
                p50, p99 = ask_latencies(ask)
                p50s[name] = min(p50s.get(name, 1.0), p50)
                p99s[name] = min(p99s.get(name, 1.0), p99)
        recovery_p50, recovery_p99 = crash_recovery(system)
        parts = ask_parts(system)
    finally:
        gc.enable()
        system.stop()
        bare.stop()
    report(
        "actors: corral manager vs bare pykka actor (same run)",
        [
            Row("typed tell throughput", best["corral"], best["pykka"], "msgs/s"),
            Row("ask latency p50 (us)", p50s["corral"] * 1e6, p50s["pykka"] * 1e6, "us"),
            Row("ask latency p99 (us)", p99s["corral"] * 1e6, p99s["pykka"] * 1e6, "us"),
            Row("crash -> next ask p50 (ms)", recovery_p50 * 1e3, None, "ms"),
            Row("crash -> next ask p99 (ms)", recovery_p99 * 1e3, None, "ms"),
            *parts,
        ],
        note="targets: tell ratio >= 0.8; ask p50 ratio <= 1.1 (lower is better for latency)",
    )


if __name__ == "__main__":
    main()
