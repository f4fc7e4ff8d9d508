"""The built wheel alone, in a fresh venv, runs every built-in manager.

Nothing from the checkout is importable there: the venv holds the wheel and what its
metadata asks for, and the commands run from an empty directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import venv
from pathlib import Path

from corral.actors import BUILTIN

ROOT = Path(__file__).resolve().parent.parent


def _run(*command: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "PYTHON"))}
    return subprocess.run(
        [str(part) for part in command], cwd=cwd, env=environment, capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip


def test_the_wheel_alone_runs_every_built_in_manager(tmp_path: Path) -> None:
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps",
        "-w", tmp_path / "dist", ROOT, cwd=tmp_path,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("corral-*.whl")
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    installed = _run(bin_dir / "pip", "install", "-q", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    config = empty / "corral.toml"
    config.write_text(
        "[daemon]\nport = 0\n" + "".join(f"[managers.{name}]\n" for name in sorted(BUILTIN))
    )
    check = _run(bin_dir / "corral", "config", "check", "-c", config, cwd=empty)
    assert check.returncode == 0, check.stderr
    for name in BUILTIN:
        assert f"[managers.{name}]\n" in check.stdout, name

    daemon = subprocess.Popen(
        [str(bin_dir / "corral"), "run", "-c", str(config)], cwd=empty,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith(("CORRAL_", "PYTHON"))},
            "PYTHONFAULTHANDLER": "1",  # a stop that hangs shows every thread (SIGABRT)
        },
    )  # fmt: skip
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert daemon.stderr is not None
        for line in daemon.stderr:
            lines.append(line)
            if " managers in " in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(60), "".join(lines)
        running = next(line for line in lines if " managers in " in line)
        assert set(running.rsplit(": ", 1)[-1].strip().split(", ")) >= set(BUILTIN), running
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.send_signal(signal.SIGABRT)
            daemon.wait(10)
            reader.join(10)
            raise AssertionError("no stop within 60 s:\n" + "".join(lines)) from None
        assert code == 0, "".join(lines)
        reader.join(10)
        assert "stopped cleanly" in "".join(lines)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
