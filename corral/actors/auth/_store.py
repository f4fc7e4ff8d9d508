"""Where the auth manager keeps what must outlive a token's signature: denylist, families, API keys.

Two backends with one interface, :class:`Store`:

- ``MemoryStore`` (``_memory.py``), the embedded default: dictionaries with expiry,
  for one process;
- ``RedisStore`` (``_redis.py``): every request is one round trip (a command, a
  pipeline, or one Lua script), keys carry the system namespace and a hash tag per
  identity::

      corral:auth:deny:{<jti>}              SET 1 EX <remaining life> NX
      corral:auth:family:{<family>}         HASH current, access, issued_at, previous,
                                                 rotated_at, revoked, deadline
      corral:auth:user:{<subject>}          STRING not-before (unix seconds) EX <max lifetime>
      corral:auth:api_key:{<key_id>}        HASH hash, owner, scopes, name, created_at,
                                                 expires_at, last_used_at
      corral:auth:owner:{<owner>}           SET key ids of the owner's API keys

A token *family* is every token issued from one login: its refresh tokens
rotate, and :meth:`Store.rotate` says whether the presented one was the current
one (``rotated``), the one just retired and still within the grace window
(``retried``: the caller gets the pair the rotation made, to sign again
identically), an older one (``reused``: the family is revoked from then on), one
of a family past its absolute deadline (``expired``), or one of a family that is
revoked or gone (``revoked``)::

    outcome, pair, deadline = store.rotate("fam", "old-jti", Pair("new", "acc", 1700000000),
                                           grace=10.0, ttl=1_209_615)

Redis failures surface as :class:`~corral.errors.BackendUnavailable`, never as
redis-py exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = ["Pair", "Rotation", "Store"]

Rotation = Literal["rotated", "retried", "reused", "expired", "revoked"]


@dataclass(frozen=True)
class Pair:
    """What signs a token pair again identically: the refresh and access jti and their iat."""

    refresh_jti: str
    access_jti: str
    issued_at: int


class Store(Protocol):
    """What the auth manager needs from a backend. TTLs are whole seconds, at least 1."""

    kind: str

    def is_revoked(self, jti: str, family: str | None, subject: str, issued_at: float) -> bool:
        """Whether the jti is denied, its family revoked, or it was issued before its
        subject's not-before: checked on every validation."""
        ...

    def revoke_user(self, subject: str, not_before: int, ttl: int) -> None:
        """Refuse every token of ``subject`` issued before ``not_before`` (unix seconds)."""
        ...

    def not_before(self, subject: str) -> int:
        """The subject's not-before (unix seconds), 0 when none."""
        ...

    def deny(self, jti: str, ttl: int) -> None: ...

    def is_denied(self, jti: str) -> bool: ...

    def start_family(self, family: str, pair: Pair, *, deadline: int, ttl: int) -> None:
        """A new family whose refresh tokens rotate until ``deadline`` (unix seconds)."""
        ...

    def rotate(
        self, family: str, presented: str, successor: Pair, *, grace: float, ttl: int
    ) -> tuple[Rotation, Pair, int]:
        """The outcome, the pair to sign, and the family's deadline (unix seconds)."""
        ...

    def revoke_family(self, family: str, ttl: int) -> None: ...

    def put_api_key(self, key_id: str, record: dict[str, str], ttl: int | None) -> None: ...

    def get_api_key(self, key_id: str) -> dict[str, str] | None: ...

    def delete_api_key(self, key_id: str) -> dict[str, str] | None: ...

    def update_api_key(self, key_id: str, changes: dict[str, str]) -> dict[str, str] | None:
        """Set fields of an existing key; its record after, None when there is no such key."""
        ...

    def api_keys_of(self, owner: str) -> dict[str, dict[str, str]]:
        """Every live key of ``owner``, by key id."""
        ...

    def ping(self) -> None: ...

    def close(self) -> None: ...
