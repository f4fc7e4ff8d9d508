"""The layering rules of docs/architecture.md, read from the source's import statements.

- a manager package (``corral/actors/<name>/``) imports no other manager package, and
  neither ``corral.daemon`` nor ``corral.remote``: managers reach each other by messages;
- ``corral.daemon`` imports no manager package: a manager offers its routes through its
  ``Manager.mount`` hook;
- ``corral.messages.*`` imports nothing of corral but ``corral.errors`` and ``corral.messages.*``;
- only :data:`PYKKA_INTERNALS_HOME` imports pykka's private modules and names;
- corral's own modules outside a manager package (``corral.ext``, ``corral.cli``…) use a
  manager's public face (``corral.actors.<name>``), never its private modules (tests may).

Imports under ``if TYPE_CHECKING:`` and inside functions count like any other. The
exceptions that remain today are listed below with their reason; a new violation
fails, and so does an exception that no longer occurs (strike it from the list).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("corral", "tests", "bench", "examples")
MANAGER_PACKAGES = sorted(
    p.name for p in (ROOT / "corral" / "actors").iterdir() if (p / "__init__.py").is_file()
)
PYKKA_INTERNALS_HOME = "corral._runtime"
"""The one module that may use pykka's private API (its envelope, its stop message)."""

KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}
"""(importing module, imported module or name) -> why it is allowed for now."""


def _modules() -> Iterator[tuple[str, Path]]:
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path) -> Iterator[str]:
    """Every module (or, for ``from m import name``, ``m.name``) the file imports."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield f"{node.module}.{alias.name}"


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


def _manager_of(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) >= 3 and parts[:2] == ["corral", "actors"] and parts[2] in MANAGER_PACKAGES:
        return parts[2]
    return None


def _violations(module: str, imported: str) -> Iterator[str]:
    owner = _manager_of(module)
    if owner is not None:
        other = _manager_of(imported)
        if other is not None and other != owner:
            yield f"a manager imports another manager ({other})"
        if _within(imported, "corral.daemon") or _within(imported, "corral.remote"):
            yield "a manager imports the daemon's side"
    if (
        _within(module, "corral")
        and owner is None
        and _manager_of(imported) is not None
        and any(part.startswith("_") for part in imported.split(".")[3:])
    ):
        yield "a manager's private module used outside it"
    if module == "corral.daemon" and _manager_of(imported) is not None:
        yield "the daemon imports a manager"
    if (
        _within(module, "corral.messages")
        and _within(imported, "corral")
        and not any(_within(imported, ok) for ok in ("corral.messages", "corral.errors"))
    ):
        yield "messages import corral beyond errors and messages"
    if (
        _within(imported, "pykka")
        and module != PYKKA_INTERNALS_HOME
        and any(part.startswith("_") for part in imported.split(".")[1:])
    ):
        yield "pykka's private API used outside " + PYKKA_INTERNALS_HOME


def _private_pykka_name(imported: str) -> str:
    """``pykka._envelope.Envelope`` -> ``pykka._envelope``; ``pykka.messages._ActorStop`` stays."""
    parts = imported.split(".")
    for index, part in enumerate(parts[1:], start=1):
        if part.startswith("_"):
            return ".".join(parts[: index + 1])
    return imported


def _found() -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for module, path in _modules():
        for imported in _imports(path):
            for rule in _violations(module, imported):
                target = imported
                if _within(imported, "pykka"):
                    target = _private_pykka_name(imported)
                elif not _is_module(imported):
                    target = imported.rpartition(".")[0]
                found.setdefault((module, target), []).append(rule)
    return found


def test_no_new_violation_of_the_import_rules() -> None:
    new = {key: rules for key, rules in _found().items() if key not in KNOWN_EXCEPTIONS}
    assert new == {}


def test_every_recorded_exception_still_occurs() -> None:
    gone = sorted(set(KNOWN_EXCEPTIONS) - set(_found()))
    assert gone == [], "no longer needed: strike these from KNOWN_EXCEPTIONS"


@pytest.mark.parametrize(
    ("module", "imported", "broken"),
    [
        ("corral.actors.cache._manager", "corral.actors.state._memory.MemoryBackend", True),
        ("corral.actors.cache._manager", "corral.daemon.Daemon", True),
        ("corral.actors.cache._manager", "corral.remote", True),
        ("corral.actors.cache._manager", "corral.manager.Manager", False),
        ("corral.actors.cache._manager", "corral.actors.cache._options.CacheOptions", False),
        ("corral.daemon", "corral.actors.websocket", True),
        ("corral.ext.flask", "corral.actors.ratelimit._options.parse_limit", True),
        ("corral.ext.flask", "corral.actors.ratelimit.parse_limit", False),
        ("tests.test_ratelimit", "corral.actors.ratelimit._options.parse_limit", False),
        ("corral.daemon", "corral.manager.HttpMount", False),
        ("corral.messages.cache", "corral.bus.compile_glob", True),
        ("corral.messages.cache", "corral.errors.NotFound", False),
        ("corral.messages.cache", "corral.messages.base.message", False),
        ("corral.system", "pykka._envelope.Envelope", True),
        ("corral.system", "pykka.messages._ActorStop", True),
        ("corral.system", "pykka.ThreadingActor", False),
        (PYKKA_INTERNALS_HOME, "pykka._envelope.Envelope", False),
    ],
)
def test_the_rules_judge_an_import(module: str, imported: str, broken: bool) -> None:
    assert bool(list(_violations(module, imported))) is broken
