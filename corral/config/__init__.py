"""corral's configuration: one typed, frozen object merged from layers, key by key.

Precedence, lowest to highest: built-in defaults < environment < TOML file < Vault
(and other sources) < flags of ``corral run``.

1. built-in defaults: ``Config()``, enough for ``corral run`` with no file;
2. environment variables ``CORRAL_<SECTION>_<KEY>`` (``CORRAL_BUS_URL``,
   ``CORRAL_SUPERVISOR_MAX_RESTARTS``, ``CORRAL_MANAGERS_<NAME>_<FIELD>``), parsed
   as the field's type: numbers, ``true/false/yes/no/1/0``, comma-separated lists;
3. the TOML file (``load_config(path)``, else ``$CORRAL_CONFIG``, else none);
4. :class:`ConfigSource` objects such as Vault, later ones beating earlier ones;
   by default, the :class:`VaultSource` that ``[vault]`` describes when ``vault.url``
   is set in the environment or the file (see ``corral/config/_vault.py``);
5. ``flags``: what the command line set (``load_config(flags={"daemon.port":
   ("--port", 9000)})``).

The file beats the environment, unlike the usual twelve-factor order: that is
what the project's design specifies, so an environment variable only fills in
what the file leaves out, and a flag is how one file serves two daemons. A string
value such as ``"vault:secret/corral#jwt_secret"`` is a reference, resolved by the
source that claims its scheme; a ``vault:`` reference that no source resolves is
an error.

The file's top-level tables are the sections (``[system]``, ``[supervisor]``,
``[bus]``, ``[codec]``, ``[log]``, ``[daemon]``, ``[vault]``) and ``[managers.<name>]`` tables,
whose keys besides :class:`ManagerSection`'s fields are the manager's options; naming
a manager enables it, even with an empty table. Unknown sections and keys, wrong types
and out-of-range values raise :class:`~corral.errors.ConfigError` naming the key and
where the value came from, e.g. ``corral.toml: supervisor.max_restarts: expected int,
got str``. A ``CORRAL_*`` variable that names no section is a :class:`ConfigWarning`
and is ignored; one that names a section but no key of it is an error.

Example::

    config = load_config("corral.toml")
    config.supervisor.max_restarts      # 5
    config.sources["bus.url"]           # 'env CORRAL_BUS_URL'
    config.masked()["bus"]["url"]       # 'redis://:***@redis:6379/0'

    # In tests and embedding code:
    config = Config().replace(bus=BusSection(backend="redis", url="redis://127.0.0.1:6380/0"))
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from corral.config._config import Config
from corral.config._loader import ConfigSource, ConfigWarning, load_config
from corral.config._sections import (
    MANAGER_FIELDS,
    REDIS_URL,
    BusSection,
    CodecSection,
    DaemonSection,
    LogSection,
    ManagerSection,
    Placement,
    Restart,
    Section,
    Strategy,
    SupervisorSection,
    SystemSection,
    VaultSection,
)
from corral.config._vault import VaultSource
from corral.errors import ConfigError

S = TypeVar("S", bound=Section)


def parse_options(cls: type[S], options: Mapping[str, Any], *, manager: str) -> S:
    """A manager's ``[managers.<name>]`` options as its typed ``Options`` section.

    ``cls`` is a frozen, keyword-only dataclass subclassing :class:`Section`, so
    its fields are type-checked (and bounds-checked through field metadata)::

        @dataclass(frozen=True, kw_only=True)
        class CacheOptions(Section):
            default_ttl: float = 300.0
    """
    names = sorted(f.name for f in dataclasses.fields(cls))
    for key in options:
        if key not in names:
            raise ConfigError(
                f"managers.{manager}.{key}: not an option of the {manager} manager "
                f"(options: {', '.join(names) or 'none'})",
                {"field": key, "problem": "unknown option"},
            )
    try:
        return cls(**options)
    except ConfigError as exc:
        raise ConfigError(f"managers.{manager}.{exc.message}", exc.details) from None


__all__ = [
    "MANAGER_FIELDS",
    "REDIS_URL",
    "BusSection",
    "CodecSection",
    "Config",
    "ConfigSource",
    "ConfigWarning",
    "DaemonSection",
    "LogSection",
    "ManagerSection",
    "Placement",
    "Restart",
    "Section",
    "Strategy",
    "SupervisorSection",
    "SystemSection",
    "VaultSection",
    "VaultSource",
    "load_config",
    "parse_options",
]
