"""Field encryption: fields of state data kept encrypted at rest, and searchable.

A :class:`FieldCipher` encrypts chosen top-level fields of a data map with Fernet
(AES-128-CBC and HMAC-SHA256, from ``cryptography``) under the first of its keys, and
decrypts with any of them, so keys rotate: put the new key first, keep the old ones
after it until everything was written again (:meth:`FieldCipher.rotate`). An encrypted
field holds the text ``fernet:<token>`` (its value packed with msgpack, then encrypted).
A searchable field also gets a search token: an HMAC-SHA256 of its value under a key of
its own, the same for the same value, so that finding "the user whose email is x" needs
no plaintext::

    cipher = FieldCipher([Fernet.generate_key().decode()], search_key="another secret")
    sealed = cipher.seal({"email": "ada@example.com", "plan": "pro"}, ["email"])
    # {"email": "fernet:gAAAAABn...", "plan": "pro"}
    cipher.open(sealed, ["email"])             # {"email": "ada@example.com", "plan": "pro"}
    cipher.search_token("User", "email", "ada@example.com")   # '9f1c...' (32 hex digits)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Mapping, Sequence
from typing import Any, TypeGuard

import msgpack
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from corral.errors import ConfigError

__all__ = ["PREFIX", "FieldCipher"]

PREFIX = "fernet:"
"""How an encrypted field's text begins."""


class FieldCipher:
    """Encrypts and decrypts fields of data maps; see the module docstring.

    ``keys``: Fernet keys (url-safe base64 of 32 bytes, ``Fernet.generate_key()``), the
    first encrypts; ``search_key``: any secret text, for :meth:`search_token`.
    """

    def __init__(self, keys: Sequence[str], *, search_key: str = "") -> None:
        if not keys:
            raise ConfigError("field encryption needs at least one key")
        fernets = []
        for i, key in enumerate(keys):
            try:
                fernets.append(Fernet(key))
            except (ValueError, TypeError):
                raise ConfigError(
                    f"encryption key {i} is not a Fernet key (url-safe base64 of 32 bytes: "
                    'python -c "from cryptography.fernet import Fernet; '
                    'print(Fernet.generate_key().decode())")',
                    {"index": i},
                ) from None
        self._first = fernets[0]
        self._all = MultiFernet(fernets)
        self._search = search_key.encode()

    def encrypt(self, value: Any) -> str:
        """``value`` (any msgpack value) as the text an encrypted field holds."""
        packed = msgpack.packb(value, use_bin_type=True)
        return PREFIX + self._first.encrypt(packed).decode()

    def decrypt(self, text: str) -> Any:
        """The value ``text`` (from :meth:`encrypt`) holds; ConfigError when none of the
        keys opens it (a key missing from the list, or the text altered)."""
        if not isinstance(text, str) or not text.startswith(PREFIX):
            raise ConfigError("not an encrypted field")
        try:
            packed = self._all.decrypt(text[len(PREFIX) :].encode())
        except InvalidToken:
            raise ConfigError(
                "none of the encryption keys opens this field (a key missing, or the field altered)"
            ) from None
        return msgpack.unpackb(packed, raw=False)

    def seal(self, data: Mapping[str, Any], fields: Collection[str]) -> dict[str, Any]:
        """``data`` with each of ``fields`` it holds encrypted (those already are stay)."""
        sealed = dict(data)
        for field in fields:
            value = sealed.get(field)
            if field in sealed and not _is_sealed(value):
                sealed[field] = self.encrypt(value)
        return sealed

    def open(self, data: Mapping[str, Any], fields: Collection[str]) -> dict[str, Any]:
        """``data`` with each encrypted one of ``fields`` decrypted."""
        opened = dict(data)
        for field in fields:
            value = opened.get(field)
            if _is_sealed(value):
                opened[field] = self.decrypt(value)
        return opened

    def stale(self, data: Mapping[str, Any], fields: Collection[str]) -> bool:
        """Whether one of ``fields`` is encrypted under another key than the first."""
        for field in fields:
            value = data.get(field)
            if _is_sealed(value):
                token = value[len(PREFIX) :].encode()
                try:
                    self._first.decrypt(token)
                except InvalidToken:
                    return True
        return False

    def search_token(self, state_type: str, field: str, value: Any) -> str:
        """The search token of ``value`` in ``field`` of ``state_type`` states."""
        if not self._search:
            raise ConfigError("searchable fields need a search_key")
        packed = msgpack.packb([state_type, field, value], use_bin_type=True)
        return hmac.new(self._search, packed, hashlib.sha256).hexdigest()[:32]


def _is_sealed(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and value.startswith(PREFIX)
