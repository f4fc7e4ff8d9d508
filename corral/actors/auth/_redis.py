"""The auth store in Redis: one round trip per request, keys with the namespace and a hash tag."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from corral._redis import REDIS_ERRORS, connect
from corral.actors.auth._store import Rotation
from corral.errors import BackendUnavailable

__all__ = ["RedisStore"]

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
