"""Run a fast subset of the tests against the lowest versions setup.cfg allows.

    python -m tests.lower_bounds                  # what `make test-lower-bounds` runs
    python -m tests.lower_bounds -- -k cache      # pytest's arguments after --
    python -m tests.lower_bounds --keep .lower    # keep the venv in .lower (reused if there)

Every ``install_requires`` entry of setup.cfg is installed, in a fresh venv, at its
lower bound (``redis>=6.0,<9`` as ``redis==6.0``); the tools the tests need come from
the ``dev`` extra, held to the same pins; corral itself is this checkout (PYTHONPATH).
Then the test files of ``SUBSET`` run, one or more for each dependency. An extra that
raises a bound (``websocket``: redis 8) is installed at its own lower bounds next, and
the files of ``EXTRA_SUBSETS`` run. Exits 0 when every run passed.
"""

from __future__ import annotations

import argparse
import configparser
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
SUBSET = [
    "tests/test_manager.py",  # pykka
    "tests/test_supervisor.py",
    "tests/test_system.py",
    "tests/test_codec.py",  # msgpack, msgspec
    "tests/test_config.py",
    "tests/test_imports.py",
    "tests/test_bus_redis.py",  # redis
    "tests/test_remote.py",  # redis, aiohttp, prometheus_client
    "tests/test_cache.py",  # cachetools
    "tests/test_auth.py",  # pyjwt, cryptography
    "tests/test_pool.py",  # httpx, aiohttp, yarl
    "tests/test_pool_transport.py",
    "tests/test_vault.py",  # hvac
    "tests/test_cli.py",  # click
]
EXTRA_SUBSETS = {"websocket": ["tests/test_websocket.py"]}
"""Test files that need an extra, by extra."""
TEST_TOOLS = ("pytest", "pytest-timeout", "hypothesis", "websockets")
"""What the subset needs besides corral's own requirements (versions from the dev extra)."""


def _requirements(section: str, key: str) -> list[Requirement]:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    lines = (line.partition("#")[0].strip() for line in setup[section][key].splitlines())
    return [Requirement(line) for line in lines if line]


def lowest(requirement: Requirement) -> Requirement:
    """``requirement`` pinned to its lower bound: ``redis>=5.0,<9`` -> ``redis==5.0``."""
    floors = [spec.version for spec in requirement.specifier if spec.operator in (">=", "==")]
    if len(floors) != 1:
        raise SystemExit(f"{requirement}: name one lower bound (>=) to test")
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    return Requirement(f"{requirement.name}{extras}=={floors[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="make (or reuse) the venv here")
    argv = sys.argv[1:] if argv is None else argv
    ours, pytest_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if (
        "--" in argv) else (argv, [])  # fmt: skip
    args = parser.parse_args(ours)
    pins = [lowest(r) for r in _requirements("options", "install_requires")]
    tools = [str(r) for r in _requirements("options.extras_require", "dev") if r.name in TEST_TOOLS]
    runs = [(pins, SUBSET)]
    for extra, files in EXTRA_SUBSETS.items():
        raised = [lowest(r) for r in _requirements("options.extras_require", extra)]
        kept = [pin for pin in pins if pin.name not in {r.name for r in raised}]
        runs.append(([*kept, *raised], files))
    failed = 0
    with tempfile.TemporaryDirectory(prefix="corral-lower-") as scratch:
        home = args.keep or Path(scratch) / "venv"
        python = home / "bin" / "python"
        if not python.exists():
            venv.create(home, with_pip=True)
        for run_pins, files in runs:
            # Held to the pins while the test tools come in (a constraint names no extras).
            constraints = Path(scratch) / "constraints.txt"
            constraints.write_text("".join(f"{pin.name}{pin.specifier}\n" for pin in run_pins))
            print("lower bounds:", " ".join(map(str, run_pins)), flush=True)
            subprocess.run(
                [python, "-m", "pip", "install", "--quiet", "-c", constraints,
                 *map(str, run_pins), *tools],
                check=True,
            )  # fmt: skip
            command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *pytest_args]
            environment = {**os.environ, "PYTHONPATH": str(ROOT)}
            failed |= subprocess.run(command, cwd=ROOT, env=environment, check=False).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
