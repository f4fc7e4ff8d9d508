"""Auth: token validation through the auth manager against bare ``jwt.decode``, in the same run.

- HS256 validate through the actor (``System.ask(AuthValidate)``: routing, mailbox,
  header and kid check, full claim checks, denylist and family check) on the memory
  backend and on Redis, vs bare ``jwt.decode`` of the same token with the same
  options (no denylist), and vs ``jwt.decode`` plus the Redis EXISTS a hand-rolled
  denylist would cost;
- RS256 / ES256 / EdDSA validate through the actor vs bare ``jwt.decode``
  (signature verification dominates, so the ratio shows what corral adds);
- issue (sign a pair, start a family) and refresh (verify, one Lua rotation, sign a
  pair) through the actor on Redis, against bare ``jwt.encode`` of two tokens.

Run: ``python bench/auth.py``. Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import gc
import secrets
from collections.abc import Callable
from typing import Any

import jwt
import redis
from _report import Row, report, timed
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from corral.actors.auth import AuthManager
from corral.messages.auth import AuthIssue, AuthRefresh, AuthValidate
from corral.supervisor import ChildSpec
from corral.system import System
from tests.redis_server import RedisServer

CALLS = 2_000
ROUNDS = 3
SECRET = secrets.token_hex(32)
AUDIENCE = "api"
REQUIRED = ["exp", "iat", "sub", "jti", "type", "aud"]


def auth_system(redis_url: str, algorithm: str, signing_key: str) -> System:
    options = {"algorithm": algorithm, "signing_key": signing_key, "audience": AUDIENCE}
    spec = ChildSpec(name="auth", manager=AuthManager, options=options, redis_url=redis_url)
    return System(managers=[spec]).start()


def pem(private: Any) -> str:
    data: bytes = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data.decode()


def best_of(cases: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Calls per second of each case, interleaved round by round, best round kept."""
    best = dict.fromkeys(cases, 0.0)
    for _ in range(ROUNDS):
        for name, fn in cases.items():
            best[name] = max(best[name], timed(fn, calls))
    return best


def hs256_rows(url: str) -> list[Row]:
    memory = auth_system("", "HS256", SECRET)
    on_redis = auth_system(url, "HS256", SECRET)
    client = redis.Redis.from_url(url)
    try:
        memory_token = memory.ask(AuthIssue(subject="user:1")).access_token
        redis_token = on_redis.ask(AuthIssue(subject="user:1")).access_token
        key = SECRET.encode()
        deny_key = "corral:auth:deny:{bench}"

        def bare() -> object:
            return jwt.decode(
                memory_token,
                key,
                algorithms=["HS256"],
                audience=AUDIENCE,
                options={"require": REQUIRED},
            )

        def bare_with_denylist() -> object:
            bare()
            return client.exists(deny_key)

        validate_memory = AuthValidate(token=memory_token)
        validate_redis = AuthValidate(token=redis_token)
        rates = best_of(
            {
                "bare": bare,
                "bare+redis": bare_with_denylist,
                "memory": lambda: memory.ask(validate_memory),
                "redis": lambda: on_redis.ask(validate_redis),
            },
            CALLS,
        )
    finally:
        memory.stop()
        on_redis.stop()
        client.close()
    return [
        Row("HS256 validate, actor (memory) vs jwt.decode", rates["memory"], rates["bare"]),
        Row("HS256 validate, actor (redis) vs jwt.decode", rates["redis"], rates["bare"]),
        Row(
            "HS256 validate, actor (redis) vs jwt.decode+EXISTS",
            rates["redis"],
            rates["bare+redis"],
        ),
    ]


def asymmetric_rows() -> list[Row]:
    keys: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey] = {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }
    return [asymmetric_row(algorithm, private) for algorithm, private in keys.items()]


def asymmetric_row(algorithm: str, private: Any) -> Row:
    system = auth_system("", algorithm, pem(private))
    try:
        token = system.ask(AuthIssue(subject="user:1")).access_token
        public = private.public_key()
        validate = AuthValidate(token=token)

        def bare() -> object:
            return jwt.decode(
                token,
                public,
                algorithms=[algorithm],
                audience=AUDIENCE,
                options={"require": REQUIRED},
            )

        rates = best_of({"bare": bare, "actor": lambda: system.ask(validate)}, CALLS // 2)
    finally:
        system.stop()
    return Row(f"{algorithm} validate, actor (memory) vs jwt.decode", rates["actor"], rates["bare"])


def issue_refresh_rows(url: str) -> list[Row]:
    system = auth_system(url, "HS256", SECRET)
    key = SECRET.encode()
    try:
        refresh_token = system.ask(AuthIssue(subject="user:1")).refresh_token or ""

        def bare_pair() -> object:
            claims = {"sub": "user:1", "exp": 2**31, "iat": 0, "jti": secrets.token_urlsafe(16)}
            return jwt.encode(claims, key, algorithm="HS256"), jwt.encode(
                claims, key, algorithm="HS256"
            )

        def refresh() -> object:
            nonlocal refresh_token
            refresh_token = system.ask(AuthRefresh(token=refresh_token)).refresh_token or ""
            return refresh_token

        issue = AuthIssue(subject="user:1")
        rates = best_of(
            {"bare": bare_pair, "issue": lambda: system.ask(issue), "refresh": refresh},
            CALLS // 2,
        )
    finally:
        system.stop()
    return [
        Row("issue pair, actor (redis) vs 2x jwt.encode", rates["issue"], rates["bare"]),
        Row("refresh (rotate), actor (redis) vs 2x jwt.encode", rates["refresh"], rates["bare"]),
    ]


def main() -> None:
    with RedisServer() as server:
        gc.disable()
        try:
            rows = hs256_rows(server.url) + asymmetric_rows() + issue_refresh_rows(server.url)
        finally:
            gc.enable()
    report(
        "auth: validate through the auth manager vs bare pyjwt (same run)",
        rows,
        note="the actor adds routing, the mailbox, kid/alg pinning and the denylist check; "
        "ratio = actor / reference",
    )


if __name__ == "__main__":
    main()
