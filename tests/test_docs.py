"""The README and docs/*.md say only what is true: the settings they name exist, and the
code blocks marked runnable (```python run) run, each as a script of its own."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import corral.config
from corral._events import EventsMixin
from corral.actors import BUILTIN
from corral.config import BusSection, Config, DaemonSection, ManagerSection
from corral.daemon import Daemon
from corral.ext.cache import cached
from corral.ext.flask import RateLimit
from corral.ext.transaction import Transaction
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _manager_keys(name: str) -> set[str]:
    """What a ``[managers.<name>]`` table of a built-in manager may hold."""
    module, _, attr = BUILTIN[name].partition(":")
    options = getattr(importlib.import_module(module), attr).Options
    keys = {f.name for f in dataclasses.fields(ManagerSection)} - {"options"}
    return keys | {f.name for f in dataclasses.fields(options)} if options else keys


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_built_in_manager_settings_named_in_the_docs_exist(page: Path) -> None:
    text = page.read_text()
    named: list[tuple[str, str]] = []
    for block in FENCE.finditer(text):
        if block["info"].split()[:1] == ["toml"]:
            managers = tomllib.loads(block["code"]).get("managers", {})
            named += [(name, key) for name, table in managers.items() for key in table]
    named += re.findall(r"\bmanagers\.(\w+)\.(\w+)", text)
    unknown = [
        f"managers.{name}.{key}"
        for name, key in named
        if name in BUILTIN and key not in _manager_keys(name)
    ]
    assert unknown == []


PRECEDENCE = re.compile(
    r"defaults <.*environment.*<.*file.*<.*Vault.*<.*flags", re.DOTALL | re.IGNORECASE
)


@pytest.mark.parametrize(
    ("page", "heading"),
    [("README.md", "## Configuration"), ("docs/config.md", "## "), ("docs/vault.md", "## ")],
)
def test_config_docs_say_the_precedence_first(page: str, heading: str) -> None:
    text = (ROOT / page).read_text()
    section = text[text.index(heading) :].split("\n", 1)[1]
    first_paragraph = section.strip().split("\n\n", 1)[0]
    assert PRECEDENCE.search(first_paragraph), first_paragraph


def test_config_package_says_the_precedence_first() -> None:
    doc = corral.config.__doc__ or ""
    assert PRECEDENCE.search(doc.split("\n\n")[1]), doc


def test_the_docs_name_every_argument_and_method_of_the_helpers() -> None:
    """``cached``'s arguments and additions, a transaction's methods and ``subscribe``'s
    keywords are each named in the page that teaches them."""
    cache_page = (ROOT / "docs" / "cache.md").read_text()
    state_page = (ROOT / "docs" / "state.md").read_text()
    events = (ROOT / "README.md").read_text() + state_page
    unnamed = [
        f"cached({name}=)"
        for name in inspect.signature(cached).parameters
        if name != "system" and f"`{name}`" not in cache_page
    ]
    unnamed += [
        f"cached.{name}" for name in ("invalidate", "stats") if f"`{name}(" not in cache_page
    ]
    unnamed += [
        f"Transaction.{name}"
        for name, _ in inspect.getmembers(Transaction, inspect.isfunction)
        if not name.startswith("_") and f"tx.{name}(" not in state_page
    ]
    unnamed += [
        f"subscribe({name}=)"
        for name, parameter in inspect.signature(EventsMixin.subscribe).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and f"{name}=" not in events
    ]
    assert unnamed == []


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced code block marked runnable: ```python run [needs ...]."""

    page: Path
    line: int
    code: str
    needs: frozenset[str]

    def __str__(self) -> str:
        return f"{_page_id(self.page)}:{self.line}"


def runnable_blocks() -> list[Block]:
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for block in FENCE.finditer(text):
            words = block["info"].split()
            if words[:2] == ["python", "run"]:
                line = text.count("\n", 0, block.start()) + 1
                blocks.append(Block(page, line, block["code"], frozenset(words[2:])))
    return blocks


BLOCKS = runnable_blocks()
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def test_the_readme_has_runnable_blocks() -> None:
    assert [b.line for b in BLOCKS if b.page.name == "README.md"], "no ```python run block"
    assert all(b.needs <= {"daemon"} for b in BLOCKS), [str(b) for b in BLOCKS]


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_runnable_block(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Run the block as a user would, as a script of its own; it must end, and end well.

    ``daemon``: the block talks to a corral daemon at the default Redis URL; the test
    starts one (serving cache and state) on a private redis-server, and the block is
    given that server's URL.
    """
    code = block.code
    if "daemon" in block.needs:
        server: RedisServer = request.getfixturevalue("redis_server")
        config = Config().replace(
            bus=BusSection(backend="redis", url=server.url),
            daemon=DaemonSection(port=0),
            managers={"cache": ManagerSection(), "state": ManagerSection()},
        )
        daemon = Daemon(config)
        daemon.start()
        request.addfinalizer(daemon.stop)
        code = code.replace(DEFAULT_REDIS, server.url)
    script = tmp_path / "block.py"
    script.write_text(code)
    try:
        result = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
            timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{block} did not end within 60 s:\n{exc.stderr!r}") from None
    assert result.returncode == 0, f"{block} failed:\n{result.stderr}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_built_in_managers_are_enabled_without_a_class_path(page: Path) -> None:
    stale = []
    for block in FENCE.finditer(page.read_text()):
        if block["info"].split()[:1] == ["toml"]:
            managers = tomllib.loads(block["code"]).get("managers", {})
            stale += [
                name
                for name, table in managers.items()
                if name in BUILTIN and "class_path" in table
            ]
    assert stale == []


def test_every_option_of_the_flask_helper_is_documented() -> None:
    text = (ROOT / "docs" / "ratelimit.md").read_text()
    flask_section = text[text.index("## Flask") :].split("\n## ", 1)[0]
    options = [
        p for p in inspect.signature(RateLimit).parameters.values() if p.kind == p.KEYWORD_ONLY
    ]
    assert [p.name for p in options if f"`{p.name}=" not in flask_section] == []


def test_the_readme_names_what_a_manager_may_use() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Your own managers") :].split("\n## ", 1)[0]
    face = ["name", "Options", "placement", "options", "router", "defer_reply()", "take_queued()"]
    face += ["every()", "after()", "health()", "on_start", "on_stop", "on_failure", "mount("]
    face += ["corral_context", "corral_"]
    assert [name for name in face if f"`{name}" not in section] == []
