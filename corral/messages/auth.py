"""Messages of the ``auth`` manager: JWT access and refresh tokens, revocation, API keys.

::

    tokens = system.ask(AuthIssue(subject="user:42", scopes=["read"]))
    claims = system.ask(AuthValidate(token=tokens.access_token, scopes=["read"]))
    claims.subject                                          # 'user:42'
    tokens = system.ask(AuthRefresh(token=tokens.refresh_token))   # a new pair
    system.ask(AuthRevoke(token=tokens.access_token))
    ticket = system.ask(AuthIssueSubscription(subject="user:42", room="game:7"))
    system.ask(AuthRevokeUser(subject="user:42"))           # every login of the user
    system.ask(AuthJwks()).keys                             # the public keys, as a JWKS

A refused token raises :class:`corral.errors.Unauthorized` whose
``details["reason"]`` is one of :data:`REASONS`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from corral.messages.base import Count, Event, Reply, Request, Ttl, message

__all__ = [
    "REASONS",
    "AuthApiKey",
    "AuthApiKeyCreate",
    "AuthApiKeyInfo",
    "AuthApiKeyList",
    "AuthApiKeyRevoke",
    "AuthApiKeyUpdate",
    "AuthApiKeyUsed",
    "AuthApiKeyValidate",
    "AuthApiKeys",
    "AuthClaims",
    "AuthIsRevoked",
    "AuthIssue",
    "AuthIssueSubscription",
    "AuthJwks",
    "AuthKeySet",
    "AuthRefresh",
    "AuthRevocation",
    "AuthRevoke",
    "AuthRevokeUser",
    "AuthRevoked",
    "AuthTokens",
    "AuthUserRevoked",
    "AuthValidate",
    "TokenType",
]

TokenType = Literal["access", "refresh", "subscription"]
"""``subscription``: a token that admits its subject to one WebSocket room (claim ``room``)."""

REASONS = (
    "malformed",  # not a JWT, or a part of it does not decode
    "algorithm_not_allowed",  # alg is not the configured one (alg none, HS/RS key confusion)
    "unknown_kid",  # no active verification key has the header's kid (or there is no kid)
    "bad_signature",  # the signature does not match the header and payload
    "expired",  # exp is past (beyond the leeway); an API key past its expiry; a login
    # past refresh_max_age
    "not_yet_valid",  # nbf or iat is in the future (beyond the leeway)
    "bad_audience",
    "bad_issuer",
    "missing_claim",  # one of exp, iat, sub, jti, type (and aud, iss when configured)
    "bad_claim",  # a registered claim of the wrong type
    "wrong_token_type",  # a refresh token where an access token is expected, or the like
    "lifetime_exceeded",  # exp - iat is longer than the configured max_token_lifetime
    "revoked",  # the jti is on the denylist, or its token family was revoked
    "reused_refresh",  # a retired refresh token came back: its whole family is now revoked
    "insufficient_scope",  # the token or API key lacks a required scope
    "invalid_api_key",  # unknown, revoked or wrong API key
)
"""The stable values of ``Unauthorized.details["reason"]``."""


@message("auth.issue")
class AuthIssue(Request["AuthTokens"]):
    """Issue an access token, and a refresh token starting a new token family.

    ``claims`` are extra private claims copied into both tokens; registered
    claims (``exp``, ``sub``, ...) and corral's own (``type``, ``fam``, ``scope``)
    cannot be set this way.
    """

    manager = "auth"
    subject: str
    scopes: list[str] = msgspec.field(default_factory=list)
    claims: dict[str, Any] = msgspec.field(default_factory=dict)
    refresh: bool = True


@message("auth.issue_subscription")
class AuthIssueSubscription(Request["AuthTokens"]):
    """Issue a subscription token: it admits ``subject``'s WebSocket connections to ``room``.

    The token (type ``subscription``, claim ``room``) is no access token, and an
    access token is no subscription token. ``ttl``: seconds it is valid, by
    default the access token lifetime, at most ``max_token_lifetime``::

        ticket = system.ask(AuthIssueSubscription(subject="user:42", room="game:7"))
        # the browser sends {"type": "join", "room": "game:7", "token": ticket.access_token}
    """

    manager = "auth"
    subject: str
    room: str
    ttl: Ttl | None = None


@message("auth.tokens")
class AuthTokens(Reply):
    """A token pair (``refresh_token`` is None when none was asked for)."""

    access_token: str
    expires_in: Count
    refresh_token: str | None = None
    refresh_expires_in: Count | None = None
    token_type: str = "Bearer"


@message("auth.validate", idempotent=True)
class AuthValidate(Request["AuthClaims"]):
    """Check a token completely (signature, claims, denylist); ``scopes`` are required."""

    manager = "auth"
    token: str
    token_type: TokenType = "access"
    scopes: list[str] = msgspec.field(default_factory=list)


@message("auth.claims")
class AuthClaims(Reply):
    """Who a valid token speaks for: its subject, id, scopes and every claim."""

    subject: str
    jti: str
    token_type: TokenType
    expires_at: int
    scopes: list[str]
    claims: dict[str, Any]


@message("auth.refresh")
class AuthRefresh(Request[AuthTokens]):
    """Trade a refresh token for a new pair; the presented one is retired.

    Presenting the token just retired again within ``refresh_grace`` seconds (two
    browser tabs refreshing at once) answers the same new pair; any other retired
    refresh token revokes the whole family: ``Unauthorized`` with reason
    ``reused_refresh``. A login ends ``refresh_max_age`` after it began, however
    often it was refreshed (reason ``expired``).
    """

    manager = "auth"
    token: str


@message("auth.revoke")
class AuthRevoke(Request["AuthRevoked"]):
    """Put a token's jti on the denylist for the rest of its life (logout).

    Revoking a refresh token, or any token with ``family=True``, also revokes
    its token family: every token issued from the same login.
    """

    manager = "auth"
    token: str
    family: bool = False


@message("auth.revoked")
class AuthRevoked(Reply):
    jti: str
    ttl: Count
    """Seconds the denylist entry lives; 0 when the token had expired already."""
    family_revoked: bool


@message("auth.revoke_user", idempotent=True)
class AuthRevokeUser(Request["AuthUserRevoked"]):
    """Revoke every token issued to ``subject`` so far: all its logins (refresh token
    families), access and subscription tokens. Tokens issued afterwards are valid::

        system.ask(AuthRevokeUser(subject="user:42"))     # "log out everywhere"
    """

    manager = "auth"
    subject: str


@message("auth.user_revoked")
class AuthUserRevoked(Reply):
    subject: str
    not_before: int
    """Unix seconds: tokens of ``subject`` issued before are refused (reason ``revoked``)."""


@message("auth.jwks", idempotent=True)
class AuthJwks(Request["AuthKeySet"]):
    """The public verification keys as a JSON Web Key Set (RFC 7517), each with its
    ``kid``; empty for the HS* algorithms, whose keys are secrets. The daemon serves it
    at ``GET /.well-known/jwks.json``::

        system.ask(AuthJwks()).keys     # [{"kty": "RSA", "kid": "2025", "n": ..., ...}]
    """

    manager = "auth"


@message("auth.key_set")
class AuthKeySet(Reply):
    keys: list[dict[str, Any]]


@message("auth.is_revoked", idempotent=True)
class AuthIsRevoked(Request["AuthRevocation"]):
    """Whether a jti is on the denylist (a revoked token)."""

    manager = "auth"
    jti: str


@message("auth.revocation")
class AuthRevocation(Reply):
    jti: str
    revoked: bool


@message("auth.api_key")
class AuthApiKey(Reply):
    """An API key's record; ``key`` (the secret) is set only in the reply to its creation."""

    key_id: str
    owner: str
    scopes: list[str]
    name: str
    created_at: float
    expires_at: float | None
    key: str | None = None
    last_used_at: float | None = None
    """When it last passed ``AuthApiKeyValidate`` (unix seconds); None: never."""


@message("auth.api_key_create")
class AuthApiKeyCreate(Request[AuthApiKey]):
    """Generate an API key for ``owner``; only its hash is stored, so show it once.

    ``ttl``: seconds until it expires (at most ten years); None: it never does.
    """

    manager = "auth"
    owner: str
    scopes: list[str] = msgspec.field(default_factory=list)
    name: str = ""
    ttl: Ttl | None = None


@message("auth.api_key_validate", idempotent=True)
class AuthApiKeyValidate(Request[AuthApiKey]):
    """Check an API key and that it has every scope in ``scopes``."""

    manager = "auth"
    key: str
    scopes: list[str] = msgspec.field(default_factory=list)


@message("auth.api_key_revoke")
class AuthApiKeyRevoke(Request[AuthApiKey]):
    """Delete an API key; ``NotFound`` when there is no such key."""

    manager = "auth"
    key_id: str


@message("auth.api_key_info", idempotent=True)
class AuthApiKeyInfo(Request[AuthApiKey]):
    """An API key's record (scopes, created, expires, last used), without its secret;
    ``NotFound`` when there is no such key::

        system.ask(AuthApiKeyInfo(key_id=created.key_id)).last_used_at
    """

    manager = "auth"
    key_id: str


@message("auth.api_key_update", idempotent=True)
class AuthApiKeyUpdate(Request[AuthApiKey]):
    """Replace an API key's scopes; the key and its secret stay. ``NotFound`` when there
    is no such key::

        system.ask(AuthApiKeyUpdate(key_id=created.key_id, scopes=["invoices:read"]))
    """

    manager = "auth"
    key_id: str
    scopes: list[str]


@message("auth.api_key_list", idempotent=True)
class AuthApiKeyList(Request["AuthApiKeys"]):
    """Every live API key of ``owner``, oldest first, without their secrets."""

    manager = "auth"
    owner: str


@message("auth.api_keys")
class AuthApiKeys(Reply):
    keys: list[AuthApiKey]


@message("auth.api_key_used")
class AuthApiKeyUsed(Event):
    """Published on ``auth.api_key.used`` each time an existing API key is presented:
    ``outcome`` is ``accepted`` or the refusal's reason (``invalid_api_key`` for a wrong
    secret, ``expired``, ``insufficient_scope``); ``scopes`` are those asked for::

        for event in system.subscribe("auth.api_key.used"):
            audit_log.write(event.key_id, event.owner, event.outcome)
    """

    key_id: str
    owner: str
    outcome: str
    scopes: list[str] = msgspec.field(default_factory=list)
