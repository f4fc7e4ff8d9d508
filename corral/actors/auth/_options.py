"""Options of the ``auth`` manager: algorithm, keys, lifetimes, backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from corral.actors.auth._keys import KeyProblem, KeyRing, load_keyring
from corral.config import REDIS_URL, Section
from corral.messages.base import MAX_TIMEOUT, MAX_TTL

__all__ = ["Algorithm", "AuthOptions"]

Algorithm = Literal[
    "HS256", "HS384", "HS512",
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
]  # fmt: skip


@dataclass(frozen=True, kw_only=True, repr=False)
class AuthOptions(Section):
    """``[managers.auth]``. Keys and secrets may be ``vault:`` references (resolved by config).

    ``backend = "auto"`` keeps state in Redis when the system has one (``redis_url``
    or a Redis bus), else in memory. With HS* and no ``signing_key``, a random
    secret is made for this process: tokens die with it.

    ``max_token_lifetime`` (seconds, default 30 days, at most ten years) bounds
    ``exp - iat`` of every token accepted, ours or another issuer's with our key;
    ``access_ttl`` and ``refresh_ttl`` must fit in it.
    """

    backend: Literal["auto", "memory", "redis"] = "auto"
    redis_url: str = field(default="", metadata=REDIS_URL)
    redis_timeout: float = field(default=1.0, metadata={"gt": 0})
    algorithm: Algorithm = "HS256"
    signing_key: str = field(default="", metadata={"secret": True})
    """HS*: the secret; others: a PEM private key, or the path of one."""
    kid: str = ""
    """The ``kid`` header of new tokens; empty: derived from the key."""
    verification_keys: dict[str, str] = field(default_factory=dict, metadata={"secret": True})
    """Older keys still accepted, by kid (secrets, or public keys as PEM or paths)."""
    issuer: str = ""
    audience: str = ""
    access_ttl: int = field(default=900, metadata={"ge": 1, "le_field": "max_token_lifetime"})
    refresh_ttl: int = field(
        default=1_209_600, metadata={"ge": 1, "le_field": "max_token_lifetime"}
    )
    max_token_lifetime: int = field(default=30 * 86_400, metadata={"ge": 1, "le": MAX_TTL})
    refresh_grace: float = field(default=10.0, metadata={"ge": 0, "le": MAX_TIMEOUT})
    """Seconds in which the refresh token just retired answers the same new pair again."""
    refresh_max_age: int = field(default=30 * 86_400, metadata={"ge": 1, "le": MAX_TTL})
    """Seconds a login (a refresh token family) lasts at most, however often it rotates."""
    leeway: float = field(default=5.0, metadata={"ge": 0, "le": MAX_TIMEOUT})
    max_token_size: int = field(default=8192, metadata={"ge": 64})
    api_key_prefix: str = "ck"

    def __post_init__(self) -> None:
        super().__post_init__()
        for kid, material in self.verification_keys.items():
            if not isinstance(material, str):
                self._fail(
                    f"verification_keys.{kid}", f"expected str, got {type(material).__name__}"
                )
        if not self.api_key_prefix.isalnum():
            self._fail(
                "api_key_prefix", f"expected letters and digits, got {self.api_key_prefix!r}"
            )
        try:  # fail at start-up, naming the option, rather than on the first token
            self.keyring(ephemeral_secret=b"\0" * 64)
        except KeyProblem as exc:
            self._fail(exc.option, exc.problem)

    def keyring(self, *, ephemeral_secret: bytes) -> KeyRing:
        return load_keyring(
            self.algorithm,
            signing_key=self.signing_key,
            kid=self.kid,
            verification_keys=self.verification_keys,
            ephemeral_secret=ephemeral_secret,
        )
