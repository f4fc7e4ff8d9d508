"""The Manager base: its own state stays under ``corral_``, its options are typed."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import pytest

import corral
from corral.config import ManagerSection, Section
from corral.errors import BackendUnavailable, NotFound
from corral.manager import DeferredReply, Schedule
from tests.support import wait_until

# Names a service's manager may well give its own attributes and methods.
COMMON_NAMES = (
    "context",
    "settings",
    "errors",
    "handled",
    "thread",
    "failure",
    "leftovers",
    "started_at",
    "current_envelope",
    "dead_letters",
    "handler_seconds",
    "latency_counts",
    "settled",
    "mailbox",
    "stats",
)


@corral.message("test.ledger_lookup")
class LedgerLookup(corral.Request["LedgerEntry"]):
    manager = "ledger"
    key: str


@corral.message("test.ledger_entry")
class LedgerEntry(corral.Reply):
    value: str


class Ledger(corral.Manager):
    """Keeps, under every name of COMMON_NAMES, a value of its own."""

    name = "ledger"

    def on_start(self) -> None:
        for attribute in COMMON_NAMES:
            setattr(self, attribute, f"the ledger's {attribute}")

    @corral.handles(LedgerLookup)
    def lookup(self, msg: LedgerLookup) -> LedgerEntry:
        if msg.key not in COMMON_NAMES:
            raise NotFound(f"no entry {msg.key!r}")
        return LedgerEntry(value=getattr(self, msg.key))


def test_a_manager_may_name_its_attributes_as_it_likes() -> None:
    with corral.System(managers=[Ledger]) as system:
        for attribute in COMMON_NAMES:
            assert system.ask(LedgerLookup(key=attribute)).value == f"the ledger's {attribute}"
        for _ in range(3):
            with pytest.raises(NotFound, match="no entry 'nothing'"):
                system.ask(LedgerLookup(key="nothing"))  # an answer, not a crash
        status = system.health().managers["ledger"]
        assert (status.state, status.restarts) == ("running", 0)
        assert status.health is not None
        assert status.health.metrics["handled"] == len(COMMON_NAMES) + 3
        assert status.health.metrics["errors"] == 3


@dataclass(frozen=True, kw_only=True)
class CounterOptions(Section):
    start: int = 0
    step: int = 1


@corral.message("test.step_count")
class Count(corral.Request["Counted"]):
    manager = "counter"


@corral.message("test.step_counted")
class Counted(corral.Reply):
    total: int


class Counter(corral.Manager[CounterOptions]):
    """Its options are a CounterOptions, taken from the class's type argument."""

    name = "counter"

    def on_start(self) -> None:
        self.total = self.options.start

    @corral.handles(Count)
    def count(self, _msg: Count) -> Counted:
        self.total += self.options.step
        return Counted(total=self.total)


def test_the_type_argument_is_the_options_class() -> None:
    assert Counter.Options is CounterOptions
    config = corral.Config().replace(
        managers={"counter": ManagerSection(options={"start": 10, "step": 5})}
    )
    with corral.System(config, managers=[Counter]) as system:
        assert system.ask(Count()).total == 15
        assert system.ask(Count()).total == 20


def test_a_manager_without_options_class_gets_its_table_as_given() -> None:
    class Plain(corral.Manager):
        name = "plain"

    seen: dict[str, Any] = {}

    class Recorder(Plain):
        def on_start(self) -> None:
            seen.update(self.options)

    spec = corral.ChildSpec(name="plain", manager=Recorder, options={"colour": "red"})
    with corral.System(managers=[spec]):
        assert seen == {"colour": "red"}
    assert Plain.Options is None


@corral.message("test.ticker_report")
class TickerReport(corral.Request["TickerState"]):
    manager = "ticker"


@corral.message("test.ticker_state")
class TickerState(corral.Reply):
    ticks: int
    fired: int
    cancelled_ran: bool
    on_other_threads: int


class Ticker(corral.Manager):
    """Counts periodic ticks and one delayed run, checking each runs on its own thread."""

    name = "ticker"

    def on_start(self) -> None:
        self.thread = threading.current_thread()
        self.ticks = self.fired = self.on_other_threads = 0
        self.cancelled_ran = False
        self.schedules: list[Schedule] = [
            self.every(0.001, self.tick),
            self.after(0.001, self.fire),
            self.after(0.001, self.fail_softly),
        ]
        cancelled = self.after(0.001, self.never)
        cancelled.cancel()
        self.schedules.append(cancelled)
        self.options["started"].append(self)

    def _count_thread(self) -> None:
        if threading.current_thread() is not self.thread:
            self.on_other_threads += 1

    def tick(self) -> None:
        self._count_thread()
        self.ticks += 1

    def fire(self) -> None:
        self._count_thread()
        self.fired += 1

    def fail_softly(self) -> None:
        raise BackendUnavailable("a corral error in a schedule is logged, not a crash")

    def never(self) -> None:
        self.cancelled_ran = True

    @corral.handles(TickerReport)
    def report(self, _msg: TickerReport) -> TickerState:
        return TickerState(
            ticks=self.ticks,
            fired=self.fired,
            cancelled_ran=self.cancelled_ran,
            on_other_threads=self.on_other_threads,
        )


def test_every_and_after_run_on_the_actor_thread_until_it_stops() -> None:
    started: list[Ticker] = []
    spec = corral.ChildSpec(name="ticker", manager=Ticker, options={"started": started})
    with corral.System(managers=[spec]) as system:
        state = wait_until(
            lambda: (report := system.ask(TickerReport())).ticks >= 3 and report.fired and report
        )
        assert (state.fired, state.cancelled_ran, state.on_other_threads) == (1, False, 0)
        status = system.health().managers["ticker"]
        assert (status.state, status.restarts) == ("running", 0)
    (ticker,) = started
    assert [schedule.active for schedule in ticker.schedules] == [False] * 4


@corral.message("test.hold")
class Hold(corral.Request["Held"]):
    manager = "holder"


@corral.message("test.held")
class Held(corral.Reply):
    count: int


class Holder(corral.Manager):
    """Answers every Hold later, all at once, when the third one comes."""

    name = "holder"

    def on_start(self) -> None:
        self.held: list[DeferredReply] = []
        self.tells = 0
        self.options["started"].append(self)

    @corral.handles(Hold)
    def hold(self, _msg: Hold) -> None:
        reply = self.defer_reply()
        if not reply.pending:  # a tell: nobody waits
            self.tells += 1
            return
        self.held.append(reply)
        if len(self.held) == 3:
            for held in self.held:
                held.resolve(Held(count=len(self.held) + self.tells))
                held.resolve(Held(count=-1))  # a reply is sent once
            self.held.clear()


def test_deferred_replies_are_sent_later_and_once() -> None:
    started: list[Holder] = []
    spec = corral.ChildSpec(name="holder", manager=Holder, options={"started": started})
    with corral.System(managers=[spec]) as system:
        system.tell(Hold())
        answers: list[int] = []
        callers = [
            threading.Thread(target=lambda: answers.append(system.ask(Hold()).count))
            for _ in range(2)
        ]
        for caller in callers:
            caller.start()
        wait_until(lambda: len(started[0].held) == 2)
        assert system.ask(Hold()).count == 4
        for caller in callers:
            caller.join()
        assert answers == [4, 4]
