"""The Manager base: its own state stays under ``corral_``, its options are typed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

import corral
from corral.config import ManagerSection, Section
from corral.errors import NotFound

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
