"""The auth store in Redis: one round trip per request, keys with the namespace and a hash tag."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from corral._redis import REDIS_ERRORS, connect
from corral.actors.auth._store import Pair, Rotation
from corral.clock import Clock, SystemClock
from corral.errors import BackendUnavailable

__all__ = ["RedisStore"]

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


class RedisStore:
    """The store in Redis; see the module docstring for the keys."""

    kind = "redis"

    def __init__(
        self, url: str, *, namespace: str, timeout: float, clock: Clock | None = None
    ) -> None:
        self.url = url
        self.clock = clock or SystemClock()
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
        now_ms = int(self.clock.time() * 1000)
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
