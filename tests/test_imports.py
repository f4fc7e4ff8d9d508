"""``import corral`` loads the core only: what Vault, HTTP and JWTs need loads when used."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = (
    "aiohttp",  # the daemon's HTTP server, the websocket gateway
    "cachetools",  # the cache manager's memory backend
    "click",  # the command line
    "cryptography.hazmat",  # JWTs signed with RSA, EC or EdDSA keys (redis checks the top)
    "httpcore",
    "httpx",  # the pool manager, `corral health`
    "hvac",  # Vault
    "jwt",  # the auth manager
    "prometheus_client",  # the daemon's /metrics
    "requests",  # under hvac
)


def _heavy(loaded: set[str]) -> list[str]:
    return [name for name in HEAVY if any(m == name or m.startswith(f"{name}.") for m in loaded)]


def _loaded_after(code: str) -> set[str]:
    """The modules loaded in a fresh process that runs ``code``."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=True,
    )  # fmt: skip
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    "code",
    [
        "import corral",
        "import corral\nwith corral.System() as system:\n    system.health()",
        "import corral.messages.cache, corral.messages.auth, corral.messages.pool",
    ],
    ids=["import", "a system started and stopped", "the built-in messages"],
)
def test_the_core_leaves_the_heavy_dependencies_alone(code: str) -> None:
    loaded = _loaded_after(code)
    assert "corral" in loaded
    assert _heavy(loaded) == []


def test_a_built_in_message_loads_when_its_wire_name_is_looked_up() -> None:
    loaded = _loaded_after(
        "import sys\n"
        "from corral.messages.base import lookup, registered\n"
        "assert 'corral.messages.cache' not in sys.modules\n"
        "assert lookup('cache.get').__name__ == 'CacheGet'\n"
        "assert lookup('cache.no_such_message') is None\n"
        "assert 'corral.messages.websocket' not in sys.modules\n"
        "assert 'ws.attach' in registered()\n"
    )
    assert "corral.messages.websocket" in loaded


def test_vault_loads_hvac_when_a_source_is_made() -> None:
    loaded = _loaded_after(
        "from corral.config import VaultSection, VaultSource\n"
        "VaultSource(VaultSection(url='http://127.0.0.1:1', token='t'))"
    )
    assert _heavy(loaded) == ["hvac", "requests"]
