"""Shared helpers for the benchmarks: timing, percentiles and a printed table.

Not a benchmark itself (running it prints nothing). Benches import it as
``from _report import Row, report, timed``: ``python bench/x.py`` puts ``bench/``
first on ``sys.path``. Importing it also puts the repository root on ``sys.path``
(after ``bench/``), so ``import corral`` works from a checkout that is not installed.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = ["Row", "percentiles", "ratio", "report", "timed", "use_repo"]


def use_repo() -> None:
    """Put the repository root on ``sys.path`` so ``import corral`` works uninstalled."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(1, root)


use_repo()


class Row(NamedTuple):
    """One line of a report: a measured figure and, optionally, what it is compared with."""

    name: str
    figure: float
    reference: float | None = None
    unit: str = "ops/s"


def timed(fn: Callable[[], object], n: int, *, repeat: int = 1) -> float:
    """Calls per second of ``fn`` over ``n`` calls; the best of ``repeat`` runs."""
    best = 0.0
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - start
        best = max(best, n / elapsed if elapsed > 0 else math.inf)
    return best


def percentiles(samples: Sequence[float]) -> tuple[float, float]:
    """The p50 and p99 of ``samples`` (nearest rank); ``(nan, nan)`` when empty."""
    if not samples:
        return math.nan, math.nan
    ordered = sorted(samples)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]

    return rank(0.50), rank(0.99)


def ratio(figure: float, reference: float | None) -> float | None:
    """``figure / reference``, or None when there is no usable reference."""
    if reference is None or reference == 0 or math.isnan(reference):
        return None
    return figure / reference


def _number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.3g}"


def report(title: str, rows: Sequence[Row], *, note: str = "") -> None:
    """Print ``rows`` as a table: name, figure, reference and ratio figure/reference."""
    width = max([len("case")] + [len(r.name) for r in rows])
    print(f"\n{title}")
    header = f"{'case':<{width}}  {'figure':>14}  {'reference':>14}  {'ratio':>6}  unit"
    print(header)
    print("-" * len(header))
    for row in rows:
        share = ratio(row.figure, row.reference)
        print(
            f"{row.name:<{width}}  {_number(row.figure):>14}  {_number(row.reference):>14}  "
            f"{'-' if share is None else f'{share:.2f}x':>6}  {row.unit}"
        )
    if note:
        print(note)
