"""What setup.cfg declares: every third-party import, the licence, the Python versions."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.lower_bounds import lowest

ROOT = Path(__file__).resolve().parent.parent
SETUP = configparser.ConfigParser()
SETUP.read(ROOT / "setup.cfg")
# Modules of corral that only an extra makes importable, with that extra.
EXTRAS = {"corral/ext/flask.py": "flask", "corral/actors/pool/_discovery.py": "discovery"}
"""Modules that may import what an extra brings (dnspython: a dns_server of the pool's own)."""


def _requirements(text: str) -> list[Requirement]:
    lines = (line.partition("#")[0].strip() for line in text.splitlines())
    return [Requirement(line) for line in lines if line]


def _names(requirements: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in requirements}


def _imported(path: Path) -> set[str]:
    """The top-level modules a file imports when it runs, wherever in the file (those
    under ``if TYPE_CHECKING:`` only matter to the type checker)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            node.body = []
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.partition(".")[0])
    return modules


def test_every_third_party_import_is_declared() -> None:
    install = _names(_requirements(SETUP["options"]["install_requires"]))
    extras = SETUP["options.extras_require"]
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for path in sorted((ROOT / "corral").rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        declared = install
        if where in EXTRAS:
            declared = install | _names(_requirements(extras[EXTRAS[where]]))
        for module in sorted(_imported(path)):
            if module in sys.stdlib_module_names or module in ("corral", "__future__"):
                continue
            providers = {canonicalize_name(d) for d in distributions.get(module, [module])}
            if not providers & declared:
                missing.append(f"{where}: {module} ({', '.join(sorted(providers))})")
    assert missing == []


def test_installed_versions_are_the_declared_ones() -> None:
    requirements = _requirements(SETUP["options"]["install_requires"])
    outside = [
        f"{r.name} {importlib.metadata.version(r.name)} not in {r.specifier}"
        for r in requirements
        if not r.specifier.contains(importlib.metadata.version(r.name), prereleases=True)
    ]
    assert outside == []


def test_licence_file_is_shipped() -> None:
    assert SETUP["metadata"]["license"] == "MIT"
    assert SETUP["metadata"]["license_files"].split() == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the corral authors\n")
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_classifiers_name_every_supported_python() -> None:
    classifiers = SETUP["metadata"]["classifiers"].split("\n")
    versions = [
        c.rpartition(" :: ")[2]
        for c in classifiers
        if c.startswith("Programming Language :: Python :: 3.")
    ]
    assert versions == ["3.11", "3.12", "3.13"]
    assert SETUP["options"]["python_requires"] == ">=3.11"


def test_the_sdist_carries_tests_that_collect(tmp_path: Path) -> None:
    """The sdist, built as ``python -m build --sdist`` builds it (through the build
    backend's own hook), holds every test module and all they need: they collect."""
    build = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    built = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    archive = tmp_path / "dist" / built.stdout.split()[-1]
    with tarfile.open(archive) as sdist:
        sdist.extractall(tmp_path, filter="data")
    unpacked = tmp_path / archive.name.removesuffix(".tar.gz")
    shipped = {p.relative_to(unpacked).as_posix() for p in (unpacked / "tests").rglob("*.py")}
    assert shipped == {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("*.py")}
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=unpacked, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(unpacked)},
    )  # fmt: skip
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr
    assert " error" not in collected.stdout.splitlines()[-1]


OLDER_RELEASES = {
    "pykka": "4.4.2",
    "redis": "7.4.1",
    "msgpack": "1.2.0",
    "msgspec": "0.20.0",
    "click": "8.2.1",
    "prometheus-client": "0.22.1",
    "httpx": "0.27.2",
    "pyjwt": "2.12.1",
    "hvac": "2.3.0",
    "aiohttp": "3.11.18",
    "cachetools": "6.2.6",
    "yarl": "1.17.0",
    "cryptography": "44.0.3",
}
"""A release older than the newest, of each runtime dependency, that users may well hold."""


def test_older_releases_of_the_dependencies_are_allowed() -> None:
    specifiers: dict[str, SpecifierSet] = {
        canonicalize_name(r.name): r.specifier
        for r in _requirements(SETUP["options"]["install_requires"])
    }
    assert set(specifiers) == set(OLDER_RELEASES)
    refused = [f"{n} {v}" for n, v in OLDER_RELEASES.items() if not specifiers[n].contains(v)]
    assert refused == []


def test_each_requirement_names_the_lower_bound_make_test_lower_bounds_installs() -> None:
    pins = [lowest(r) for r in _requirements(SETUP["options"]["install_requires"])]
    assert "redis==6.0" in [str(pin) for pin in pins]
    assert all(len(pin.specifier) == 1 for pin in pins)
