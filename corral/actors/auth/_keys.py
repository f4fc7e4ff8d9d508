"""The auth manager's keys: one signing key and the active verification keys, by ``kid``.

Every key of a ring serves the one configured algorithm, so a token's ``alg``
header can only ever select that algorithm: ``none`` and HS/RS key confusion
are refused before any key is used::

    ring = load_keyring("RS256", signing_key="/etc/corral/jwt.pem",
                        verification_keys={"2024-01": "/etc/corral/jwt-2024-01.pub"})
    ring.signing_kid                 # the kid new tokens carry
    ring.verification["2024-01"]     # an old public key, still accepted

Key material is a secret string for HS*, and PEM text or a path to a PEM file
for the asymmetric algorithms (a ``vault:`` reference is resolved by the config
layer before it gets here). Problems raise :class:`KeyProblem` naming the option.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jwt.algorithms import Algorithm, get_default_algorithms
from jwt.exceptions import InvalidKeyError

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "HMAC_MINIMUM_BYTES",
    "KeyProblem",
    "KeyRing",
    "load_keyring",
    "public_jwks",
]

HMAC_MINIMUM_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
"""RFC 7518 3.2: an HMAC key at least as long as the hash output."""

ASYMMETRIC_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip

_SELF_TEST = b"corral key self-test"


class KeyProblem(ValueError):
    """A key option is unusable; ``option`` names it (``signing_key``, ``verification_keys``)."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(problem)
        self.option = option
        self.problem = problem


@dataclass(frozen=True)
class KeyRing:
    """Prepared keys: pyjwt gets key objects, so no PEM is parsed per token."""

    algorithm: str
    signing_kid: str
    signing_key: Any
    verification: Mapping[str, Any]
    ephemeral: bool = False
    """True when the signing secret was generated for this process (no key configured)."""


def load_keyring(
    algorithm: str,
    *,
    signing_key: str,
    kid: str = "",
    verification_keys: Mapping[str, str] | None = None,
    ephemeral_secret: bytes | None = None,
) -> KeyRing:
    """Load and check the keys of one algorithm; see the module docstring.

    ``ephemeral_secret`` stands in for an empty ``signing_key`` with HS*.
    """
    implementation = _algorithm(algorithm)
    hmac = algorithm in HMAC_MINIMUM_BYTES
    ephemeral = False
    signing: Any
    if not signing_key:
        if not hmac or ephemeral_secret is None:
            raise KeyProblem(
                "signing_key", f"{algorithm} needs a signing_key (PEM text or a path to a PEM file)"
            )
        signing, ephemeral = ephemeral_secret, True
    elif hmac:
        signing = _hmac_key(algorithm, signing_key, "signing_key")
    else:
        signing = _private_key(implementation, signing_key)
    public = signing if hmac else signing.public_key()
    _self_test(implementation, signing, public)
    signing_kid = kid or _fingerprint(implementation, public)
    verification: dict[str, Any] = {}
    for other_kid, material in (verification_keys or {}).items():
        option = f"verification_keys.{other_kid}"
        if not isinstance(material, str) or not material:
            raise KeyProblem(option, "expected a non-empty string")
        verification[other_kid] = (
            _hmac_key(algorithm, material, option)
            if hmac
            else _public_key(implementation, material, option)
        )
    verification[signing_kid] = public
    return KeyRing(algorithm, signing_kid, signing, verification, ephemeral)


def public_jwks(ring: KeyRing) -> list[dict[str, Any]]:
    """The ring's public keys as JWKs (RFC 7517), each with its ``kid``; none for HS*::

    public_jwks(ring)   # [{"kty": "OKP", "crv": "Ed25519", "x": ..., "kid": "2025",
                        #   "alg": "EdDSA", "use": "sig"}]
    """
    if ring.algorithm in HMAC_MINIMUM_BYTES:
        return []
    implementation = _algorithm(ring.algorithm)
    return [
        {
            **implementation.to_jwk(key, as_dict=True),
            "kid": kid,
            "alg": ring.algorithm,
            "use": "sig",
        }
        for kid, key in sorted(ring.verification.items())
    ]


def _algorithm(name: str) -> Algorithm:
    implementation = get_default_algorithms().get(name)
    if implementation is None or name == "none":
        needs = " (install the 'cryptography' package)" if name in ASYMMETRIC_ALGORITHMS else ""
        raise KeyProblem("algorithm", f"{name} is not available{needs}")
    return implementation


def _hmac_key(algorithm: str, secret: str, option: str) -> bytes:
    key = secret.encode()
    minimum = HMAC_MINIMUM_BYTES[algorithm]
    if len(key) < minimum:
        raise KeyProblem(option, f"{algorithm} needs a secret of at least {minimum} bytes")
    if key.lstrip().startswith((b"-----BEGIN", b"ssh-")):
        raise KeyProblem(option, f"{algorithm} needs a secret, not a PEM or SSH key")
    return key


def _read(material: str, option: str) -> bytes:
    """PEM text as it is, anything else as the path of a PEM file."""
    if material.lstrip().startswith(("-----BEGIN", "ssh-")):
        return material.encode()
    try:
        return Path(material).expanduser().read_bytes()
    except OSError as exc:
        raise KeyProblem(option, f"cannot read key file {material!r}: {exc.strerror}") from None


def _prepare(implementation: Algorithm, material: str, option: str) -> Any:
    try:
        return implementation.prepare_key(_read(material, option))
    except (InvalidKeyError, ValueError, TypeError) as exc:
        raise KeyProblem(option, f"not a usable key: {exc}") from None


def _private_key(implementation: Algorithm, material: str) -> Any:
    key = _prepare(implementation, material, "signing_key")
    if not hasattr(key, "sign"):
        raise KeyProblem("signing_key", "expected a private key, got a public key")
    return key


def _public_key(implementation: Algorithm, material: str, option: str) -> Any:
    key = _prepare(implementation, material, option)
    return key.public_key() if hasattr(key, "sign") else key


def _self_test(implementation: Algorithm, signing: Any, public: Any) -> None:
    """Catch a key of the wrong family or curve at start rather than on the first token."""
    try:
        ok = implementation.verify(_SELF_TEST, public, implementation.sign(_SELF_TEST, signing))
    except Exception as exc:  # pyjwt and cryptography raise many kinds for a wrong key
        raise KeyProblem("signing_key", f"cannot sign with this key: {exc}") from None
    if not ok:
        raise KeyProblem("signing_key", "the key does not verify its own signature")


def _fingerprint(implementation: Algorithm, public: Any) -> str:
    """A kid derived from the key: the start of a SHA-256 of its (public) JWK, as in RFC 7638."""
    jwk = implementation.to_jwk(public, as_dict=True)
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(b"corral-kid:" + canonical).hexdigest()[:16]
