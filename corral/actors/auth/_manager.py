"""The ``auth`` manager: JWT access and refresh tokens, a denylist, and API keys.

::

    [managers.auth]
    algorithm = "RS256"
    signing_key = "/etc/corral/jwt.pem"          # or "vault:secret/corral#jwt_key"
    verification_keys = { "2024-01" = "/etc/corral/jwt-2024-01.pub" }
    issuer = "https://auth.example.com"
    audience = "api"

    tokens = system.ask(AuthIssue(subject="user:42", scopes=["read"]))
    claims = system.ask(AuthValidate(token=tokens.access_token))

Every refused token raises :class:`~corral.errors.Unauthorized` with
``details={"reason": <code>}`` (codes in :data:`corral.messages.auth.REASONS`);
a token, however broken, never crashes the actor.

Every accepted token can be revoked: one whose lifetime (``exp - iat``) is longer
than ``max_token_lifetime`` is refused (``lifetime_exceeded``), so that a denylist
entry, which lives as long as the token, always has a bounded TTL.

Refresh tokens rotate: each use retires the presented token and returns a new
pair of the same *family*. A retired refresh token presented again revokes the
whole family (access tokens too), except the one just retired within
``refresh_grace`` seconds: several tabs refreshing at once, or a client that lost
the answer, get the same new pair again. A family ends ``refresh_max_age`` seconds
after its login however often it rotates. ``AuthRevokeUser`` refuses every token
of a user issued before it (a per-user not-before).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import math
import secrets
import threading
import typing
from typing import Any, NoReturn

import jwt
import msgspec
from aiohttp import web

from corral.actors.auth._keys import KeyRing, public_jwks
from corral.actors.auth._memory import MemoryStore
from corral.actors.auth._options import AuthOptions
from corral.actors.auth._redis import RedisStore
from corral.actors.auth._store import Pair, Store
from corral.clock import Clock
from corral.errors import (
    BackendUnavailable,
    ConfigError,
    CorralError,
    InvalidMessage,
    NotFound,
    Unauthorized,
)
from corral.manager import AsyncRouter, HttpMount, Manager, handles
from corral.messages.auth import (
    AuthApiKey,
    AuthApiKeyCreate,
    AuthApiKeyInfo,
    AuthApiKeyList,
    AuthApiKeyRevoke,
    AuthApiKeys,
    AuthApiKeyUpdate,
    AuthApiKeyUsed,
    AuthApiKeyValidate,
    AuthClaims,
    AuthIsRevoked,
    AuthIssue,
    AuthIssueSubscription,
    AuthJwks,
    AuthKeySet,
    AuthRefresh,
    AuthRevocation,
    AuthRevoke,
    AuthRevoked,
    AuthRevokeUser,
    AuthTokens,
    AuthUserRevoked,
    AuthValidate,
    TokenType,
)
from corral.messages.base import MAX_TTL
from corral.messages.system import Health
from corral.metrics import Counter

__all__ = ["AuthManager"]

log = logging.getLogger(__name__)


RESERVED_CLAIMS = frozenset(
    {"exp", "iat", "nbf", "sub", "jti", "aud", "iss", "type", "fam", "scope"}
)
"""Claims corral sets itself; ``AuthIssue.claims`` may not name them."""

_TOKEN_TYPES = typing.get_args(TokenType)

# pyjwt's errors by the reason code they answer with; subclasses before their bases.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "bad_audience"),
    (jwt.InvalidIssuerError, "bad_issuer"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidAlgorithmError, "algorithm_not_allowed"),
    (jwt.InvalidIssuedAtError, "bad_claim"),
    (jwt.exceptions.InvalidSubjectError, "bad_claim"),
    (jwt.exceptions.InvalidJTIError, "bad_claim"),
)


# Per namespace and process, so that a restarted auth actor keeps its denylist and secret.
_shared_lock = threading.Lock()
_memory_stores: dict[tuple[str, Clock], MemoryStore] = {}
_ephemeral_secrets: dict[tuple[str, str], bytes] = {}


def _memory_store(namespace: str, clock: Clock) -> MemoryStore:
    # Systems share a store only when they share a clock (every SystemClock is the same).
    with _shared_lock:
        return _memory_stores.setdefault((namespace, clock), MemoryStore(clock))


def _ephemeral_secret(namespace: str, algorithm: str) -> bytes:
    with _shared_lock:
        return _ephemeral_secrets.setdefault((namespace, algorithm), secrets.token_bytes(64))


API_KEY_USED_TOPIC = "auth.api_key.used"
"""Where :class:`~corral.messages.auth.AuthApiKeyUsed` events are published."""

ISSUED = Counter("corral_auth_tokens_issued_total", "Tokens issued (access, refresh, subscription)")
VALIDATED = Counter("corral_auth_tokens_validated_total", "Tokens found valid")
REFRESHED = Counter("corral_auth_tokens_refreshed_total", "Refresh tokens exchanged for new tokens")
REVOKED = Counter("corral_auth_tokens_revoked_total", "Tokens and token families revoked")
REJECTED = Counter(
    "corral_auth_rejected_total",
    "Tokens and API keys refused, by reason (expired, revoked, malformed, ...)",
    labels=("reason",),
)
HEALTH_COUNTS = {
    "issued": ISSUED,
    "validated": VALIDATED,
    "refreshed": REFRESHED,
    "revoked": REVOKED,
}
"""The counters in ``Health.metrics``, by key (and ``rejected_<reason>``)."""


class AuthManager(Manager[AuthOptions]):
    """Issues, validates, refreshes and revokes JWTs; creates and checks API keys."""

    name = "auth"
    metric_families = (ISSUED, VALIDATED, REFRESHED, REVOKED, REJECTED)
    store: Store
    keys: KeyRing
    family_ttl: int

    @classmethod
    def mount(cls, http: HttpMount) -> None:
        """Serve this manager's public keys at ``/.well-known/jwks.json`` (a JSON Web Key
        Set, empty for HS*), which verifiers may cache for five minutes."""
        if http.name == cls.name:  # what AuthJwks reaches
            http.app.router.add_get("/.well-known/jwks.json", functools.partial(_jwks, http.system))

    def on_start(self) -> None:
        settings = self.options
        namespace = self.corral_context.namespace
        self.clock = self.corral_context.clock
        self.keys = settings.keyring(
            ephemeral_secret=_ephemeral_secret(namespace, settings.algorithm)
        )
        if self.keys.ephemeral:
            log.warning("auth: no signing_key configured; tokens are signed with a process secret")
        self.store = self._open_store()
        required = ["exp", "iat", "sub", "jti", "type"]
        required += ["aud"] if settings.audience else []
        required += ["iss"] if settings.issuer else []
        self.decoder = jwt.PyJWT(options={"require": required})
        self.encoder = jwt.PyJWT()
        self.audience = settings.audience or None
        self.issuer = settings.issuer or None
        # A revoked family must outlive every token of it, refresh tokens included.
        self.family_ttl = math.ceil(settings.refresh_ttl + settings.leeway + settings.refresh_grace)
        # A user's not-before must outlive every token issued before it.
        self.not_before_ttl = math.ceil(settings.max_token_lifetime + settings.leeway) + 1

    def on_stop(self) -> None:
        self.store.close()

    def _open_store(self) -> Store:
        settings, context = self.options, self.corral_context
        url = settings.redis_url or context.redis_url
        backend = settings.backend
        if backend == "auto":
            backend = "redis" if url else "memory"
        if backend == "memory":
            return _memory_store(context.namespace, context.clock)
        if not url:
            raise ConfigError(
                f"managers.{context.name}.backend: 'redis' needs redis_url or a Redis bus"
            )
        return RedisStore(
            url, namespace=context.namespace, timeout=settings.redis_timeout, clock=context.clock
        )

    def health(self) -> Health:
        details: dict[str, Any] = {
            "backend": self.store.kind,
            "algorithm": self.keys.algorithm,
            "kid": self.keys.signing_kid,
            "verification_kids": sorted(self.keys.verification),
            "ephemeral_key": self.keys.ephemeral,
        }
        metrics: dict[str, Any] = {
            **{key: int(self.corral_metrics.value(f)) for key, f in HEALTH_COUNTS.items()},
            **{
                f"rejected_{reason}": int(n)
                for (reason,), n in self.corral_metrics.samples(REJECTED)
            },
        }
        if self.store.kind == "memory":
            return Health(status="healthy", details=details, metrics=metrics)
        try:
            self.store.ping()
        except BackendUnavailable as exc:
            details["error"] = exc.message
            return Health(
                status="degraded",
                details=details,
                metrics=metrics,
                dependencies={"redis": "unreachable"},
            )
        return Health(
            status="healthy", details=details, metrics=metrics, dependencies={"redis": "ok"}
        )

    # -- tokens ---------------------------------------------------------------------------

    @handles(AuthIssue)
    def issue(self, msg: AuthIssue) -> AuthTokens:
        reserved = sorted(RESERVED_CLAIMS.intersection(msg.claims))
        if reserved:
            raise InvalidMessage("a claim corral sets itself", path=f"claims.{reserved[0]}")
        if not msg.subject:
            raise InvalidMessage("must not be empty", path="subject")
        extra = dict(msg.claims)
        if msg.scopes:
            extra["scope"] = " ".join(msg.scopes)
        self._check_claims(msg.subject, extra)
        issued_at = max(int(self.clock.time()), self.store.not_before(msg.subject))
        self.corral_metrics.add(ISSUED)
        if not msg.refresh:
            return AuthTokens(
                access_token=self._sign(msg.subject, "access", None, extra, issued_at=issued_at),
                expires_in=self.options.access_ttl,
            )
        family = secrets.token_urlsafe(16)
        pair = Pair(secrets.token_urlsafe(16), secrets.token_urlsafe(16), issued_at)
        deadline = issued_at + self.options.refresh_max_age
        self.store.start_family(family, pair, deadline=deadline, ttl=self.family_ttl)
        return self._pair(msg.subject, family, pair, deadline, extra)

    def _check_claims(self, subject: str, extra: dict[str, Any]) -> None:
        """Refuse claims that make no JWT, or one longer than validation would accept."""
        try:
            size = len(json.dumps({**extra, "sub": subject}, allow_nan=False))
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidMessage(f"claims must be JSON values: {exc}", path="claims") from None
        # Base64 makes 4 characters of 3 bytes; the header, other claims and signature
        # come on top, so this only refuses what could never validate.
        if size * 4 // 3 > self.options.max_token_size:
            raise InvalidMessage(
                f"subject, scopes and claims would make a token longer than max_token_size "
                f"({self.options.max_token_size})",
                path="claims",
            )

    @handles(AuthIssueSubscription)
    def issue_subscription(self, msg: AuthIssueSubscription) -> AuthTokens:
        if not msg.subject:
            raise InvalidMessage("must not be empty", path="subject")
        if not msg.room:
            raise InvalidMessage("must not be empty", path="room")
        ttl = self.options.access_ttl if msg.ttl is None else math.ceil(msg.ttl)
        if ttl > self.options.max_token_lifetime:
            raise InvalidMessage(
                f"must be <= max_token_lifetime ({self.options.max_token_lifetime} s)", path="ttl"
            )
        extra = {"room": msg.room}
        self._check_claims(msg.subject, extra)
        issued_at = max(int(self.clock.time()), self.store.not_before(msg.subject))
        self.corral_metrics.add(ISSUED)
        token = self._sign(msg.subject, "subscription", None, extra, issued_at=issued_at, ttl=ttl)
        return AuthTokens(access_token=token, expires_in=ttl)

    @handles(AuthValidate)
    def validate(self, msg: AuthValidate) -> AuthClaims:
        payload = self._verified(msg.token, msg.token_type)
        if self.store.is_revoked(
            payload["jti"], payload.get("fam"), payload["sub"], payload["iat"]
        ):
            self._reject("revoked", "the token has been revoked")
        scopes = self._scopes(payload)
        missing = [scope for scope in msg.scopes if scope not in scopes]
        if missing:
            self._reject("insufficient_scope", f"the token lacks the scope {missing[0]!r}")
        self.corral_metrics.add(VALIDATED)
        return AuthClaims(
            subject=payload["sub"],
            jti=payload["jti"],
            token_type=msg.token_type,
            expires_at=int(payload["exp"]),
            scopes=scopes,
            claims=payload,
        )

    @handles(AuthRefresh)
    def refresh(self, msg: AuthRefresh) -> AuthTokens:
        payload = self._verified(msg.token, "refresh")
        family: str = payload["fam"]
        subject: str = payload["sub"]
        not_before = self.store.not_before(subject)
        if payload["iat"] < not_before:
            self._reject("revoked", "every token of this user has been revoked")
        successor = Pair(
            secrets.token_urlsafe(16),
            secrets.token_urlsafe(16),
            max(int(self.clock.time()), not_before),
        )
        outcome, pair, deadline = self.store.rotate(
            family,
            payload["jti"],
            successor,
            grace=self.options.refresh_grace,
            ttl=self.family_ttl,
        )
        if outcome == "reused":
            log.warning(
                "auth: refresh token of %r reused; its token family is revoked", payload["sub"]
            )
            self._reject(
                "reused_refresh", "refresh token reused: every token of its login is revoked"
            )
        if outcome == "revoked":
            self._reject("revoked", "the token has been revoked")
        if outcome == "expired":
            self._reject("expired", "the login is older than refresh_max_age: log in again")
        self.corral_metrics.add(REFRESHED)
        extra = {k: v for k, v in payload.items() if k not in RESERVED_CLAIMS or k == "scope"}
        return self._pair(subject, family, pair, deadline, extra)

    @handles(AuthRevoke)
    def revoke(self, msg: AuthRevoke) -> AuthRevoked:
        payload = self._verified(msg.token, None, verify_exp=False)
        ttl = math.ceil(int(payload["exp"]) + self.options.leeway - self.clock.time())
        if ttl > 0:
            self.store.deny(payload["jti"], ttl)
        family = payload.get("fam")
        revoke_family = family is not None and (msg.family or payload["type"] == "refresh")
        if family is not None and revoke_family:
            self.store.revoke_family(family, self.family_ttl)
        self.corral_metrics.add(REVOKED)
        return AuthRevoked(jti=payload["jti"], ttl=max(0, ttl), family_revoked=revoke_family)

    @handles(AuthRevokeUser)
    def revoke_user(self, msg: AuthRevokeUser) -> AuthUserRevoked:
        if not msg.subject:
            raise InvalidMessage("must not be empty", path="subject")
        # The next whole second: every token issued up to now has an earlier iat, and
        # tokens issued later in this second carry this iat (see ``issue``).
        not_before = int(self.clock.time()) + 1
        self.store.revoke_user(msg.subject, not_before, self.not_before_ttl)
        self.corral_metrics.add(REVOKED)
        log.info("auth: every token of %r issued so far is revoked", msg.subject)
        return AuthUserRevoked(subject=msg.subject, not_before=not_before)

    @handles(AuthJwks)
    def jwks(self, _msg: AuthJwks) -> AuthKeySet:
        return AuthKeySet(keys=public_jwks(self.keys))

    @handles(AuthIsRevoked)
    def is_revoked(self, msg: AuthIsRevoked) -> AuthRevocation:
        return AuthRevocation(jti=msg.jti, revoked=self.store.is_denied(msg.jti))

    def _pair(
        self, subject: str, family: str, pair: Pair, deadline: int, extra: dict[str, Any]
    ) -> AuthTokens:
        """The access and refresh tokens of ``pair``, none living past the family's deadline.

        The same arguments make the same tokens, so a retried refresh gets the pair again.
        """
        settings, issued_at = self.options, pair.issued_at
        access_ttl = max(0, min(settings.access_ttl, deadline - issued_at))
        refresh_ttl = max(0, min(settings.refresh_ttl, deadline - issued_at))
        return AuthTokens(
            access_token=self._sign(
                subject,
                "access",
                family,
                extra,
                pair.access_jti,
                issued_at=issued_at,
                ttl=access_ttl,
            ),
            refresh_token=self._sign(
                subject,
                "refresh",
                family,
                extra,
                pair.refresh_jti,
                issued_at=issued_at,
                ttl=refresh_ttl,
            ),
            expires_in=access_ttl,
            refresh_expires_in=refresh_ttl,
        )

    def _sign(
        self,
        subject: str,
        token_type: TokenType,
        family: str | None,
        extra: dict[str, Any],
        jti: str | None = None,
        *,
        issued_at: int,
        ttl: int | None = None,
    ) -> str:
        ttl = self.options.access_ttl if ttl is None else ttl
        jti = jti or secrets.token_urlsafe(16)
        payload = {**extra, "sub": subject, "iat": issued_at, "exp": issued_at + ttl, "jti": jti}
        payload["type"] = token_type
        if family is not None:
            payload["fam"] = family
        if self.issuer is not None:
            payload["iss"] = self.issuer
        if self.audience is not None:
            payload["aud"] = self.audience
        return self.encoder.encode(
            payload,
            self.keys.signing_key,
            algorithm=self.keys.algorithm,
            headers={"kid": self.keys.signing_kid},
        )

    def _verified(
        self, token: str, token_type: TokenType | None, *, verify_exp: bool = True
    ) -> dict[str, Any]:
        """The payload of a token whose header, signature and claims all check out."""
        if len(token) > self.options.max_token_size:
            self._reject("malformed", f"the token is longer than {self.options.max_token_size}")
        header = _unverified_header(token)
        if header is None:
            self._reject("malformed", "not a JWT")
        algorithm = header.get("alg")
        if algorithm != self.keys.algorithm:
            self._reject("algorithm_not_allowed", f"algorithm {algorithm!r:.20} is not allowed")
        kid = header.get("kid")
        key = self.keys.verification.get(kid) if isinstance(kid, str) else None
        if key is None:
            self._reject("unknown_kid", f"no active key has kid {kid!r:.40}")
        try:
            payload: dict[str, Any] = self.decoder.decode(
                token,
                key,
                algorithms=[self.keys.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.options.leeway,
                options=None if verify_exp else {"verify_exp": False},
            )
        except Exception as exc:  # anything pyjwt raises, or trips on, refuses the token
            reason = next((r for kind, r in _REASONS if isinstance(exc, kind)), "malformed")
            self._reject(reason, f"{type(exc).__name__}: {exc}")
        kind = payload["type"]
        if kind not in _TOKEN_TYPES or (token_type is not None and kind != token_type):
            self._reject("wrong_token_type", f"expected an {token_type} token, got {kind!r:.20}")
        if kind == "refresh" and not isinstance(payload.get("fam"), str):
            self._reject("missing_claim", "a refresh token needs its family (fam)")
        if kind == "subscription" and not isinstance(payload.get("room"), str):
            self._reject("missing_claim", "a subscription token needs its room")
        if not isinstance(payload.get("fam", ""), str) or not isinstance(payload["exp"], int):
            self._reject("bad_claim", "fam must be a string and exp an integer")
        issued = payload["iat"]
        if isinstance(issued, bool) or not isinstance(issued, int | float):
            self._reject("bad_claim", "iat must be a number")
        limit = self.options.max_token_lifetime
        if not payload["exp"] - issued <= limit:  # a nan iat fails this too
            self._reject(
                "lifetime_exceeded", f"the token lives longer than {limit} s (max_token_lifetime)"
            )
        return payload

    @staticmethod
    def _scopes(payload: dict[str, Any]) -> list[str]:
        scope = payload.get("scope", "")
        return scope.split() if isinstance(scope, str) else []

    def _reject(self, reason: str, message: str) -> NoReturn:
        self.corral_metrics.add(REJECTED, reason)
        raise Unauthorized(message, {"reason": reason})

    # -- API keys -------------------------------------------------------------------------

    @handles(AuthApiKeyCreate)
    def create_api_key(self, msg: AuthApiKeyCreate) -> AuthApiKey:
        if msg.ttl is not None and not 0 < msg.ttl <= MAX_TTL:  # as the codec checks
            raise InvalidMessage(f"must be > 0 and <= {MAX_TTL} s", path="ttl")
        key_id = secrets.token_hex(8)
        secret = secrets.token_hex(32)
        created_at = self.clock.time()
        expires_at = created_at + msg.ttl if msg.ttl is not None else None
        record = {
            "hash": _digest(secret),
            "owner": msg.owner,
            "scopes": _scope_list(msg.scopes),
            "name": msg.name,
            "created_at": repr(created_at),
            "expires_at": "" if expires_at is None else repr(expires_at),
        }
        self.store.put_api_key(key_id, record, None if msg.ttl is None else math.ceil(msg.ttl))
        return _api_key(key_id, record, key=f"{self.options.api_key_prefix}_{key_id}_{secret}")

    @handles(AuthApiKeyValidate)
    def validate_api_key(self, msg: AuthApiKeyValidate) -> AuthApiKey:
        prefix, _, rest = msg.key.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != self.options.api_key_prefix or len(key_id) != 16 or len(secret) != 64:
            self._reject("invalid_api_key", "not an API key of this system")
        record = self.store.get_api_key(key_id)
        if record is None:
            self._reject("invalid_api_key", "unknown or revoked API key")
        found = _api_key(key_id, record)
        refusal: tuple[str, str] | None = None
        missing = [scope for scope in msg.scopes if scope not in found.scopes]
        if not hmac.compare_digest(record.get("hash", ""), _digest(secret)):
            refusal = ("invalid_api_key", "unknown or revoked API key")
        elif found.expires_at is not None and found.expires_at <= self.clock.time():
            refusal = ("expired", "the API key has expired")
        elif missing:
            refusal = ("insufficient_scope", f"the API key lacks the scope {missing[0]!r}")
        self._audit(found, "accepted" if refusal is None else refusal[0], msg.scopes)
        if refusal is not None:
            self._reject(*refusal)
        used_at = self.clock.time()
        self.store.update_api_key(key_id, {"last_used_at": repr(used_at)})
        return msgspec.structs.replace(found, last_used_at=used_at)

    def _audit(self, key: AuthApiKey, outcome: str, scopes: list[str]) -> None:
        """Publish an :class:`AuthApiKeyUsed` event; the bus being down refuses nothing."""
        event = AuthApiKeyUsed(key_id=key.key_id, owner=key.owner, outcome=outcome, scopes=scopes)
        try:
            self.router.publish(API_KEY_USED_TOPIC, event)
        except CorralError as exc:
            log.warning("auth: could not publish the use of API key %s: %s", key.key_id, exc)

    @handles(AuthApiKeyInfo)
    def api_key_info(self, msg: AuthApiKeyInfo) -> AuthApiKey:
        record = self.store.get_api_key(msg.key_id)
        if record is None:
            raise NotFound("no such API key", {"key_id": msg.key_id})
        return _api_key(msg.key_id, record)

    @handles(AuthApiKeyUpdate)
    def update_api_key(self, msg: AuthApiKeyUpdate) -> AuthApiKey:
        record = self.store.update_api_key(msg.key_id, {"scopes": _scope_list(msg.scopes)})
        if record is None:
            raise NotFound("no such API key", {"key_id": msg.key_id})
        return _api_key(msg.key_id, record)

    @handles(AuthApiKeyList)
    def list_api_keys(self, msg: AuthApiKeyList) -> AuthApiKeys:
        found = [_api_key(key_id, r) for key_id, r in self.store.api_keys_of(msg.owner).items()]
        return AuthApiKeys(keys=sorted(found, key=lambda key: (key.created_at, key.key_id)))

    @handles(AuthApiKeyRevoke)
    def revoke_api_key(self, msg: AuthApiKeyRevoke) -> AuthApiKey:
        record = self.store.delete_api_key(msg.key_id)
        if record is None:
            raise NotFound("no such API key", {"key_id": msg.key_id})
        return _api_key(msg.key_id, record)


def _unverified_header(token: str) -> dict[str, Any] | None:
    """The JOSE header, to pick the key; pyjwt checks the whole token again strictly.

    (``jwt.get_unverified_header`` costs about half of an HS256 verification.)
    """
    segment = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):  # bad base64, bad UTF-8, bad JSON, deep nesting
        return None
    return header if isinstance(header, dict) else None


def _digest(secret: str) -> str:
    # API key secrets are 256 random bits: a fast hash is enough, a slow KDF buys nothing.
    return hashlib.sha256(secret.encode()).hexdigest()


def _scope_list(scopes: list[str]) -> str:
    """Scopes as stored: space-separated, so none may be empty or hold whitespace."""
    for index, scope in enumerate(scopes):
        if not scope or len(scope.split()) != 1 or scope.strip() != scope:
            raise InvalidMessage("a scope is one word, without whitespace", path=f"scopes.{index}")
    return " ".join(scopes)


def _api_key(key_id: str, record: dict[str, str], *, key: str | None = None) -> AuthApiKey:
    expires_at = record.get("expires_at", "")
    last_used_at = record.get("last_used_at", "")
    return AuthApiKey(
        key_id=key_id,
        owner=record.get("owner", ""),
        scopes=record.get("scopes", "").split(),
        name=record.get("name", ""),
        created_at=float(record.get("created_at", "0")),
        expires_at=float(expires_at) if expires_at else None,
        key=key,
        last_used_at=float(last_used_at) if last_used_at else None,
    )


async def _jwks(system: AsyncRouter, _request: web.Request) -> web.Response:
    try:
        key_set = await system.ask_async(AuthJwks(), timeout=2.0)
    except CorralError as exc:
        return web.json_response({"error": exc.code, "message": exc.message}, status=503)
    return web.json_response(
        {"keys": key_set.keys}, headers={"Cache-Control": "public, max-age=300"}
    )
