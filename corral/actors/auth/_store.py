"""Where the auth manager keeps what must outlive a token's signature: denylist, families, API keys.

Two backends with one interface, :class:`Store`:

- ``MemoryStore`` (``_memory.py``), the embedded default: dictionaries with expiry,
  for one process;
- ``RedisStore`` (``_redis.py``): every request is one round trip (a command, a
  pipeline, or one Lua script), keys carry the system namespace and a hash tag per
  identity::

      corral:auth:deny:{<jti>}              SET 1 EX <remaining life> NX
      corral:auth:family:{<family>}         HASH current, previous, rotated_at, revoked
      corral:auth:api_key:{<key_id>}        HASH hash, owner, scopes, name, created_at, expires_at

A token *family* is every token issued from one login: its refresh tokens
rotate, and :meth:`Store.rotate` says whether the presented one was the current
one (``rotated``), the one just retired and still within the grace window
(``retried``), an older one (``reused``: the family is revoked from then on), or
one of a family that is revoked or gone (``revoked``).

Redis failures surface as :class:`~corral.errors.BackendUnavailable`, never as
redis-py exceptions.
"""

from __future__ import annotations

from typing import Literal, Protocol

__all__ = ["Rotation", "Store"]

Rotation = Literal["rotated", "retried", "reused", "revoked"]


class Store(Protocol):
    """What the auth manager needs from a backend. TTLs are whole seconds, at least 1."""

    kind: str

    def is_revoked(self, jti: str, family: str | None) -> bool:
        """Whether the jti is denied or its family revoked: checked on every validation."""
        ...

    def deny(self, jti: str, ttl: int) -> None: ...

    def is_denied(self, jti: str) -> bool: ...

    def start_family(self, family: str, jti: str, ttl: int) -> None: ...

    def rotate(
        self, family: str, presented: str, successor: str, *, grace: float, ttl: int
    ) -> Rotation: ...

    def revoke_family(self, family: str, ttl: int) -> None: ...

    def put_api_key(self, key_id: str, record: dict[str, str], ttl: int | None) -> None: ...

    def get_api_key(self, key_id: str) -> dict[str, str] | None: ...

    def delete_api_key(self, key_id: str) -> dict[str, str] | None: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...
