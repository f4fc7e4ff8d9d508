"""Run the test suite several times in a row and report every test that failed at least once.

    python -m tests.repeat 5                 # what `make test-repeat N=5` runs
    python -m tests.repeat 5 --hog           # with every core kept busy meanwhile
    python -m tests.repeat 3 --hog -- tests/test_pool.py -k stop   # pytest's arguments after --

Exits 1 when any test failed in any run, 0 otherwise.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path


def _spin() -> None:
    while True:
        pass


def _failures(report: Path) -> list[str]:
    if not report.exists():
        return ["<the run wrote no report>"]
    failed = []
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=int, help="how many times to run the suite")
    parser.add_argument("--hog", action="store_true", help="keep every core busy meanwhile")
    argv = sys.argv[1:] if argv is None else argv
    ours, pytest_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if (
        "--" in argv) else (argv, [])  # fmt: skip
    args = parser.parse_args(ours)
    args.pytest_args = pytest_args
    if args.runs < 1:
        parser.error("runs must be at least 1")

    hogs = []
    if args.hog:
        cores = os.cpu_count() or 1
        hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(cores)]
        for hog in hogs:
            hog.start()
    failed: Counter[str] = Counter()
    try:
        with tempfile.TemporaryDirectory(prefix="corral-repeat-") as folder:
            for run in range(1, args.runs + 1):
                report = Path(folder) / f"run-{run}.xml"
                started = time.monotonic()
                command = [sys.executable, "-m", "pytest", "-q", f"--junitxml={report}"]
                code = subprocess.call([*command, *args.pytest_args])
                these = _failures(report) if code else []
                if code and not these:
                    these = [f"<pytest exited {code}>"]
                failed.update(these)
                print(
                    f"== run {run}/{args.runs}: {'passed' if not these else f'{len(these)} failed'}"
                    f" in {time.monotonic() - started:.0f}s",
                    flush=True,
                )
    finally:
        for hog in hogs:
            hog.terminate()
    if not failed:
        print(f"== every test passed in all {args.runs} runs")
        return 0
    print(f"== tests that failed at least once in {args.runs} runs:")
    for name, count in failed.most_common():
        print(f"{count:4d} of {args.runs}: {name}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
