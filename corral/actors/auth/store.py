"""Where the auth manager keeps what must outlive a token's signature: denylist, families, API keys.

Two backends with one interface, :class:`Store`:

- :class:`MemoryStore`, the embedded default: dictionaries with expiry, for one process;
- :class:`RedisStore`: every request is one round trip (a command, a pipeline, or
  one Lua script), keys carry the system namespace and a hash tag per identity::

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

import heapq
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from corral._redis import REDIS_ERRORS, connect
from corral.errors import BackendUnavailable

__all__ = ["MemoryStore", "RedisStore", "Rotation", "Store"]

Rotation = Literal["rotated", "retried", "reused", "revoked"]

# KEYS[1] the family hash; ARGV: presented jti, successor jti, now (ms), grace (ms), ttl (s).
_ROTATE = """
local family = redis.call('HMGET', KEYS[1], 'current', 'previous', 'rotated_at', 'revoked')
if not family[1] or family[4] == '1' then
  return 'revoked'
end
if family[1] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'current', ARGV[2], 'previous', ARGV[1], 'rotated_at', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return 'rotated'
end
if family[2] == ARGV[1] and tonumber(ARGV[3]) - tonumber(family[3]) <= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'current', ARGV[2])
  return 'retried'
end
redis.call('HSET', KEYS[1], 'revoked', '1')
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 'reused'
"""


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


@dataclass
class _Family:
    current: str
    previous: str = ""
    rotated_at: float = 0.0
    revoked: bool = False


class MemoryStore:
    """The store in a process's memory. Thread-safe: actors of one namespace may share it."""

    kind = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.denied: dict[str, tuple[float, bool]] = {}
        self.families: dict[str, tuple[float, _Family]] = {}
        self.api_keys: dict[str, tuple[float, dict[str, str]]] = {}
        self.expiries: list[tuple[float, str, str]] = []  # (when, table, key): a heap

    def is_revoked(self, jti: str, family: str | None) -> bool:
        with self.lock:
            now = self.clock()
            if self._live(self.denied.get(jti), now):
                return True
            if family is None:
                return False
            entry = self.families.get(family)
            return entry is not None and self._live(entry, now) and entry[1].revoked

    def deny(self, jti: str, ttl: int) -> None:
        with self.lock:
            self._purge()
            if not self._live(self.denied.get(jti), self.clock()):  # NX: the first TTL stays
                self.denied[jti] = (self._expire("denied", jti, ttl), True)

    def is_denied(self, jti: str) -> bool:
        with self.lock:
            return self._live(self.denied.get(jti), self.clock())

    def start_family(self, family: str, jti: str, ttl: int) -> None:
        with self.lock:
            self._purge()
            self.families[family] = (self._expire("families", family, ttl), _Family(current=jti))

    def rotate(
        self, family: str, presented: str, successor: str, *, grace: float, ttl: int
    ) -> Rotation:
        with self.lock:
            now = self.clock()
            entry = self.families.get(family)
            if entry is None or not self._live(entry, now) or entry[1].revoked:
                return "revoked"
            record = entry[1]
            if record.current == presented:
                record.current, record.previous, record.rotated_at = successor, presented, now
                self.families[family] = (self._expire("families", family, ttl), record)
                return "rotated"
            if record.previous == presented and now - record.rotated_at <= grace:
                record.current = successor
                return "retried"
            record.revoked = True
            self.families[family] = (self._expire("families", family, ttl), record)
            return "reused"

    def revoke_family(self, family: str, ttl: int) -> None:
        with self.lock:
            self._purge()
            entry = self.families.get(family)
            record = entry[1] if entry is not None else _Family(current="")
            record.revoked = True
            self.families[family] = (self._expire("families", family, ttl), record)

    def put_api_key(self, key_id: str, record: dict[str, str], ttl: int | None) -> None:
        with self.lock:
            self._purge()
            expires = self._expire("api_keys", key_id, ttl) if ttl is not None else float("inf")
            self.api_keys[key_id] = (expires, dict(record))

    def get_api_key(self, key_id: str) -> dict[str, str] | None:
        with self.lock:
            entry = self.api_keys.get(key_id)
            return dict(entry[1]) if entry and self._live(entry, self.clock()) else None

    def delete_api_key(self, key_id: str) -> dict[str, str] | None:
        with self.lock:
            entry = self.api_keys.pop(key_id, None)
            return entry[1] if entry and self._live(entry, self.clock()) else None

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None

    def _expire(self, table: str, key: str, ttl: int) -> float:
        when = self.clock() + ttl
        heapq.heappush(self.expiries, (when, table, key))
        return when

    def _purge(self) -> None:
        """Drop what has expired; an entry whose expiry moved on since is left alone."""
        now = self.clock()
        tables: dict[str, dict[str, tuple[float, Any]]] = {
            "denied": self.denied,
            "families": self.families,
            "api_keys": self.api_keys,
        }
        while self.expiries and self.expiries[0][0] <= now:
            _, table_name, key = heapq.heappop(self.expiries)
            table = tables[table_name]
            entry = table.get(key)
            if entry is not None and not self._live(entry, now):
                del table[key]

    @staticmethod
    def _live(entry: tuple[float, Any] | None, now: float) -> bool:
        return entry is not None and entry[0] > now


class RedisStore:
    """The store in Redis; see the module docstring for the keys."""

    kind = "redis"

    def __init__(self, url: str, *, namespace: str, timeout: float) -> None:
        self.url = url
        self.prefix = f"{namespace}:auth"
        self.client = connect(
            url,
            setting="managers.auth.redis_url",
            decode_responses=True,
            socket_timeout=timeout,
            connect_timeout=timeout,
            health_check_interval=30,
        )
        self.rotate_script = self.client.register_script(_ROTATE)

    def is_revoked(self, jti: str, family: str | None) -> bool:
        with self._backend("check the denylist"):
            if family is None:
                return bool(self.client.exists(self._deny_key(jti)))
            pipe = self.client.pipeline(transaction=False)
            pipe.exists(self._deny_key(jti))
            pipe.hget(self._family_key(family), "revoked")
            denied, revoked = pipe.execute()
            return bool(denied) or revoked == "1"

    def deny(self, jti: str, ttl: int) -> None:
        with self._backend("deny a token"):
            self.client.set(self._deny_key(jti), 1, ex=max(1, ttl), nx=True)

    def is_denied(self, jti: str) -> bool:
        with self._backend("check the denylist"):
            return bool(self.client.exists(self._deny_key(jti)))

    def start_family(self, family: str, jti: str, ttl: int) -> None:
        with self._backend("start a token family"):
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(self._family_key(family), "current", jti)
            pipe.expire(self._family_key(family), max(1, ttl))
            pipe.execute()

    def rotate(
        self, family: str, presented: str, successor: str, *, grace: float, ttl: int
    ) -> Rotation:
        now_ms = int(time.time() * 1000)
        with self._backend("rotate a refresh token"):
            outcome = self.rotate_script(
                keys=[self._family_key(family)],
                args=[presented, successor, now_ms, int(grace * 1000), max(1, ttl)],
            )
        if outcome not in ("rotated", "retried", "reused", "revoked"):
            raise BackendUnavailable(f"unexpected answer from the rotation script: {outcome!r}")
        rotation: Rotation = outcome
        return rotation

    def revoke_family(self, family: str, ttl: int) -> None:
        with self._backend("revoke a token family"):
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(self._family_key(family), "revoked", "1")
            pipe.expire(self._family_key(family), max(1, ttl))
            pipe.execute()

    def put_api_key(self, key_id: str, record: dict[str, str], ttl: int | None) -> None:
        with self._backend("store an API key"):
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(self._api_key_key(key_id), mapping=cast(dict[Any, Any], record))
            if ttl is not None:
                pipe.expire(self._api_key_key(key_id), max(1, ttl))
            pipe.execute()

    def get_api_key(self, key_id: str) -> dict[str, str] | None:
        with self._backend("read an API key"):
            record = self.client.hgetall(self._api_key_key(key_id))
        return cast(dict[str, str], record) or None

    def delete_api_key(self, key_id: str) -> dict[str, str] | None:
        with self._backend("revoke an API key"):
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(self._api_key_key(key_id))
            pipe.delete(self._api_key_key(key_id))
            record, _ = pipe.execute()
        return cast(dict[str, str], record) or None

    def ping(self) -> None:
        with self._backend("ping"):
            self.client.ping()

    def close(self) -> None:
        self.client.close()

    def _deny_key(self, jti: str) -> str:
        return f"{self.prefix}:deny:{{{jti}}}"

    def _family_key(self, family: str) -> str:
        return f"{self.prefix}:family:{{{family}}}"

    def _api_key_key(self, key_id: str) -> str:
        return f"{self.prefix}:api_key:{{{key_id}}}"

    @contextmanager
    def _backend(self, doing: str) -> Iterator[None]:
        try:
            yield
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(
                f"auth could not {doing}: redis: {exc}", {"backend": "redis"}
            ) from None
