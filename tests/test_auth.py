"""The auth manager: JWT issue/validate/refresh/revoke and API keys, on memory and real Redis.

Every refusal is checked by its reason code; hostile and random tokens must never
crash the actor (the restart count stays 0).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.actors.auth import AuthManager, AuthOptions
from corral.clock import ManualClock
from corral.config import Config, DaemonSection, ManagerSection, parse_options
from corral.daemon import Daemon
from corral.errors import BackendUnavailable, ConfigError, InvalidMessage, NotFound, Unauthorized
from corral.messages.auth import (
    REASONS,
    AuthApiKeyCreate,
    AuthApiKeyInfo,
    AuthApiKeyList,
    AuthApiKeyRevoke,
    AuthApiKeyUpdate,
    AuthApiKeyUsed,
    AuthApiKeyValidate,
    AuthIsRevoked,
    AuthIssue,
    AuthIssueSubscription,
    AuthJwks,
    AuthRefresh,
    AuthRevoke,
    AuthRevokeUser,
    AuthValidate,
)
from corral.messages.system import HealthCheck as HealthRequest
from corral.supervisor import ChildSpec
from corral.system import System
from tests.redis_server import RedisServer
from tests.support import wait_until

SECRET = "test-secret-" + "k" * 40
OTHER_SECRET = "other-secret-" + "q" * 40
AUDIENCE = "api"
ISSUER = "https://auth.corral.test"


@contextmanager
def auth_system(
    redis_url: str = "", clock: ManualClock | None = None, **options: Any
) -> Iterator[System]:
    """A system running only the auth manager, in a namespace of its own."""
    options.setdefault("signing_key", SECRET)
    options.setdefault("kid", "k1")
    spec = ChildSpec(
        name="auth",
        manager=AuthManager,
        options=options,
        redis_url=redis_url,
        namespace=f"t{secrets.token_hex(4)}",
    )
    with System(managers=[spec], clock=clock) as system:
        yield system


@pytest.fixture(params=["memory", "redis"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """ "" for the memory backend, else the URL of the (flushed) shared redis-server."""
    if request.param == "memory":
        return ""
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture(scope="module")
def strict() -> Iterator[System]:
    """Memory backend with audience and issuer configured: the rejection table runs here."""
    with auth_system(audience=AUDIENCE, issuer=ISSUER) as system:
        yield system


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    """Valid access-token claims for ``strict``; a change to None removes the claim."""
    now = int(time.time())
    payload = {
        "sub": "user:1",
        "iat": now,
        "exp": now + 60,
        "jti": secrets.token_urlsafe(8),
        "type": "access",
        "aud": AUDIENCE,
        "iss": ISSUER,
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def forge(payload: dict[str, Any], key: str | bytes = SECRET, **headers: Any) -> str:
    algorithm = headers.pop("alg", "HS256")
    headers.setdefault("kid", "k1")
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    parts = (json.dumps(header).encode(), json.dumps(payload).encode(), signature)
    return ".".join(b64(p) for p in parts)


def reason(system: System, request: Any) -> str:
    with pytest.raises(Unauthorized) as refused:
        system.ask(request)
    code: str = refused.value.details["reason"]
    assert code in REASONS
    return code


def restarts(system: System) -> int:
    return system.health().managers["auth"].restarts


def tamper(segment: str) -> str:
    """A base64url segment with one character in the middle changed (never padding bits)."""
    middle = len(segment) // 2
    return segment[:middle] + ("A" if segment[middle] != "A" else "B") + segment[middle + 1 :]


# -- issue and validate ----------------------------------------------------------------


def test_issued_tokens_validate_with_subject_scopes_and_claims(backend_url: str) -> None:
    with auth_system(backend_url, audience=AUDIENCE, issuer=ISSUER) as system:
        tokens = system.ask(
            AuthIssue(subject="user:42", scopes=["read", "write"], claims={"org": 7})
        )
        assert tokens.refresh_token is not None
        assert tokens.expires_in == 900
        header = jwt.get_unverified_header(tokens.access_token)
        assert header["kid"] == "k1"
        assert header["alg"] == "HS256"
        found = system.ask(AuthValidate(token=tokens.access_token, scopes=["read"]))
        assert found.subject == "user:42"
        assert found.token_type == "access"
        assert found.scopes == ["read", "write"]
        assert found.claims["org"] == 7
        assert found.claims["aud"] == AUDIENCE
        assert found.claims["iss"] == ISSUER
        assert found.expires_at == found.claims["iat"] + 900
        refresh = system.ask(AuthValidate(token=tokens.refresh_token, token_type="refresh"))
        assert refresh.claims["fam"] == found.claims["fam"]
        only_access = system.ask(AuthIssue(subject="svc", refresh=False))
        assert only_access.refresh_token is None
        assert system.ask(AuthValidate(token=only_access.access_token)).subject == "svc"


def test_issue_refuses_claims_that_corral_sets() -> None:
    with auth_system() as system:
        with pytest.raises(InvalidMessage) as refused:
            system.ask(AuthIssue(subject="u", claims={"exp": 1}))
        assert refused.value.path == "claims.exp"
        with pytest.raises(InvalidMessage):
            system.ask(AuthIssue(subject=""))
        for claims_ in ({"raw": b"x"}, {"n": float("inf")}, {"big": "x" * 8192}):
            with pytest.raises(InvalidMessage) as unfit:
                system.ask(AuthIssue(subject="u", claims=claims_))
            assert unfit.value.path == "claims"
        assert restarts(system) == 0


# -- every way a token is refused, with its reason code ----------------------------------


def _issued_access(system: System) -> str:
    return system.ask(AuthIssue(subject="user:1")).access_token


REJECTIONS: list[tuple[str, Any, str]] = [
    ("alg none", lambda: unsigned({"alg": "none", "kid": "k1"}, claims()), "algorithm_not_allowed"),
    ("alg None", lambda: unsigned({"alg": "None", "kid": "k1"}, claims()), "algorithm_not_allowed"),
    ("no alg", lambda: unsigned({"kid": "k1"}, claims()), "algorithm_not_allowed"),
    ("other HMAC", lambda: forge(claims(), "x" * 64, alg="HS512"), "algorithm_not_allowed"),
    ("expired", lambda: forge(claims(exp=int(time.time()) - 60)), "expired"),
    ("nbf in future", lambda: forge(claims(nbf=int(time.time()) + 60)), "not_yet_valid"),
    ("iat in future", lambda: forge(claims(iat=int(time.time()) + 60)), "not_yet_valid"),
    ("wrong audience", lambda: forge(claims(aud="other")), "bad_audience"),
    ("no audience", lambda: forge(claims(aud=None)), "missing_claim"),
    ("wrong issuer", lambda: forge(claims(iss="https://evil.test")), "bad_issuer"),
    ("issuer prefix", lambda: forge(claims(iss=ISSUER[:-2])), "bad_issuer"),
    ("no exp", lambda: forge(claims(exp=None)), "missing_claim"),
    ("no jti", lambda: forge(claims(jti=None)), "missing_claim"),
    ("no sub", lambda: forge(claims(sub=None)), "missing_claim"),
    ("no type", lambda: forge(claims(type=None)), "missing_claim"),
    ("sub not a string", lambda: forge(claims(sub=12)), "bad_claim"),
    ("refresh as access", lambda: forge(claims(type="refresh", fam="f")), "wrong_token_type"),
    ("unknown type", lambda: forge(claims(type="id")), "wrong_token_type"),
    ("unknown kid", lambda: forge(claims(), OTHER_SECRET, kid="k9"), "unknown_kid"),
    ("known key, unknown kid", lambda: forge(claims(), kid="k9"), "unknown_kid"),
    ("no kid", lambda: jwt.encode(claims(), SECRET, algorithm="HS256"), "unknown_kid"),
    ("exp 2**64", lambda: forge(claims(exp=2**64)), "lifetime_exceeded"),
    ("exp 2**70", lambda: forge(claims(exp=2**70)), "lifetime_exceeded"),
    ("exp 1e308", lambda: forge(claims(exp=10**308)), "lifetime_exceeded"),
    ("31 days", lambda: forge(claims(exp=int(time.time()) + 31 * 86400)), "lifetime_exceeded"),
    ("iat long ago", lambda: forge(claims(iat=-(2**63))), "lifetime_exceeded"),
    ("no iat", lambda: forge(claims(iat=None, exp=2**64)), "missing_claim"),
    ("iat a string", lambda: forge(claims(iat="0")), "bad_claim"),
    ("iat true", lambda: forge(claims(iat=True)), "bad_claim"),
    ("kid not a string", lambda: unsigned({"alg": "HS256", "kid": 1}, claims()), "unknown_kid"),
    ("wrong secret", lambda: forge(claims(), OTHER_SECRET), "bad_signature"),
    ("no signature", lambda: forge(claims()).rpartition(".")[0] + ".", "bad_signature"),
    ("two segments", lambda: forge(claims()).rpartition(".")[0], "malformed"),
    ("header not JSON", lambda: "bm90IGpzb24." + forge(claims()).partition(".")[2], "malformed"),
    ("empty", lambda: "", "malformed"),
    ("oversized", lambda: "a" * 10_000, "malformed"),
]


@pytest.mark.parametrize(
    ("make_token", "expected"),
    [pytest.param(make, code, id=name) for name, make, code in REJECTIONS],
)
def test_rejects_with_a_clear_reason(strict: System, make_token: Any, expected: str) -> None:
    assert reason(strict, AuthValidate(token=make_token())) == expected


def test_accepts_a_forged_token_only_when_everything_is_right(strict: System) -> None:
    """The control for the table above: the same forging helper makes a valid token."""
    assert strict.ask(AuthValidate(token=forge(claims(sub="ok")))).subject == "ok"
    leeway = int(time.time()) - 2  # expired 2 s ago, within the 5 s leeway
    assert strict.ask(AuthValidate(token=forge(claims(exp=leeway)))).subject == "user:1"


def test_every_accepted_token_lives_at_most_max_token_lifetime(strict: System) -> None:
    now = int(time.time())
    longest = forge(claims(iat=now, exp=now + 30 * 86400))
    assert strict.ask(AuthValidate(token=longest)).expires_at == now + 30 * 86400
    revoked = strict.ask(AuthRevoke(token=longest))
    assert 30 * 86400 - 5 <= revoked.ttl <= 30 * 86400 + 5
    forever = forge(claims(exp=2**64))
    assert reason(strict, AuthRevoke(token=forever)) == "lifetime_exceeded"
    assert reason(strict, AuthRefresh(token=forge(claims(type="refresh", fam="f", exp=2**64)))) == (
        "lifetime_exceeded"
    )
    with auth_system(max_token_lifetime=60, access_ttl=60, refresh_ttl=60) as short:
        assert reason(
            short, AuthValidate(token=forge(claims(exp=now + 61, aud=None, iss=None)))
        ) == ("lifetime_exceeded")
        tokens = short.ask(AuthIssue(subject="u"))  # its own tokens fit, by construction
        assert short.ask(AuthValidate(token=tokens.access_token)).subject == "u"
    assert restarts(strict) == 0


def test_tampered_payload_and_signature_are_bad_signatures(strict: System) -> None:
    token = strict.ask(AuthIssue(subject="user:1")).access_token
    header, payload, signature = token.split(".")
    elevated = json.loads(base64.urlsafe_b64decode(payload + "=="))
    elevated["sub"] = "admin"
    swapped = f"{header}.{b64(json.dumps(elevated).encode())}.{signature}"
    assert reason(strict, AuthValidate(token=swapped)) == "bad_signature"
    assert reason(strict, AuthValidate(token=f"{header}.{tamper(payload)}.{signature}")) in (
        "bad_signature",
        "malformed",  # the changed character may break the JSON before the signature counts
    )
    assert reason(strict, AuthValidate(token=f"{header}.{payload}.{tamper(signature)}")) == (
        "bad_signature"
    )
    assert strict.ask(AuthValidate(token=token)).subject == "user:1"


def test_missing_scope_is_refused(strict: System) -> None:
    token = strict.ask(AuthIssue(subject="u", scopes=["read"])).access_token
    assert reason(strict, AuthValidate(token=token, scopes=["write"])) == "insufficient_scope"
    refresh = strict.ask(AuthIssue(subject="u")).refresh_token
    assert refresh is not None
    assert reason(strict, AuthValidate(token=refresh)) == "wrong_token_type"
    access = strict.ask(AuthIssue(subject="u")).access_token
    assert reason(strict, AuthRefresh(token=access)) == "wrong_token_type"


def test_a_subscription_token_is_its_own_type_and_names_its_room(strict: System) -> None:
    issued = strict.ask(AuthIssueSubscription(subject="u", room="game:7", ttl=30))
    found = strict.ask(AuthValidate(token=issued.access_token, token_type="subscription"))
    assert (found.subject, found.claims["room"], issued.expires_in) == ("u", "game:7", 30)
    assert found.expires_at - found.claims["iat"] == 30
    assert reason(strict, AuthValidate(token=issued.access_token)) == "wrong_token_type"
    access = strict.ask(AuthIssue(subject="u")).access_token
    assert reason(strict, AuthValidate(token=access, token_type="subscription")) == (
        "wrong_token_type"
    )
    roomless = forge(claims(type="subscription"))
    assert reason(strict, AuthValidate(token=roomless, token_type="subscription")) == (
        "missing_claim"
    )
    with pytest.raises(InvalidMessage, match="ttl: must be <= max_token_lifetime"):
        strict.ask(AuthIssueSubscription(subject="u", room="r", ttl=31 * 86400))
    with pytest.raises(InvalidMessage, match="room"):
        strict.ask(AuthIssueSubscription(subject="u", room=""))
    assert restarts(strict) == 0


# -- algorithms, key files, key confusion and rotation ------------------------------------


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(private PEM, public PEM) files for RS256, ES256 and EdDSA."""
    folder = tmp_path_factory.mktemp("keys")
    made: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey] = {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }
    files = {}
    for algorithm, private in made.items():
        private_path = folder / f"{algorithm}.pem"
        public_path = folder / f"{algorithm}.pub"
        private_path.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        public_path.write_bytes(
            private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        files[algorithm] = (private_path, public_path)
    return files


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "EdDSA"])
def test_asymmetric_algorithms_with_key_files(
    key_files: dict[str, tuple[Path, Path]], algorithm: str
) -> None:
    private, public = key_files[algorithm]
    with auth_system(algorithm=algorithm, signing_key=str(private), kid="") as issuer:
        tokens = issuer.ask(AuthIssue(subject="user:7"))
        header = jwt.get_unverified_header(tokens.access_token)
        assert header["alg"] == algorithm
        assert issuer.ask(AuthValidate(token=tokens.access_token)).subject == "user:7"
        # What the public key verifies, pyjwt verifies too: these are standard tokens.
        assert jwt.decode(tokens.access_token, public.read_bytes(), algorithms=[algorithm])
    # A rotated-in key: the old public key (as PEM text) still verifies old tokens.
    other = "RS256" if algorithm != "RS256" else "ES256"
    with auth_system(
        algorithm=algorithm,
        signing_key=str(private),
        kid="new",
        verification_keys={header["kid"]: public.read_text()},
    ) as successor:
        assert successor.ask(AuthValidate(token=tokens.access_token)).subject == "user:7"
        confused = forge(claims(aud=None, iss=None), SECRET, kid=header["kid"])
        assert reason(successor, AuthValidate(token=confused)) == "algorithm_not_allowed"
        wrong_family = key_files[other][0].read_bytes()
        forged = forge(claims(aud=None, iss=None), wrong_family, alg=other, kid=header["kid"])
        assert reason(successor, AuthValidate(token=forged)) == "algorithm_not_allowed"


def test_jwks_publishes_every_public_key_by_kid_during_rotation(
    key_files: dict[str, tuple[Path, Path]],
) -> None:
    private, public = key_files["RS256"]
    with auth_system(algorithm="RS256", signing_key=str(private), kid="old") as old:
        old_token = old.ask(AuthIssue(subject="user:1")).access_token
    newer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    newer_pem = newer.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    with auth_system(
        algorithm="RS256",
        signing_key=newer_pem,
        kid="new",
        verification_keys={"old": public.read_text()},
    ) as rotated:
        new_token = rotated.ask(AuthIssue(subject="user:2")).access_token
        keys = rotated.ask(AuthJwks()).keys
        assert [(key["kid"], key["kty"], key["alg"], key["use"]) for key in keys] == [
            ("new", "RSA", "RS256", "sig"),
            ("old", "RSA", "RS256", "sig"),
        ]
        assert all("d" not in key and "p" not in key for key in keys)  # public parts only
        by_kid = {key["kid"]: jwt.PyJWK(key) for key in keys}
        for token in (old_token, new_token):  # what a verifier does with the set
            kid = jwt.get_unverified_header(token)["kid"]
            assert jwt.decode(token, by_kid[kid].key, algorithms=["RS256"])["sub"]
    with auth_system() as symmetric:
        assert symmetric.ask(AuthJwks()).keys == []


def test_the_daemon_serves_the_jwks(key_files: dict[str, tuple[Path, Path]]) -> None:
    private, _ = key_files["EdDSA"]
    options = {"algorithm": "EdDSA", "signing_key": str(private), "kid": "ed"}
    config = Config().replace(
        daemon=DaemonSection(port=0),
        managers={
            "auth": ManagerSection(class_path="corral.actors.auth:AuthManager", options=options)
        },
    )
    with Daemon(config) as daemon:
        response = httpx.get(f"{daemon.url}/.well-known/jwks.json")
        assert response.status_code == 200
        assert response.headers["Cache-Control"] == "public, max-age=300"
        [key] = response.json()["keys"]
        assert (key["kid"], key["kty"], key["crv"], key["alg"]) == ("ed", "OKP", "Ed25519", "EdDSA")
        token = daemon.system.ask(AuthIssue(subject="user:1")).access_token
        assert jwt.decode(token, jwt.PyJWK(key).key, algorithms=["EdDSA"])["sub"] == "user:1"
    with Daemon(Config().replace(daemon=DaemonSection(port=0))) as without_auth:
        assert httpx.get(f"{without_auth.url}/.well-known/jwks.json").status_code == 404


def test_hs_rs_key_confusion_is_refused(key_files: dict[str, tuple[Path, Path]]) -> None:
    """CVE-2022-29217's shape: an HS256 token keyed with the server's RSA public key."""
    private, public = key_files["RS256"]
    with auth_system(algorithm="RS256", signing_key=str(private), kid="rsa") as system:
        header = {"alg": "HS256", "kid": "rsa", "typ": "JWT"}
        body = claims(aud=None, iss=None)
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
        mac = hmac.new(public.read_bytes(), signing_input.encode(), hashlib.sha256).digest()
        assert reason(system, AuthValidate(token=f"{signing_input}.{b64(mac)}")) == (
            "algorithm_not_allowed"
        )
        rs_token = forge(body, private.read_bytes(), alg="RS256", kid="rsa")
        assert system.ask(AuthValidate(token=rs_token)).subject == "user:1"
    with auth_system() as hs_system:  # and the other way: an RS256 token to an HS256 system
        rs_token = forge(claims(aud=None, iss=None), private.read_bytes(), alg="RS256", kid="k1")
        assert reason(hs_system, AuthValidate(token=rs_token)) == "algorithm_not_allowed"


def test_rotation_keeps_old_tokens_valid_until_their_key_is_dropped() -> None:
    with auth_system(signing_key=SECRET, kid="2024") as old:
        token = old.ask(AuthIssue(subject="user:1")).access_token
    with auth_system(
        signing_key=OTHER_SECRET, kid="2025", verification_keys={"2024": SECRET}
    ) as rotated:
        assert rotated.ask(AuthValidate(token=token)).subject == "user:1"
        fresh = rotated.ask(AuthIssue(subject="user:2")).access_token
        assert jwt.get_unverified_header(fresh)["kid"] == "2025"
        details = rotated.ask(HealthRequest(target="auth")).details
        assert details["verification_kids"] == ["2024", "2025"]
    with auth_system(signing_key=OTHER_SECRET, kid="2025") as retired:
        assert reason(retired, AuthValidate(token=token)) == "unknown_kid"
        assert retired.ask(AuthValidate(token=fresh)).subject == "user:2"


# -- revocation, refresh rotation and reuse detection --------------------------------------


def test_revoked_jti_is_refused_for_the_rest_of_its_life(backend_url: str) -> None:
    with auth_system(backend_url) as system:
        tokens = system.ask(AuthIssue(subject="user:1"))
        other = system.ask(AuthIssue(subject="user:1")).access_token
        jti = system.ask(AuthValidate(token=tokens.access_token)).jti
        assert not system.ask(AuthIsRevoked(jti=jti)).revoked
        revoked = system.ask(AuthRevoke(token=tokens.access_token))
        assert revoked.jti == jti
        assert 900 <= revoked.ttl <= 906  # remaining life plus the 5 s leeway
        assert not revoked.family_revoked
        assert system.ask(AuthIsRevoked(jti=jti)).revoked
        assert reason(system, AuthValidate(token=tokens.access_token)) == "revoked"
        assert system.ask(AuthValidate(token=other)).subject == "user:1"
        assert tokens.refresh_token is not None
        system.ask(AuthRefresh(token=tokens.refresh_token))  # the login itself goes on
        system.ask(AuthRevoke(token=tokens.access_token))  # twice is fine
        if backend_url:
            client = redis.Redis.from_url(backend_url, decode_responses=True)
            [key] = [str(name) for name in client.keys("*:auth:deny:*")]
            assert key.endswith(f":auth:deny:{{{jti}}}")
            assert 0 < client.ttl(key) <= revoked.ttl
            client.close()


def test_revoking_an_expired_token_is_a_no_op(strict: System) -> None:
    expired = forge(claims(exp=int(time.time()) - 60))
    revoked = strict.ask(AuthRevoke(token=expired))
    assert revoked.ttl == 0
    assert not strict.ask(AuthIsRevoked(jti=revoked.jti)).revoked
    assert reason(strict, AuthRevoke(token=forge(claims(), OTHER_SECRET))) == "bad_signature"


def test_refresh_rotates_and_a_reused_refresh_token_revokes_the_family(backend_url: str) -> None:
    clock = ManualClock()
    with auth_system(backend_url, clock, refresh_grace=0.0) as system:
        first = system.ask(AuthIssue(subject="user:1", scopes=["read"], claims={"org": 3}))
        assert first.refresh_token is not None
        second = system.ask(AuthRefresh(token=first.refresh_token))
        assert second.refresh_token is not None
        assert second.refresh_token != first.refresh_token
        renewed = system.ask(AuthValidate(token=second.access_token))
        assert renewed.scopes == ["read"]
        assert renewed.claims["org"] == 3
        bystander = system.ask(AuthIssue(subject="user:1"))
        clock.advance(0.01)  # past the (zero) grace window
        assert reason(system, AuthRefresh(token=first.refresh_token)) == "reused_refresh"
        # The whole family is revoked: the legitimate newest tokens as well.
        assert reason(system, AuthRefresh(token=second.refresh_token)) == "revoked"
        assert reason(system, AuthValidate(token=second.access_token)) == "revoked"
        assert reason(system, AuthValidate(token=first.access_token)) == "revoked"
        assert reason(system, AuthRefresh(token=first.refresh_token)) == "revoked"
        # Another login of the same user is untouched.
        assert system.ask(AuthValidate(token=bystander.access_token)).subject == "user:1"
        metrics = system.ask(HealthRequest(target="auth")).metrics
        assert metrics["rejected_reused_refresh"] == 1


def test_a_retry_within_the_grace_window_gets_the_same_pair(backend_url: str) -> None:
    """Two tabs refresh with one token at once: both get one pair and both go on working."""
    with auth_system(backend_url, refresh_grace=30.0) as system:
        first = system.ask(AuthIssue(subject="user:1", scopes=["read"]))
        assert first.refresh_token is not None
        tab_a = system.ask(AuthRefresh(token=first.refresh_token))
        tab_b = system.ask(AuthRefresh(token=first.refresh_token))
        assert tab_b == tab_a
        assert system.ask(AuthValidate(token=tab_b.access_token)).scopes == ["read"]
        assert tab_a.refresh_token is not None
        third = system.ask(AuthRefresh(token=tab_a.refresh_token))  # tab A goes on
        assert system.ask(AuthRefresh(token=tab_a.refresh_token)) == third  # and so does B
        assert third.refresh_token is not None
        assert system.ask(AuthValidate(token=third.access_token)).subject == "user:1"
        # Two rotations back is no concurrent use: reuse detection as before.
        assert reason(system, AuthRefresh(token=first.refresh_token)) == "reused_refresh"
        assert reason(system, AuthRefresh(token=third.refresh_token)) == "revoked"


def test_outside_the_grace_window_a_retry_revokes_the_family(backend_url: str) -> None:
    clock = ManualClock()
    with auth_system(backend_url, clock, refresh_grace=0.3) as system:
        first = system.ask(AuthIssue(subject="user:1"))
        assert first.refresh_token is not None
        second = system.ask(AuthRefresh(token=first.refresh_token))
        clock.advance(0.4)
        assert reason(system, AuthRefresh(token=first.refresh_token)) == "reused_refresh"
        assert reason(system, AuthValidate(token=second.access_token)) == "revoked"


def test_two_systems_refreshing_at_once_on_one_redis_share_the_grace_window(
    redis_server: RedisServer,
) -> None:
    namespace = f"t{secrets.token_hex(4)}"
    options = {"signing_key": SECRET, "kid": "k1", "refresh_grace": 5.0}

    def spec() -> ChildSpec:
        return ChildSpec(
            name="auth",
            manager=AuthManager,
            options=options,
            redis_url=redis_server.url,
            namespace=namespace,
        )

    with System(managers=[spec()]) as one, System(managers=[spec()]) as two:
        login = one.ask(AuthIssue(subject="user:1"))
        assert login.refresh_token is not None
        token = login.refresh_token
        with ThreadPoolExecutor(max_workers=4) as pool:
            tabs = list(
                pool.map(lambda system: system.ask(AuthRefresh(token=token)), [one, two] * 2)
            )
        assert all(tab == tabs[0] for tab in tabs)
        refreshed = tabs[0].refresh_token
        assert refreshed is not None
        assert two.ask(AuthValidate(token=tabs[0].access_token)).subject == "user:1"
        assert one.ask(AuthRefresh(token=refreshed)).refresh_token is not None


def test_a_login_ends_at_refresh_max_age_however_often_it_rotates(backend_url: str) -> None:
    clock = ManualClock()
    with auth_system(backend_url, clock, refresh_max_age=2, refresh_grace=0.0) as system:
        tokens = system.ask(AuthIssue(subject="user:1"))
        started = system.ask(AuthValidate(token=tokens.access_token)).claims["iat"]
        assert tokens.refresh_expires_in == 2
        for _ in range(3):
            assert tokens.refresh_token is not None
            tokens = system.ask(AuthRefresh(token=tokens.refresh_token))
            refresh = system.ask(
                AuthValidate(token=tokens.refresh_token or "", token_type="refresh")
            )
            assert refresh.expires_at <= started + 2
            assert system.ask(AuthValidate(token=tokens.access_token)).expires_at <= started + 2
        clock.advance(started + 2.05 - clock.time())
        assert tokens.refresh_token is not None
        assert reason(system, AuthRefresh(token=tokens.refresh_token)) == "expired"
    with pytest.raises(ConfigError, match="refresh_max_age: must be >= 1"):
        parse_options(AuthOptions, {"refresh_max_age": 0}, manager="auth")


def test_revoking_a_user_refuses_every_token_issued_to_it_so_far(backend_url: str) -> None:
    with auth_system(backend_url) as system:
        laptop = system.ask(AuthIssue(subject="user:1"))
        phone = system.ask(AuthIssue(subject="user:1"))
        assert phone.refresh_token is not None
        phone = system.ask(AuthRefresh(token=phone.refresh_token))
        service = system.ask(AuthIssue(subject="user:1", refresh=False))
        ticket = system.ask(AuthIssueSubscription(subject="user:1", room="r"))
        bystander = system.ask(AuthIssue(subject="user:2"))
        revoked = system.ask(AuthRevokeUser(subject="user:1"))
        assert revoked.subject == "user:1" and revoked.not_before > time.time()
        for token in (laptop.access_token, phone.access_token, service.access_token):
            assert reason(system, AuthValidate(token=token)) == "revoked"
        assert reason(
            system, AuthValidate(token=ticket.access_token, token_type="subscription")
        ) == ("revoked")
        for refresh in (laptop.refresh_token, phone.refresh_token):
            assert reason(system, AuthRefresh(token=refresh or "")) == "revoked"
        assert system.ask(AuthValidate(token=bystander.access_token)).subject == "user:2"
        # A login right after (in the same second, too) works, refresh included.
        again = system.ask(AuthIssue(subject="user:1"))
        assert system.ask(AuthValidate(token=again.access_token)).subject == "user:1"
        assert again.refresh_token is not None
        renewed = system.ask(AuthRefresh(token=again.refresh_token))
        assert system.ask(AuthValidate(token=renewed.access_token)).subject == "user:1"
        with pytest.raises(InvalidMessage):
            system.ask(AuthRevokeUser(subject=""))
        if backend_url:
            client = redis.Redis.from_url(backend_url, decode_responses=True)
            [key] = [str(name) for name in client.keys("*:auth:user:*")]
            assert key.endswith(":auth:user:{user:1}")
            assert 30 * 86400 < client.ttl(key) <= 30 * 86400 + 7
            client.close()


def test_revoking_a_refresh_token_ends_the_login(backend_url: str) -> None:
    with auth_system(backend_url) as system:
        tokens = system.ask(AuthIssue(subject="user:1"))
        assert tokens.refresh_token is not None
        assert system.ask(AuthRevoke(token=tokens.refresh_token)).family_revoked
        assert reason(system, AuthRefresh(token=tokens.refresh_token)) == "revoked"
        assert reason(system, AuthValidate(token=tokens.access_token)) == "revoked"
        other = system.ask(AuthIssue(subject="user:1"))
        assert system.ask(AuthRevoke(token=other.access_token, family=True)).family_revoked
        assert other.refresh_token is not None
        assert reason(system, AuthRefresh(token=other.refresh_token)) == "revoked"


# -- API keys -----------------------------------------------------------------------------


def test_api_keys_are_shown_once_stored_hashed_and_revocable(backend_url: str) -> None:
    with auth_system(backend_url) as system:
        created = system.ask(AuthApiKeyCreate(owner="svc:billing", scopes=["invoices"], name="ci"))
        assert created.key is not None
        assert created.key.startswith(f"ck_{created.key_id}_")
        found = system.ask(AuthApiKeyValidate(key=created.key, scopes=["invoices"]))
        assert (found.owner, found.scopes, found.name, found.key) == (
            "svc:billing",
            ["invoices"],
            "ci",
            None,
        )
        assert found.expires_at is None
        secret = created.key.rsplit("_", 1)[1]
        if backend_url:
            client = redis.Redis.from_url(backend_url, decode_responses=True)
            [key] = client.keys("*:auth:api_key:*")
            stored = client.hgetall(key)
            client.close()
            assert secret not in json.dumps(stored)
            assert stored["hash"] == hashlib.sha256(secret.encode()).hexdigest()
        refusals = {
            "missing scope": AuthApiKeyValidate(key=created.key, scopes=["admin"]),
            "wrong secret": AuthApiKeyValidate(key=created.key[:-4] + "0000"),
            "garbage": AuthApiKeyValidate(key="not a key"),
            "other prefix": AuthApiKeyValidate(key="xx" + created.key[2:]),
        }
        assert {name: reason(system, ask) for name, ask in refusals.items()} == {
            "missing scope": "insufficient_scope",
            "wrong secret": "invalid_api_key",
            "garbage": "invalid_api_key",
            "other prefix": "invalid_api_key",
        }
        assert system.ask(AuthApiKeyRevoke(key_id=created.key_id)).owner == "svc:billing"
        assert reason(system, AuthApiKeyValidate(key=created.key)) == "invalid_api_key"
        with pytest.raises(NotFound):
            system.ask(AuthApiKeyRevoke(key_id=created.key_id))


def test_api_keys_can_be_inspected_rescoped_listed_and_audited(backend_url: str) -> None:
    with auth_system(backend_url) as system, system.subscribe("auth.api_key.used") as used:
        first = system.ask(AuthApiKeyCreate(owner="svc:billing", scopes=["read"], name="ci"))
        second = system.ask(AuthApiKeyCreate(owner="svc:billing", ttl=3600))
        system.ask(AuthApiKeyCreate(owner="svc:other"))
        assert first.key is not None and second.key is not None
        info = system.ask(AuthApiKeyInfo(key_id=first.key_id))
        assert (info.owner, info.scopes, info.name, info.key, info.last_used_at) == (
            "svc:billing", ["read"], "ci", None, None,
        )  # fmt: skip
        assert info.created_at == pytest.approx(first.created_at)
        validated = system.ask(AuthApiKeyValidate(key=first.key, scopes=["read"]))
        assert validated.last_used_at is not None
        info = system.ask(AuthApiKeyInfo(key_id=first.key_id))
        assert info.last_used_at == pytest.approx(validated.last_used_at)

        updated = system.ask(AuthApiKeyUpdate(key_id=first.key_id, scopes=["read", "write"]))
        assert updated.scopes == ["read", "write"]
        assert system.ask(AuthApiKeyValidate(key=first.key, scopes=["write"])).owner == (
            "svc:billing"
        )
        system.ask(AuthApiKeyUpdate(key_id=first.key_id, scopes=[]))
        assert reason(system, AuthApiKeyValidate(key=first.key, scopes=["read"])) == (
            "insufficient_scope"
        )
        assert reason(system, AuthApiKeyValidate(key=second.key[:-4] + "0000")) == (
            "invalid_api_key"
        )
        with pytest.raises(InvalidMessage, match=r"scopes\.1"):
            system.ask(AuthApiKeyUpdate(key_id=first.key_id, scopes=["ok", "two words"]))

        listed = system.ask(AuthApiKeyList(owner="svc:billing")).keys
        assert [key.key_id for key in listed] == [first.key_id, second.key_id]
        assert all(key.key is None for key in listed)
        assert system.ask(AuthApiKeyList(owner="nobody")).keys == []
        system.ask(AuthApiKeyRevoke(key_id=second.key_id))
        assert [k.key_id for k in system.ask(AuthApiKeyList(owner="svc:billing")).keys] == [
            first.key_id
        ]
        for missing in (AuthApiKeyInfo(key_id=second.key_id),
                        AuthApiKeyUpdate(key_id=second.key_id, scopes=["x"])):  # fmt: skip
            with pytest.raises(NotFound):
                system.ask(missing)

        events = [
            delivery.message
            for delivery in itertools.islice(used, 4)
            if isinstance(delivery.message, AuthApiKeyUsed)
        ]
        assert [(e.key_id, e.owner, e.outcome, e.scopes) for e in events] == [
            (first.key_id, "svc:billing", "accepted", ["read"]),
            (first.key_id, "svc:billing", "accepted", ["write"]),
            (first.key_id, "svc:billing", "insufficient_scope", ["read"]),
            (second.key_id, "svc:billing", "invalid_api_key", []),
        ]


def test_api_keys_expire(backend_url: str) -> None:
    with auth_system(backend_url) as system:
        created = system.ask(AuthApiKeyCreate(owner="svc", ttl=0.2))
        assert created.key is not None and created.expires_at is not None
        assert system.ask(AuthApiKeyValidate(key=created.key)).owner == "svc"

        def refused() -> str | None:
            try:
                system.ask(AuthApiKeyValidate(key=created.key or ""))
            except Unauthorized as exc:
                return str(exc.details["reason"])
            return None

        assert wait_until(refused) in ("expired", "invalid_api_key")
        with pytest.raises(InvalidMessage):
            system.ask(AuthApiKeyCreate(owner="svc", ttl=0.0))


# -- hostile input never crashes the actor -------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.one_of(st.binary(max_size=300).map(lambda b: b.decode("latin-1")), st.text()))
def test_random_bytes_are_malformed_not_a_crash(strict: System, garbage: str) -> None:
    assert reason(strict, AuthValidate(token=garbage)) == "malformed"
    assert restarts(strict) == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "b64"]), json_values),
    payload=json_values,
    signature=st.binary(max_size=40),
)
def test_random_jwt_shapes_are_refused_not_a_crash(
    strict: System, header: dict[str, Any], payload: Any, signature: bytes
) -> None:
    assert reason(strict, AuthValidate(token=unsigned(header, payload, signature)))
    assert restarts(strict) == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=json_values | st.dictionaries(st.sampled_from(list(claims())), json_values))
def test_correctly_signed_junk_claims_are_refused_not_a_crash(strict: System, payload: Any) -> None:
    """Past the signature, every claim is hostile too (as from a leaked key)."""
    header = {"alg": "HS256", "kid": "k1", "typ": "JWT"}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    refused: Unauthorized | None = None
    try:
        strict.ask(AuthValidate(token=f"{signing_input}.{b64(mac)}"))
    except Unauthorized as exc:
        refused = exc
    assert refused is None or refused.details["reason"] in REASONS
    assert restarts(strict) == 0


# -- Redis down, configuration --------------------------------------------------------------


def test_redis_down_is_backend_unavailable_and_degraded(fresh_redis_server: RedisServer) -> None:
    with auth_system(fresh_redis_server.url, redis_timeout=0.5) as system:
        tokens = system.ask(AuthIssue(subject="user:1"))
        assert system.ask(HealthRequest(target="auth")).status == "healthy"
        fresh_redis_server.stop()
        with pytest.raises(BackendUnavailable):
            system.ask(AuthValidate(token=tokens.access_token))
        with pytest.raises(BackendUnavailable):
            system.ask(AuthIssue(subject="user:1"))
        health = system.ask(HealthRequest(target="auth"))
        assert health.status == "degraded"
        assert health.dependencies == {"redis": "unreachable"}
        assert reason(system, AuthValidate(token="junk")) == "malformed"  # no Redis needed
        fresh_redis_server.start()
        assert system.ask(AuthValidate(token=tokens.access_token)).subject == "user:1"
        assert restarts(system) == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"signing_key": "short"}, "signing_key: HS256 needs a secret of at least 32 bytes"),
        ({"algorithm": "HS512", "signing_key": SECRET}, "at least 64 bytes"),
        ({"algorithm": "RS256"}, "signing_key: RS256 needs a signing_key"),
        ({"algorithm": "RS256", "signing_key": "/nonexistent/key.pem"}, "cannot read key file"),
        ({"verification_keys": {"old": "short"}}, "verification_keys.old: HS256 needs a secret"),
        ({"signing_key": "-----BEGIN PUBLIC KEY-----" + "x" * 40}, "not a PEM or SSH key"),
        ({"algorithm": "none"}, "algorithm: expected one of"),
        ({"access_ttl": 0}, "access_ttl: must be >= 1"),
        ({"refresh_ttl": 2_592_001}, "refresh_ttl: must be <= max_token_lifetime .2592000."),
        (
            {"access_ttl": 600, "max_token_lifetime": 300, "refresh_ttl": 300},
            "access_ttl: must be <= max_token_lifetime .300.",
        ),
        ({"max_token_lifetime": 2**40}, "max_token_lifetime: must be <= 315360000"),
        ({"leeway": float("inf")}, "leeway: must be <= 86400"),
        ({"api_key_prefix": "a_b"}, "api_key_prefix: expected letters and digits"),
    ],
)
def test_bad_options_fail_naming_the_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_options(AuthOptions, options, manager="auth")


def test_wrong_key_family_fails_at_start(key_files: dict[str, tuple[Path, Path]]) -> None:
    with pytest.raises(ConfigError, match="signing_key"):
        parse_options(
            AuthOptions,
            {"algorithm": "RS256", "signing_key": str(key_files["ES256"][0])},
            manager="auth",
        )
    with pytest.raises(ConfigError, match="expected a private key"):
        parse_options(
            AuthOptions,
            {"algorithm": "ES256", "signing_key": str(key_files["ES256"][1])},
            manager="auth",
        )


def test_no_signing_key_uses_a_process_secret() -> None:
    with auth_system(signing_key="", kid="") as system:
        token = system.ask(AuthIssue(subject="user:1")).access_token
        assert system.ask(HealthRequest(target="auth")).details["ephemeral_key"] is True
        assert system.ask(AuthValidate(token=token)).subject == "user:1"
