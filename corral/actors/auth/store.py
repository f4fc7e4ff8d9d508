"""Where the auth manager keeps what must outlive a token's signature: denylist, families, API keys.

Two backends with one interface, :class:`Store`:

- :class:`MemoryStore`, the embedded default: dictionaries with expiry, for one process;
- :class:`RedisStore`: every request is one round trip (a command, a pipeline, or
  one Lua script), keys carry the system namespace and a hash tag per identity::

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

import heapq
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from corral._redis import REDIS_ERRORS, connect
from corral.errors import BackendUnavailable

__all__ = ["MemoryStore", "Pair", "RedisStore", "Rotation", "Store"]

Rotation = Literal["rotated", "retried", "reused", "expired", "revoked"]


@dataclass(frozen=True)
class Pair:
    """What signs a token pair again identically: the refresh and access jti and their iat."""

    refresh_jti: str
    access_jti: str
    issued_at: int


# KEYS[1] the family hash; ARGV: presented jti, successor refresh jti, successor access jti,
# successor iat (s), now (ms), grace (ms), ttl (s). Answers {outcome, refresh jti, access jti,
# iat, deadline}: the pair to sign (the successor, or the one a retry gets again).
_ROTATE = """
local f = redis.call('HMGET', KEYS[1], 'current', 'previous', 'rotated_at', 'revoked',
                     'access', 'issued_at', 'deadline')
local deadline = f[7] or '0'
if not f[1] or f[4] == '1' then
  return {'revoked', '', '', '0', deadline}
end
if deadline ~= '0' and tonumber(ARGV[5]) >= tonumber(deadline) * 1000 then
  return {'expired', '', '', '0', deadline}
end
if f[1] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'current', ARGV[2], 'access', ARGV[3], 'issued_at', ARGV[4],
             'previous', ARGV[1], 'rotated_at', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  return {'rotated', ARGV[2], ARGV[3], ARGV[4], deadline}
end
if f[2] == ARGV[1] and tonumber(ARGV[5]) - tonumber(f[3]) <= tonumber(ARGV[6]) then
  return {'retried', f[1], f[5] or '', f[6] or '0', deadline}
end
redis.call('HSET', KEYS[1], 'revoked', '1')
redis.call('EXPIRE', KEYS[1], ARGV[7])
return {'reused', '', '', '0', deadline}
"""

# KEYS[1] a hash; ARGV field, value, ...: set them only if the hash exists; its fields after.
_UPDATE_EXISTING = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return redis.call('HGETALL', KEYS[1])
"""


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


@dataclass
class _Family:
    current: Pair
    deadline: int
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
        self.users: dict[str, tuple[float, int]] = {}
        self.api_keys: dict[str, tuple[float, dict[str, str]]] = {}
        self.expiries: list[tuple[float, str, str]] = []  # (when, table, key): a heap

    def is_revoked(self, jti: str, family: str | None, subject: str, issued_at: float) -> bool:
        with self.lock:
            now = self.clock()
            if self._live(self.denied.get(jti), now):
                return True
            user = self.users.get(subject)
            if user is not None and self._live(user, now) and issued_at < user[1]:
                return True
            if family is None:
                return False
            entry = self.families.get(family)
            return entry is not None and self._live(entry, now) and entry[1].revoked

    def revoke_user(self, subject: str, not_before: int, ttl: int) -> None:
        with self.lock:
            self._purge()
            self.users[subject] = (self._expire("users", subject, ttl), not_before)

    def not_before(self, subject: str) -> int:
        with self.lock:
            user = self.users.get(subject)
            return user[1] if user is not None and self._live(user, self.clock()) else 0

    def deny(self, jti: str, ttl: int) -> None:
        with self.lock:
            self._purge()
            if not self._live(self.denied.get(jti), self.clock()):  # NX: the first TTL stays
                self.denied[jti] = (self._expire("denied", jti, ttl), True)

    def is_denied(self, jti: str) -> bool:
        with self.lock:
            return self._live(self.denied.get(jti), self.clock())

    def start_family(self, family: str, pair: Pair, *, deadline: int, ttl: int) -> None:
        with self.lock:
            self._purge()
            record = _Family(current=pair, deadline=deadline)
            self.families[family] = (self._expire("families", family, ttl), record)

    def rotate(
        self, family: str, presented: str, successor: Pair, *, grace: float, ttl: int
    ) -> tuple[Rotation, Pair, int]:
        with self.lock:
            now = self.clock()
            entry = self.families.get(family)
            if entry is None or not self._live(entry, now) or entry[1].revoked:
                return "revoked", successor, 0
            record = entry[1]
            if time.time() >= record.deadline:
                return "expired", successor, record.deadline
            if record.current.refresh_jti == presented:
                record.current, record.previous, record.rotated_at = successor, presented, now
                self.families[family] = (self._expire("families", family, ttl), record)
                return "rotated", successor, record.deadline
            if record.previous == presented and now - record.rotated_at <= grace:
                return "retried", record.current, record.deadline
            record.revoked = True
            self.families[family] = (self._expire("families", family, ttl), record)
            return "reused", successor, record.deadline

    def revoke_family(self, family: str, ttl: int) -> None:
        with self.lock:
            self._purge()
            entry = self.families.get(family)
            record = entry[1] if entry is not None else _Family(Pair("", "", 0), deadline=0)
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

    def update_api_key(self, key_id: str, changes: dict[str, str]) -> dict[str, str] | None:
        with self.lock:
            entry = self.api_keys.get(key_id)
            if entry is None or not self._live(entry, self.clock()):
                return None
            entry[1].update(changes)
            return dict(entry[1])

    def api_keys_of(self, owner: str) -> dict[str, dict[str, str]]:
        with self.lock:
            now = self.clock()
            return {
                key_id: dict(record)
                for key_id, (expires, record) in self.api_keys.items()
                if expires > now and record.get("owner") == owner
            }

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
            "users": self.users,
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
        self.update_script = self.client.register_script(_UPDATE_EXISTING)

    def is_revoked(self, jti: str, family: str | None, subject: str, issued_at: float) -> bool:
        with self._backend("check the denylist"):
            pipe = self.client.pipeline(transaction=False)
            pipe.exists(self._deny_key(jti))
            pipe.get(self._user_key(subject))
            if family is not None:
                pipe.hget(self._family_key(family), "revoked")
            denied, not_before, *revoked = pipe.execute()
        return bool(denied) or issued_at < int(not_before or 0) or revoked == ["1"]

    def revoke_user(self, subject: str, not_before: int, ttl: int) -> None:
        with self._backend("revoke a user's tokens"):
            self.client.set(self._user_key(subject), not_before, ex=max(1, ttl))

    def not_before(self, subject: str) -> int:
        with self._backend("read a user's not-before"):
            return int(self.client.get(self._user_key(subject)) or 0)

    def deny(self, jti: str, ttl: int) -> None:
        with self._backend("deny a token"):
            self.client.set(self._deny_key(jti), 1, ex=max(1, ttl), nx=True)

    def is_denied(self, jti: str) -> bool:
        with self._backend("check the denylist"):
            return bool(self.client.exists(self._deny_key(jti)))

    def start_family(self, family: str, pair: Pair, *, deadline: int, ttl: int) -> None:
        fields = {
            "current": pair.refresh_jti,
            "access": pair.access_jti,
            "issued_at": pair.issued_at,
            "deadline": deadline,
        }
        with self._backend("start a token family"):
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(self._family_key(family), mapping=cast(dict[Any, Any], fields))
            pipe.expire(self._family_key(family), max(1, ttl))
            pipe.execute()

    def rotate(
        self, family: str, presented: str, successor: Pair, *, grace: float, ttl: int
    ) -> tuple[Rotation, Pair, int]:
        now_ms = int(time.time() * 1000)
        args: list[str | int] = [presented, successor.refresh_jti, successor.access_jti]
        args += [successor.issued_at, now_ms, int(grace * 1000), max(1, ttl)]
        with self._backend("rotate a refresh token"):
            answer = self.rotate_script(keys=[self._family_key(family)], args=args)
        try:
            outcome, refresh_jti, access_jti, issued_at, deadline = answer
            pair = Pair(refresh_jti, access_jti, int(issued_at))
            if outcome not in ("rotated", "retried", "reused", "expired", "revoked"):
                raise ValueError(outcome)
        except (TypeError, ValueError):
            raise BackendUnavailable(
                f"unexpected answer from the rotation script: {answer!r}"
            ) from None
        rotation: Rotation = outcome
        return rotation, pair, int(deadline)

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
            self.client.sadd(self._owner_key(record.get("owner", "")), key_id)

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
            if record:
                self.client.srem(self._owner_key(record.get("owner", "")), key_id)
        return cast(dict[str, str], record) or None

    def update_api_key(self, key_id: str, changes: dict[str, str]) -> dict[str, str] | None:
        flat = [item for pair in changes.items() for item in pair]
        with self._backend("update an API key"):
            answer = self.update_script(keys=[self._api_key_key(key_id)], args=flat)
        if not answer:
            return None
        return dict(zip(answer[::2], answer[1::2], strict=True))

    def api_keys_of(self, owner: str) -> dict[str, dict[str, str]]:
        index = self._owner_key(owner)
        with self._backend("list API keys"):
            key_ids = sorted(cast(set[str], self.client.smembers(index)))
            pipe = self.client.pipeline(transaction=False)
            for key_id in key_ids:
                pipe.hgetall(self._api_key_key(key_id))
            records = pipe.execute() if key_ids else []
            gone = [key_id for key_id, record in zip(key_ids, records, strict=True) if not record]
            if gone:  # expired since: their index entries go too
                self.client.srem(index, *gone)
        return {
            key_id: cast(dict[str, str], record)
            for key_id, record in zip(key_ids, records, strict=True)
            if record
        }

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

    def _user_key(self, subject: str) -> str:
        return f"{self.prefix}:user:{{{subject}}}"

    def _owner_key(self, owner: str) -> str:
        return f"{self.prefix}:owner:{{{owner}}}"

    @contextmanager
    def _backend(self, doing: str) -> Iterator[None]:
        try:
            yield
        except REDIS_ERRORS as exc:
            raise BackendUnavailable(
                f"auth could not {doing}: redis: {exc}", {"backend": "redis"}
            ) from None
