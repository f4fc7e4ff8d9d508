"""The README and docs/*.md say only what is true: the settings they name exist."""

from __future__ import annotations

import dataclasses
import importlib
import re
import tomllib
from pathlib import Path

import pytest

from corral.actors import BUILTIN
from corral.config import ManagerSection

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
