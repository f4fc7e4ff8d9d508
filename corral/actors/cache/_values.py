"""How a backend stores a value: its serializer, and the times at which it wants refreshing.

A msgpack value with no refresh times is stored as plain msgpack, so that any other
reader of Redis sees plain msgpack. Anything else is a frame::

    0xc1 "C1"               a byte msgpack never uses, then the frame's version
    serializer              b"m" msgpack, b"j" JSON, b"p" pickle
    refresh_at  8 bytes     unix ms (big-endian) from which one caller refreshes; 0: never
    stale_at    8 bytes     unix ms from which the value is served as stale; 0: never
    payload                 the serialized value; for pickle, its HMAC-SHA256 (32 bytes) first

With ``encryption_keys`` every value is a frame whose version is ``E1`` and whose payload
is encrypted with Fernet (:mod:`corral.encryption`'s keys: the first encrypts, any
decrypts), so nothing of it is readable in Redis.

So a value written by one serializer and read by a backend of another is refused with
an error naming both, and a pickle is unpickled only when its signature, made with one
of the configured keys over the cache key and the payload, verifies::

    values = ValueCodec("json", backend="main")        # or ("pickle", keys=(b"secret",))
    data = values.encode("k", {"a": 1}, refresh_at=None, stale_at=None)
    values.decode("k", data).value        # {'a': 1}
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from corral.errors import BackendUnavailable, InvalidMessage
from corral.messages.signing import Signer

__all__ = ["SERIALIZERS", "Serializer", "Stored", "ValueCodec"]

Serializer = Literal["msgpack", "json", "pickle"]
SERIALIZERS: tuple[Serializer, ...] = ("msgpack", "json", "pickle")

_MAGIC = b"\xc1C1"
_ENCRYPTED = b"\xc1E1"
_HEADER = struct.Struct(">3scQQ")
_IDS: dict[Serializer, bytes] = {"msgpack": b"m", "json": b"j", "pickle": b"p"}
_NAMES = {ident: name for name, ident in _IDS.items()}
_SIGNATURE_SIZE = 32
_PICKLE_CONTEXT = b"corral.cache.pickle"
"""Signed with every pickle: a signature made for anything else never verifies."""


@dataclass(frozen=True)
class Stored:
    """A decoded value and its refresh times (unix seconds; ``inf``: never)."""

    value: Any
    refresh_at: float = math.inf
    stale_at: float = math.inf


class ValueCodec:
    """One backend's serializer; ``keys``: the HMAC keys of a pickle backend (the first
    signs, any verifies; the options make sure it has one); ``encryption_keys``: Fernet
    keys that encrypt every value."""

    def __init__(
        self,
        serializer: Serializer,
        *,
        backend: str,
        keys: tuple[bytes, ...] = (),
        encryption_keys: tuple[str, ...] = (),
    ):
        self.serializer = serializer
        self.backend = backend
        self.signer = Signer(keys)
        self.fernet = (
            MultiFernet([Fernet(key) for key in encryption_keys]) if encryption_keys else None
        )

    def encode(
        self, key: str, value: Any, *, refresh_at: float | None, stale_at: float | None
    ) -> bytes:
        """The bytes stored for ``value``; InvalidMessage (path ``value``) when this
        serializer cannot carry it."""
        payload = self._serialize(value)
        plain = self.fernet is None
        if plain and self.serializer == "msgpack" and refresh_at is None and stale_at is None:
            return payload
        header = _HEADER.pack(
            _MAGIC if plain else _ENCRYPTED,
            _IDS[self.serializer],
            _unix_ms(refresh_at),
            _unix_ms(stale_at),
        )
        if self.serializer == "pickle":
            payload = self.signer.sign(_PICKLE_CONTEXT, key.encode(), header, payload) + payload
        if self.fernet is not None:
            payload = self.fernet.encrypt(payload)
        return header + payload

    def decode(self, key: str, data: bytes) -> Stored:
        """The value stored as ``data`` under ``key``; BackendUnavailable when it is not
        this serializer's, or a pickle whose signature does not verify."""
        encrypted = data.startswith(_ENCRYPTED)
        if not encrypted and not data.startswith(_MAGIC):
            if self.serializer != "msgpack":
                raise self._foreign(key, "msgpack")
            if self.fernet is not None:
                raise self._unreadable(key, "not encrypted, and this backend encrypts")
            return Stored(_unpack(data, key))
        if len(data) < _HEADER.size:
            raise self._unreadable(key, "a frame cut short")
        _, ident, refresh_ms, stale_ms = _HEADER.unpack_from(data)
        written_by = _NAMES.get(ident)
        if written_by is None:
            raise self._unreadable(key, f"an unknown serializer {ident!r}")
        if written_by != self.serializer:
            raise self._foreign(key, written_by)
        payload = data[_HEADER.size :]
        if encrypted != (self.fernet is not None):
            what = (
                "encrypted, and this backend has no encryption_keys"
                if encrypted
                else ("not encrypted, and this backend encrypts")
            )
            raise self._unreadable(key, what)
        if self.fernet is not None:
            try:
                payload = self.fernet.decrypt(payload)
            except InvalidToken:
                raise self._unreadable(key, "encrypted under none of the keys") from None
        if written_by == "pickle":
            signature, payload = payload[:_SIGNATURE_SIZE], payload[_SIGNATURE_SIZE:]
            header = data[: _HEADER.size]
            if not self.signer.verify(signature, _PICKLE_CONTEXT, key.encode(), header, payload):
                raise self._unreadable(key, "a pickle whose signature does not verify (refused)")
            try:
                value = pickle.loads(payload)
            except Exception as exc:  # signed by us, yet its classes may be gone
                raise self._unreadable(key, f"a pickle that does not load: {exc!r}") from None
        elif written_by == "json":
            try:
                value = json.loads(payload)
            except ValueError as exc:
                raise self._unreadable(key, f"not JSON: {exc}") from None
        else:
            value = _unpack(payload, key)
        return Stored(value, _unix_s(refresh_ms), _unix_s(stale_ms))

    def _serialize(self, value: Any) -> bytes:
        try:
            if self.serializer == "json":
                return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
            if self.serializer == "pickle":
                return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            data: bytes = msgpack.packb(value, use_bin_type=True)
            return data
        except (TypeError, ValueError, OverflowError, pickle.PicklingError) as exc:
            raise InvalidMessage(
                f"cannot encode the value as {self.serializer}: {exc}", path="value"
            ) from None

    def _foreign(self, key: str, written_by: str) -> BackendUnavailable:
        return BackendUnavailable(
            f"cache backend {self.backend!r}: the value of {key!r} was written by the "
            f"{written_by} serializer, and this backend reads {self.serializer} "
            "(its serializer option)",
            {"backend": self.backend, "key": key, "written_by": written_by},
        )

    def _unreadable(self, key: str, what: str) -> BackendUnavailable:
        return BackendUnavailable(
            f"cache backend {self.backend!r}: the value of {key!r} is {what}",
            {"backend": self.backend, "key": key},
        )


def _unpack(data: bytes, key: str) -> Any:
    """Maps keep the keys they were stored with (a system that does not validate may
    store keys that are not strings)."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises a handful of unrelated types
        raise BackendUnavailable(
            f"the stored value of {key!r} is not msgpack: {exc}", {"key": key}
        ) from None


def _unix_ms(at: float | None) -> int:
    return 0 if at is None else max(1, math.ceil(at * 1000))


def _unix_s(ms: int) -> float:
    return math.inf if ms == 0 else ms / 1000
