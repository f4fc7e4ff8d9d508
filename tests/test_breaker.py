"""The circuit breaker shared by the cache's Redis backends and the pool's base URLs."""

from __future__ import annotations

from corral._breaker import BreakerState, CircuitBreaker


def test_breaker_state_machine() -> None:
    now = [0.0]
    moves: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        threshold=2,
        cooldown=10.0,
        probes=1,
        clock=lambda: now[0],
        on_transition=lambda old, new: moves.append((old, new)),
    )

    def state() -> BreakerState:
        return breaker.state

    for _ in range(2):
        assert breaker.allow()
        breaker.record(False)
    assert (state(), breaker.allow()) == ("open", False)
    assert breaker.seconds_until_half_open() == 10.0
    now[0] = 10.0
    assert state() == "open" and breaker.available()  # half-open on the next call
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    assert state() == "half_open"
    breaker.record(False)
    assert state() == "open"
    now[0] = 20.0
    assert breaker.allow()
    breaker.record(True)
    assert (state(), breaker.transitions) == ("closed", 5)
    assert moves == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_a_success_resets_the_count_of_failures() -> None:
    breaker = CircuitBreaker(threshold=2, cooldown=1.0, clock=lambda: 0.0)
    for outcome in (False, True, False):
        assert breaker.allow()
        breaker.record(outcome)
    assert (breaker.state, breaker.failures) == ("closed", 1)


def test_an_outcome_that_says_nothing_frees_the_probe_slot() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=1, cooldown=1.0, clock=lambda: now[0])
    assert breaker.allow()
    breaker.record(False)
    now[0] = 1.0
    assert breaker.allow() and not breaker.available()
    breaker.record(None)
    assert breaker.state == "half_open" and breaker.available()


def test_a_late_answer_from_before_it_opened_changes_nothing() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=5.0, probes=2, clock=lambda: 0.0)
    assert breaker.allow() and breaker.allow()
    breaker.record(False)
    breaker.record(True)
    assert (breaker.state, breaker.transitions) == ("open", 1)
