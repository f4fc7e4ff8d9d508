"""Every public module says what it exports in ``__all__``, and exports what it defines.

A public module is one with no ``_`` at the start of any part of its dotted name.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path
from types import ModuleType

import pytest

import corral
from corral.actors import BUILTIN
from corral.manager import Manager

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = sorted(
    {"corral"}
    | {
        info.name
        for info in pkgutil.walk_packages(corral.__path__, "corral.")
        if not any(part.startswith("_") for part in info.name.split("."))
    }
)

MANAGER_EXTRAS: dict[str, set[str]] = {
    "cache": {"BackendOptions"},  # one table per named backend: docs/cache.md
    "pool": {"ServiceOptions"},  # one table per service: docs/pool.md
    "ratelimit": {"parse_limit"},  # the rule syntax, for views that limit themselves (ext.flask)
}
"""Public names of a manager package besides its ``<Name>Manager`` and ``<Name>Options``."""


def _module(name: str) -> ModuleType:
    return importlib.import_module(name)


def _bound_at_top(path: Path) -> list[str]:
    """The names a module's top level binds by import or assignment (not ``__all__``)."""
    names: list[str] = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            names += [alias.asname or alias.name for alias in node.names]
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name) and t.id != "__all__"]
    return names


def test_corral_exports_exactly_what_its_init_binds() -> None:
    """httpx's check: ``corral/__init__.py`` imports its public face and nothing else."""
    bound = _bound_at_top(ROOT / "corral" / "__init__.py")
    assert corral.__all__ == sorted(bound)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_a_public_module_exports_what_it_defines(name: str) -> None:
    module = _module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{name} has no __all__"
    assert len(exported) == len(set(exported)), f"{name}.__all__ names something twice"
    assert [n for n in exported if not hasattr(module, n)] == [], f"{name}.__all__"
    defined_here = [
        member
        for member, value in vars(module).items()
        if not member.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == name
    ]
    assert sorted(set(defined_here) - set(exported)) == [], f"defined in {name}, not in __all__"


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_a_built_in_manager_package_shows_its_manager_and_options(name: str) -> None:
    path, _, manager_name = BUILTIN[name].partition(":")
    assert path == f"corral.actors.{name}"
    package = _module(path)
    stem = manager_name.removesuffix("Manager")
    assert manager_name == f"{stem}Manager"
    manager = getattr(package, manager_name)
    assert issubclass(manager, Manager)
    assert manager.name == name
    expected = {manager_name} | MANAGER_EXTRAS.get(name, set())
    options = getattr(package, f"{stem}Options", None)
    if options is not None:
        assert manager.Options is options
        expected.add(options.__name__)
    assert sorted(package.__all__) == sorted(expected)
    assert manager.__module__ == f"{path}._manager"


def test_every_manager_package_has_the_same_rooms() -> None:
    """``__init__`` (the public face), ``_manager`` (the actor) and ``_options`` if it has any."""
    for name in BUILTIN:
        rooms = {p.name for p in (ROOT / "corral" / "actors" / name).glob("*.py")}
        assert {"__init__.py", "_manager.py"} <= rooms, name
        public = sorted(r for r in rooms if not r.startswith("_"))
        assert public == [], f"corral.actors.{name}: public modules {public}"
        if name != "system":
            assert "_options.py" in rooms, name
