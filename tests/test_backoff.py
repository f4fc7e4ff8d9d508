"""The backoff every retry and reconnect loop waits by."""

from __future__ import annotations

import pytest

from corral._backoff import Backoff, jittered


def test_delays_double_up_to_the_cap() -> None:
    backoff = Backoff(initial=0.1, cap=1.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff.delay(10_000) == 1.0  # no overflow, however long the outage


@pytest.mark.parametrize(("jitter", "rand", "expected"), [(0.5, 0.0, 0.8), (0.5, 0.999, 0.4004)])
def test_jitter_takes_off_a_random_fraction(jitter: float, rand: float, expected: float) -> None:
    backoff = Backoff(initial=0.1, cap=5.0, jitter=jitter, rand=lambda: rand)
    assert backoff.delay(4) == pytest.approx(expected)


def test_full_jitter_may_wait_nothing() -> None:
    assert jittered(2.0, 1.0, rand=lambda: 1.0) == 0.0
    assert jittered(2.0, 1.0, rand=lambda: 0.0) == 2.0
