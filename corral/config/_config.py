"""The Config object: every section, the managers, and where each value came from."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict, Unpack

from corral.config._sections import (
    SECTIONS,
    BusSection,
    CodecSection,
    DaemonSection,
    LogSection,
    ManagerSection,
    Section,
    SupervisorSection,
    SystemSection,
    VaultSection,
)
from corral.config._values import hide, mask

DEFAULT = "default"
CODE = "code"

_NO_DEFAULT = object()


class SectionChanges(TypedDict, total=False):
    """What :meth:`Config.replace` accepts."""

    system: SystemSection
    supervisor: SupervisorSection
    bus: BusSection
    codec: CodecSection
    log: LogSection
    daemon: DaemonSection
    vault: VaultSection
    managers: Mapping[str, ManagerSection]


@dataclass(frozen=True)
class Config:
    """The whole configuration. ``Config()`` is the built-in defaults.

    ``sources`` maps every dotted key (``bus.url``, ``managers.cache.critical``,
    ``managers.cache.<option>``) to where its value came from: ``default``,
    ``env CORRAL_BUS_URL``, ``file <path>``, a ConfigSource's name,
    ``<source> (reference in <where>)`` for a resolved reference, or ``code``
    for a value set by constructing or replacing sections in Python. Keys missing
    from the ``sources`` given are filled in on construction.

    ``secret_keys`` are the dotted keys whose values came from a ConfigSource;
    :meth:`masked` hides them. Neither field takes part in ``==`` or ``repr()``.
    """

    system: SystemSection = field(default_factory=SystemSection)
    supervisor: SupervisorSection = field(default_factory=SupervisorSection)
    bus: BusSection = field(default_factory=BusSection)
    codec: CodecSection = field(default_factory=CodecSection)
    log: LogSection = field(default_factory=LogSection)
    daemon: DaemonSection = field(default_factory=DaemonSection)
    vault: VaultSection = field(default_factory=VaultSection)
    managers: dict[str, ManagerSection] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    secret_keys: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        given = self.sources
        sources = {
            key: given.get(key) or (DEFAULT if value == default else CODE)
            for key, value, default in self._leaves()
        }
        object.__setattr__(self, "sources", sources)

    def _leaves(self) -> Iterator[tuple[str, Any, Any]]:
        """Every leaf as (dotted key, value, built-in default)."""
        for name in SECTIONS:
            section: Section = getattr(self, name)
            defaults = type(section)()
            for f in dataclasses.fields(section):
                yield f"{name}.{f.name}", getattr(section, f.name), getattr(defaults, f.name)
        manager_defaults = ManagerSection()
        for name, manager in self.managers.items():
            for f in dataclasses.fields(manager):
                if f.name != "options":
                    value = getattr(manager, f.name)
                    yield f"managers.{name}.{f.name}", value, getattr(manager_defaults, f.name)
            for key, value in manager.options.items():
                yield f"managers.{name}.{key}", value, _NO_DEFAULT

    def changes(self, other: Config) -> list[str]:
        """The dotted keys whose values differ in ``other`` (or that only one of them has).

        >>> Config().changes(Config().replace(daemon=DaemonSection(port=9000)))
        ['daemon.port']
        """
        mine = {key: value for key, value, _ in self._leaves()}
        theirs = {key: value for key, value, _ in other._leaves()}
        return sorted(
            key
            for key in mine.keys() | theirs.keys()
            if key not in mine or key not in theirs or mine[key] != theirs[key]
        )

    def replace(self, **sections: Unpack[SectionChanges]) -> Config:
        """A copy with whole sections (or all managers) replaced; their values count as ``code``.

        >>> Config().replace(daemon=DaemonSection(port=9000)).sources["daemon.port"]
        'code'
        """
        stale = tuple(f"{name}." for name in sections)
        changes: dict[str, Any] = dict(sections)
        if "managers" in sections:
            changes["managers"] = dict(sections["managers"])
        return dataclasses.replace(
            self,
            **changes,
            sources={k: v for k, v in self.sources.items() if not k.startswith(stale)},
            secret_keys=frozenset(k for k in self.secret_keys if not k.startswith(stale)),
        )

    def masked(self) -> dict[str, dict[str, Any]]:
        """The config as plain data, safe to print: secrets are ``***``, URL passwords too.

        Hidden whole: secret fields (``codec.signing_keys``, ``vault.token``,
        ``vault.secret_id``), every value from a
        ConfigSource, and manager options with secret-sounding names
        (``jwt_secret``, ``password``, ``api_key``). Everywhere else, URL
        passwords are replaced (``redis://:***@host``). Managers are shown as in
        the TOML file, their options beside their fields.
        """
        shown: dict[str, dict[str, Any]] = {}
        for name in SECTIONS:
            section: Section = getattr(self, name)
            shown[name] = {
                f.name: self._shown(f"{name}.{f.name}", getattr(section, f.name), f.metadata)
                for f in dataclasses.fields(section)
            }
        shown["managers"] = {}
        for name, manager in self.managers.items():
            table = {
                f.name: self._shown(f"managers.{name}.{f.name}", getattr(manager, f.name), {})
                for f in dataclasses.fields(manager)
                if f.name != "options"
            }
            # mask() of the whole options table applies the secret-name rule to its keys.
            table.update(
                (key, hide(value) if f"managers.{name}.{key}" in self.secret_keys else value)
                for key, value in mask(manager.options).items()
            )
            shown["managers"][name] = table
        return shown

    def _shown(self, key: str, value: Any, metadata: Mapping[str, Any]) -> Any:
        if metadata.get("secret") or key in self.secret_keys:
            return hide(value)
        return mask(value)
