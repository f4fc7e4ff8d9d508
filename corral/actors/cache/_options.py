"""The cache manager's options: named backends and limits on keys and values.

::

    [managers.cache]
    default_backend = "main"
    max_value_size = 524288

    [managers.cache.backends.main]
    type = "tiered"          # memory | redis | tiered (L1 memory in front of L2 Redis)
    strategy = "lru"         # ttl | lru | lfu  (the memory store's eviction)
    max_size = 10000
    default_ttl = 300.0
    serializer = "msgpack"   # msgpack | json | pickle (signed with signing_keys)
    stale_ttl = 30.0         # after its TTL a value is served, stale, while one caller refreshes
    early_ttl = 5.0          # from this long before its TTL ends, one caller refreshes it
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from corral.actors.cache._values import Serializer
from corral.config import REDIS_URL, Section
from corral.encryption import FieldCipher
from corral.errors import ConfigError
from corral.messages.base import MAX_TTL

__all__ = ["BackendOptions", "CacheOptions"]

BackendType = Literal["memory", "redis", "tiered"]
Strategy = Literal["ttl", "lru", "lfu"]

_POSITIVE = {"gt": 0}
_SIZE = {"ge": 1}
_TTL = {"gt": 0, "le": MAX_TTL}


@dataclass(frozen=True, kw_only=True, repr=False)
class BackendOptions(Section):
    """One ``[managers.cache.backends.<name>]`` table.

    ``memory``: a cachetools store with ``strategy``, ``max_size``, ``default_ttl``.
    ``redis``: Redis at ``url`` ("" = the system's Redis), its keys under
    ``<namespace>:cache:<backend name>`` (``namespace`` "" = the system's), with a
    circuit breaker; with ``fallback``, an in-memory store of ``l1_max_size`` serves
    reads and sets while the breaker is open.
    ``tiered``: ``redis`` plus an L1 memory store (``l1_max_size`` entries, each kept
    at most ``l1_ttl`` seconds) kept coherent across nodes through Redis pub/sub and,
    with ``track_external_writes``, Redis's client-side caching invalidations (``CLIENT
    TRACKING ... BCAST``), which also see writes made outside corral.

    Every type: ``serializer`` (msgpack, json, or pickle: each value signed with the
    first of ``signing_keys``, and unpickled only when one of them verifies it);
    ``encryption_keys`` (Fernet: every value stored encrypted, the first key encrypts);
    ``stale_ttl`` and ``early_ttl``, the defaults of ``CacheSet``.
    """

    type: BackendType = "memory"
    strategy: Strategy = "lru"
    max_size: int = field(default=10_000, metadata=_SIZE)
    default_ttl: float | None = field(default=None, metadata=_TTL)
    serializer: Serializer = "msgpack"
    signing_keys: list[str] = field(default_factory=list, metadata={"secret": True})
    encryption_keys: list[str] = field(default_factory=list, metadata={"secret": True})
    """Fernet keys: every value is stored encrypted (the first encrypts, any decrypts)."""
    stale_ttl: float | None = field(default=None, metadata=_TTL)
    early_ttl: float | None = field(default=None, metadata=_TTL)
    url: str = field(default="", metadata=REDIS_URL)
    namespace: str = ""
    max_connections: int = field(default=16, metadata=_SIZE)
    socket_timeout: float = field(default=0.5, metadata=_POSITIVE)
    fallback: bool = True
    breaker_threshold: int = field(default=3, metadata=_SIZE)
    breaker_reset_timeout: float = field(default=5.0, metadata=_POSITIVE)
    l1_max_size: int = field(default=1_000, metadata=_SIZE)
    l1_ttl: float = field(default=60.0, metadata=_TTL)
    scan_batch: int = field(default=500, metadata=_SIZE)
    track_external_writes: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encryption_keys:
            try:
                FieldCipher(self.encryption_keys)
            except ConfigError as exc:
                self._fail("encryption_keys", exc.message)
        if self.serializer == "pickle" and not self.signing_keys:
            self._fail(
                "serializer",
                "pickle needs signing_keys: an unsigned pickle is never unpickled",
                related="signing_keys",
            )


_BACKEND_NAME = re.compile(r"[A-Za-z0-9_.-]+")
"""A backend's name is in its Redis prefix, ``<namespace>:cache:<name>``: nothing that
would read as a hash tag or a glob."""
_BACKEND_FIELDS = frozenset(f.name for f in dataclasses.fields(BackendOptions))
_DEFAULT_BACKENDS: dict[str, dict[str, Any]] = {"memory": {}, "redis": {"type": "redis"}}
"""The backend when none is configured: ``redis`` when the system has Redis, else ``memory``."""


@dataclass(frozen=True, kw_only=True, repr=False)
class CacheOptions(Section):
    """``[managers.cache]``: the backends by name, the default one, and input limits."""

    backends: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The backends by name. None configured: one ``redis`` backend (named ``redis``) when
    the system has Redis (the bus is on Redis), else one ``memory`` backend (``memory``)."""
    default_backend: str = ""
    """The backend of requests that name none; "" means the first one."""
    max_key_length: int = field(default=1024, metadata=_SIZE)
    """In UTF-8 bytes."""
    max_value_size: int = field(default=512 * 1024, metadata=_SIZE)
    """In msgpack-encoded bytes."""

    def __post_init__(self) -> None:
        super().__post_init__()
        names = list(self.backend_options()) if self.backends else list(_DEFAULT_BACKENDS)
        if self.default_backend and self.default_backend not in names:
            self._fail(
                "default_backend",
                f"no backend named {self.default_backend!r} (backends: {', '.join(names)})",
                related="backends",
            )

    def backend_options(self, redis_url: str = "") -> dict[str, BackendOptions]:
        """Each backend's table, checked: errors name ``backends.<name>.<key>``.

        With no backends configured, the default one for a system whose Redis is
        ``redis_url`` ("" for none)::

            CacheOptions().backend_options("redis://127.0.0.1:6379/0")["redis"].type  # 'redis'
        """
        default = "redis" if redis_url else "memory"
        tables = self.backends or {default: _DEFAULT_BACKENDS[default]}
        parsed: dict[str, BackendOptions] = {}
        for name, table in tables.items():
            if not _BACKEND_NAME.fullmatch(name):
                self._fail(
                    "backends",
                    "a backend name is letters, digits, '_', '-' and '.'",
                    path=f".{name}",
                )
            unknown = sorted(set(table) - _BACKEND_FIELDS)
            if unknown:
                self._fail(
                    "backends",
                    f"not a backend option (options: {', '.join(sorted(_BACKEND_FIELDS))})",
                    path=f".{name}.{unknown[0]}",
                )
            try:
                parsed[name] = BackendOptions(**table)
            except ConfigError as exc:
                raise ConfigError(
                    f"backends.{name}.{exc.message}", {**exc.details, "field": "backends"}
                ) from None
        return parsed
