"""Import time: ``import corral`` against ``import pykka, redis, msgpack, msgspec``, side by side.

Run as ``python bench/imports.py``. Each figure is the time one ``import`` statement
takes in a fresh Python process (interpreter start-up left out), the median of
``ROUNDS`` processes, corral's and the reference's interleaved so that load from
elsewhere hits both alike; the bytecode caches are warmed first. The reference is
what corral's core cannot do without. The design target (reported, not asserted)
is a ratio of at most 2x: Vault, the HTTP server and client and the crypto behind
JWTs load when they are used, not with ``import corral``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _report import Row, report

ROUNDS = 15
TARGET = 2.0
ROOT = Path(__file__).resolve().parent.parent
CORRAL = "corral"
REFERENCE = "pykka, redis, msgpack, msgspec"
PROBE = """
import sys, time, json
before = len(sys.modules)
started = time.perf_counter()
import {modules}
elapsed = time.perf_counter() - started
print(json.dumps({{"seconds": elapsed, "modules": len(sys.modules) - before}}))
"""


def measure(modules: str) -> tuple[float, int]:
    """Seconds ``import <modules>`` takes in a fresh process, and the modules it loads."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's corral, not an installed one
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(modules=modules)],
        capture_output=True, text=True, check=True, env=env, cwd=ROOT,
    )  # fmt: skip
    figures = json.loads(result.stdout)
    return float(figures["seconds"]), int(figures["modules"])


def main() -> None:
    for modules in (CORRAL, REFERENCE):  # compile and cache the bytecode first
        measure(modules)
    times: dict[str, list[float]] = {CORRAL: [], REFERENCE: []}
    loaded: dict[str, int] = {}
    for _ in range(ROUNDS):
        for modules in (CORRAL, REFERENCE):
            seconds, loaded[modules] = measure(modules)
            times[modules].append(seconds)
    corral_ms, reference_ms = (statistics.median(times[m]) * 1000 for m in (CORRAL, REFERENCE))
    rows = [
        Row(f"import {CORRAL}", corral_ms, reference_ms, unit="ms"),
        Row("modules it loads", loaded[CORRAL], loaded[REFERENCE], unit="modules"),
    ]
    report(
        f"import corral vs import {REFERENCE} (figure: corral, reference: the three)",
        rows,
        note=f"design target: ratio <= {TARGET:g}x; median of {ROUNDS} fresh processes each",
    )


if __name__ == "__main__":
    main()
