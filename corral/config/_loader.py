"""load_config: defaults < environment < TOML file < ConfigSources < flags, merged key by key."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import tomllib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, get_origin

from corral.config._config import Config
from corral.config._sections import (
    MANAGER_FIELDS,
    SECTIONS,
    ManagerSection,
    VaultSection,
    field_types,
)
from corral.config._values import Mismatch, Text, convert, split_list
from corral.config._vault import VaultSource
from corral.errors import ConfigError

Key = tuple[str, ...]
"""A dotted key as parts: ``("bus", "url")``, ``("managers", "cache", "critical")``."""

CONFIG_VAR = "CORRAL_CONFIG"

_ENV_PREFIX = "CORRAL_"
_REFERENCE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_ENV_KEYS = [
    f"{section}_{name}".upper() for section, cls in SECTIONS.items() for name in field_types(cls)
]
_ENV_SECTIONS = tuple(f"{section.upper()}_" for section in [*SECTIONS, "managers"])
_MANAGERS_HINT = (
    " (CORRAL_MANAGERS_<NAME>_<FIELD> sets a field of a manager; its options are set in the file)"
)


class ConfigWarning(UserWarning):
    """Something in the config that corral ignores, such as a ``CORRAL_*`` variable it does
    not know (Kubernetes sets ``<SERVICE>_PORT`` variables for every Service)."""


class ConfigSource(Protocol):
    """A layer above the file, such as Vault; later sources beat earlier ones.

    ``values()`` has the shape of a parsed TOML file: section -> key -> value,
    with ``managers`` -> manager name -> table. ``resolve()`` turns a reference
    such as ``"vault:secret/corral#jwt_secret"`` into its value, returns None
    when the reference is not for this source, and raises :class:`ConfigError`
    when it is but cannot be resolved. Values from a source count as secrets.
    """

    @property
    def name(self) -> str: ...

    def values(self) -> Mapping[str, Mapping[str, Any]]: ...

    def resolve(self, reference: str) -> Any | None: ...


@dataclass(frozen=True)
class _Origin:
    label: str
    """For Config.sources: ``env CORRAL_BUS_URL``, ``file corral.toml``, ``vault``."""
    where: str
    """For error messages: ``env CORRAL_BUS_URL``, ``corral.toml``, ``source vault``."""
    secret: bool = False


@dataclass(frozen=True)
class _Entry:
    value: Any
    origin: _Origin
    text: bool = False
    """The value is environment text (or a list of it), parsed as it is converted."""
    pending: bool = False
    """The value holds references: it is resolved and converted once every layer is read."""


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    sources: Sequence[ConfigSource] | None = None,
    flags: Mapping[str, tuple[str, Any]] | None = None,
) -> Config:
    """Build the Config from the environment, the TOML file at ``path``, ``sources`` and ``flags``.

    ``env`` defaults to ``os.environ``; ``path`` defaults to ``$CORRAL_CONFIG``,
    and with neither there is no file. ``sources`` defaults to the Vault that the
    ``[vault]`` section read so far describes (none while ``vault.url`` is empty);
    ``sources=[]`` reads no source. ``flags`` are the top layer, beating every
    source: dotted key -> (flag, value), such as ``{"daemon.port": ("--port", 9000)}``,
    whose source is then ``flag --port``. Raises :class:`ConfigError` naming the key
    and where its value came from; a ``CORRAL_*`` variable that names no section is
    ignored with a :class:`ConfigWarning`.
    """
    environ = os.environ if env is None else env
    entries = _read_env(environ)
    if path is None:
        path = environ.get(CONFIG_VAR) or None
    if path is not None:
        entries.update(_read_file(os.fspath(path)))
    flagged = _read_flags(flags or {})
    with contextlib.ExitStack() as stack:
        if sources is None:
            # Built here, so closed here once read: its secrets are in the Config by then.
            lower = {**entries, **flagged}
            sources = [stack.enter_context(contextlib.closing(v)) for v in _vault_sources(lower)]
        for source in sources:
            origin = _Origin(source.name, f"source {source.name}", secret=True)
            # Secret stores hold text, so a source's strings are parsed like environment values.
            entries.update(_read_document(source.values(), origin, text=True))
        entries.update(flagged)
        return _build({key: _finish(key, entry, sources) for key, entry in entries.items()})


def _vault_sources(entries: Mapping[Key, _Entry]) -> list[VaultSource]:
    """A VaultSource when the ``vault`` entries of the lower layers set ``vault.url``."""
    found = {key: _finish(key, entry, ()) for key, entry in entries.items() if key[0] == "vault"}
    origins = {key: entry.origin for key, entry in found.items()}
    values = {key[1]: entry.value for key, entry in found.items()}
    section: VaultSection = _construct(VaultSection, values, ("vault",), origins)
    return [VaultSource(section)] if section.url else []


def _read_env(environ: Mapping[str, str]) -> dict[Key, _Entry]:
    entries: dict[Key, _Entry] = {}
    for var in sorted(environ):
        if not var.startswith(_ENV_PREFIX) or var == CONFIG_VAR:
            continue
        origin = _Origin(f"env {var}", f"env {var}")
        rest = var[len(_ENV_PREFIX) :]
        key = _env_key(rest)
        if key is None:
            hint = (
                _MANAGERS_HINT
                if rest.startswith("MANAGERS_")
                else _suggest(rest, _ENV_KEYS, prefix=_ENV_PREFIX)
            )
            if rest.startswith(_ENV_SECTIONS):
                raise ConfigError(f"env {var}: not a corral setting{hint}", {"variable": var})
            # Not corral's to judge: Kubernetes, say, sets CORRAL_PORT for a Service "corral".
            warnings.warn(f"env {var}: not a corral setting, ignored{hint}", ConfigWarning, 3)
            continue
        text = environ[var]
        tp = _type_of(key)
        # Split before resolving, so that each item of a list may be a reference.
        value = split_list(text) if get_origin(tp) is list else text
        entries[key] = _entry(key, tp, value, origin, text=True)
    return entries


def _read_flags(flags: Mapping[str, tuple[str, Any]]) -> dict[Key, _Entry]:
    entries: dict[Key, _Entry] = {}
    for dotted, (flag, value) in flags.items():
        parts = dotted.split(".")
        if len(parts) == 2 and parts[0] in SECTIONS and parts[1] in field_types(SECTIONS[parts[0]]):
            document: dict[str, Any] = {parts[0]: {parts[1]: value}}
        elif len(parts) == 3 and parts[0] == "managers":
            document = {"managers": {parts[1]: {parts[2]: value}}}
        else:
            raise ValueError(f"not a setting: {dotted!r}")
        entries.update(_read_document(document, _Origin(f"flag {flag}", f"flag {flag}")))
    return entries


def _env_key(rest: str) -> Key | None:
    """``BUS_URL`` -> ``("bus", "url")``; ``MANAGERS_RATE_LIMIT_CRITICAL`` -> a manager's field."""
    for section in sorted(SECTIONS, key=len, reverse=True):
        head = f"{section.upper()}_"
        if rest.startswith(head):
            name = rest[len(head) :].lower()
            return (section, name) if name in field_types(SECTIONS[section]) else None
    head = "MANAGERS_"
    if rest.startswith(head):
        # Manager names may hold underscores too, so the field is matched from the end.
        for name in sorted(MANAGER_FIELDS, key=len, reverse=True):
            tail = f"_{name.upper()}"
            if rest.endswith(tail) and (manager := rest[len(head) : -len(tail)]):
                return ("managers", manager.lower(), name)
    return None


def _read_file(path: str) -> dict[Key, _Entry]:
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}", {"file": path}) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}", {"file": path}) from exc
    return _read_document(document, _Origin(f"file {path}", path))


def _read_document(
    document: Mapping[str, Any], origin: _Origin, *, text: bool = False
) -> dict[Key, _Entry]:
    """The entries of a parsed TOML file or a source's values; ``text`` as for env values."""
    entries: dict[Key, _Entry] = {}
    for section, table in document.items():
        if section == "managers":
            for manager, spec in _table(table, (section,), origin).items():
                # Naming a manager enables it, even with a table that sets nothing.
                entries[(section, manager)] = _Entry(None, origin)
                for name, value in _table(spec, (section, manager), origin).items():
                    key: Key = (section, manager, name)
                    entries[key] = _entry(key, _type_of(key), value, origin, text=text)
        elif section in SECTIONS:
            known = field_types(SECTIONS[section])
            for name, value in _table(table, (section,), origin).items():
                key = (section, name)
                if name not in known:
                    candidates = [f"{section}.{other}" for other in known]
                    raise _error(origin, key, "unknown key" + _suggest(_dotted(key), candidates))
                entries[key] = _entry(key, known[name], value, origin, text=text)
        else:
            candidates = [*SECTIONS, "managers"]
            raise _error(origin, (section,), "unknown section" + _suggest(section, candidates))
    return entries


def _table(value: Any, key: Key, origin: _Origin) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _error(origin, key, f"expected a table, got {type(value).__name__}")
    return value


def _type_of(key: Key) -> Any:
    if key[0] == "managers":
        return field_types(ManagerSection)[key[2]] if key[2] in MANAGER_FIELDS else Any
    return field_types(SECTIONS[key[0]])[key[1]]


def _entry(key: Key, tp: Any, value: Any, origin: _Origin, *, text: bool = False) -> _Entry:
    if _has_reference(value):
        return _Entry(value, origin, text=text, pending=True)
    return _Entry(_convert(key, tp, value, origin, text=text), origin)


def _has_reference(value: Any) -> bool:
    if isinstance(value, str):
        return _REFERENCE.match(value) is not None
    if isinstance(value, list):
        return any(_has_reference(item) for item in value)
    if isinstance(value, Mapping):
        return any(_has_reference(item) for item in value.values())
    return False


def _convert(key: Key, tp: Any, value: Any, origin: _Origin, *, text: bool) -> Any:
    if text and tp is Any and isinstance(value, str):
        # A manager's option: its type is known when the manager parses its options.
        return Text(value, origin.label, secret=origin.secret)
    try:
        return convert(tp, value, text=text)
    except Mismatch as exc:
        # A value resolved from a secret store is not repeated in the message.
        got = f"a value from {origin.label}" if origin.secret else exc.got
        raise _error(origin, key, f"expected {exc.expected}, got {got}", path=exc.path) from None


def _finish(key: Key, entry: _Entry, sources: Sequence[ConfigSource]) -> _Entry:
    """The entry with its references resolved and its value converted."""
    if not entry.pending:
        return entry
    resolvers: list[str] = []
    value = _resolve(key, entry.value, entry.origin, sources, resolvers)
    origin = entry.origin
    text = entry.text
    if resolvers:
        origin = _Origin(
            f"{', '.join(resolvers)} (reference in {origin.label})", origin.where, secret=True
        )
        # Likewise a whole value resolved to a string.
        text = text or isinstance(entry.value, str)
    return _Entry(_convert(key, _type_of(key), value, origin, text=text), origin)


def _resolve(
    key: Key, value: Any, origin: _Origin, sources: Sequence[ConfigSource], resolvers: list[str]
) -> Any:
    """``value`` with each reference in it replaced; appends the sources that did it."""
    if isinstance(value, list):
        return [_resolve(key, item, origin, sources, resolvers) for item in value]
    if isinstance(value, Mapping):
        return {k: _resolve(key, item, origin, sources, resolvers) for k, item in value.items()}
    if not isinstance(value, str) or not _REFERENCE.match(value):
        return value
    for source in reversed(sources):
        try:
            resolved = source.resolve(value)
        except ConfigError as exc:
            raise _error(origin, key, f"cannot resolve {value!r}: {exc.message}") from exc
        if resolved is not None:
            if source.name not in resolvers:
                resolvers.append(source.name)
            return resolved
    if value.startswith("vault:"):
        if not sources:
            raise _error(origin, key, f"cannot resolve {value!r}: no Vault source is configured")
        names = ", ".join(source.name for source in sources)
        raise _error(origin, key, f"cannot resolve {value!r}: no source resolves it ({names})")
    # Any other "scheme:" string that no source claims is a plain value (a URL, say).
    return value


def _build(entries: Mapping[Key, _Entry]) -> Config:
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    managers: dict[str, dict[str, Any]] = {}
    for key, entry in entries.items():
        if key[0] == "managers":
            table = managers.setdefault(key[1], {"options": {}})
            if len(key) == 2:  # the manager's table, named
                continue
            name = key[2]
            if name in MANAGER_FIELDS:
                table[name] = entry.value
            else:
                table["options"][name] = entry.value
        else:
            values[key[0]][key[1]] = entry.value
    origins = {key: entry.origin for key, entry in entries.items()}
    settings = {key: entry for key, entry in entries.items() if not _is_manager_table(key)}
    sections = {
        name: _construct(cls, values[name], (name,), origins) for name, cls in SECTIONS.items()
    }
    return Config(
        **sections,
        managers={
            manager: _construct(ManagerSection, table, ("managers", manager), origins)
            for manager, table in managers.items()
        },
        sources={_dotted(key): entry.origin.label for key, entry in settings.items()},
        secret_keys=frozenset(_dotted(key) for key, e in settings.items() if e.origin.secret),
    )


def _is_manager_table(key: Key) -> bool:
    return key[0] == "managers" and len(key) == 2


def _construct(
    cls: type[Any], values: Mapping[str, Any], prefix: Key, origins: Mapping[Key, _Origin]
) -> Any:
    """``cls(**values)``, its bound errors told with the origins of the values involved."""
    try:
        return cls(**values)
    except ConfigError as exc:
        keys = [(*prefix, name) for name in (exc.details["field"], *exc.details["related"])]
        where = [origins[key].where for key in keys if key in origins]
        dotted = _dotted(keys[0])
        raise ConfigError(
            f"{', '.join(dict.fromkeys(where))}: {dotted}: {exc.details['problem']}",
            {"key": dotted},
        ) from None


def _error(origin: _Origin, key: Key, problem: str, *, path: str = "") -> ConfigError:
    dotted = _dotted(key) + path
    return ConfigError(
        f"{origin.where}: {dotted}: {problem}", {"key": dotted, "source": origin.label}
    )


def _dotted(key: Key) -> str:
    return ".".join(key)


def _suggest(name: str, candidates: Sequence[str], *, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""
