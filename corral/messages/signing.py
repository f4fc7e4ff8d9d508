"""HMAC-SHA256 signatures and the replay guard that every signed channel of corral uses.

A :class:`Signer` signs a sequence of byte strings. The signed bytes are each string
but the last preceded by its length (4 bytes, big-endian), then the last one as it is:
one string is signed as it is. So a signature made for one channel, stream offset or
kind of payload never verifies for another, and any language can check it::

    signer = Signer([b"new key", b"old key"])      # the first signs; any of them verifies
    signature = signer.sign(b"corral:cache.invalidated", envelope)
    assert signer.verify(signature, b"corral:cache.invalidated", envelope)

A :class:`ReplayGuard` refuses what a receiver must not take twice: a signed timestamp
outside its window, or an id it has taken within the window::

    guard = ReplayGuard(window=60.0)
    guard.check(message_id, ts_ms)        # passes
    guard.check(message_id, ts_ms)        # InvalidMessage (path "id"): a duplicate
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections.abc import Callable, Sequence

from corral.errors import InvalidMessage

__all__ = ["DEFAULT_REPLAY_CAPACITY", "DEFAULT_REPLAY_WINDOW", "ReplayGuard", "Signer"]

DEFAULT_REPLAY_WINDOW = 60.0
"""Seconds a signed message stays acceptable after (and before) its timestamp."""

DEFAULT_REPLAY_CAPACITY = 250_000
"""How many ids a replay guard remembers before it shortens its window (about 50 MB)."""

_BUCKETS = 16
"""Ids are kept in this many sets per window, by timestamp, and forgotten a set at a time."""


class Signer:
    """HMAC-SHA256 over length-framed parts (see the module docstring), with key rotation."""

    def __init__(self, keys: Sequence[bytes] = ()) -> None:
        self.keys = tuple(keys)

    @property
    def keys(self) -> tuple[bytes, ...]:
        return self._keys

    @keys.setter
    def keys(self, keys: Sequence[bytes]) -> None:
        self._keys = tuple(keys)
        self._macs = tuple(_KeyedHash(key) for key in self._keys)
        self.signing = bool(self._macs)
        """Whether there are keys (read-only: set ``keys``)."""

    def sign(self, *parts: bytes) -> bytes:
        """The signature of ``parts`` with the first key (there must be one)."""
        return self._macs[0].digest(parts)

    def verify(self, signature: bytes, *parts: bytes) -> bool:
        """Whether ``signature`` is that of ``parts`` with any of the keys."""
        macs = self._macs
        if macs and hmac.compare_digest(macs[0].digest(parts), signature):  # mostly
            return True
        return len(macs) > 1 and any(
            hmac.compare_digest(mac.digest(parts), signature) for mac in macs[1:]
        )


class _KeyedHash:
    """HMAC-SHA256 (RFC 2104) with one key, from SHA-256 states that absorbed its pads.

    The same digest as ``hmac.new(key, message, "sha256")``; copying the two states
    costs half of what an ``hmac.HMAC`` copy does::

        assert _KeyedHash(b"k").digest((b"m",)) == hmac.new(b"k", b"m", "sha256").digest()
    """

    __slots__ = ("inner", "outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self.inner = hashlib.sha256(key.translate(_INNER_PAD))
        self.outer = hashlib.sha256(key.translate(_OUTER_PAD))

    def digest(self, parts: tuple[bytes, ...]) -> bytes:
        """The HMAC of ``parts``, length-framed as the module docstring says."""
        inner = self.inner.copy()
        if len(parts) > 1:
            for part in parts[:-1]:
                inner.update(len(part).to_bytes(4, "big") + part)
        inner.update(parts[-1])
        outer = self.outer.copy()
        outer.update(inner.digest())
        return outer.digest()


_BLOCK = hashlib.sha256().block_size
_INNER_PAD = bytes(b ^ 0x36 for b in range(256))
_OUTER_PAD = bytes(b ^ 0x5C for b in range(256))


class ReplayGuard:
    """Refuses a timestamp (unix ms) outside ``window`` seconds of this clock, and an id
    already taken with a timestamp in the window; thread-safe.

    Ids are remembered by timestamp, in sets that each cover a sixteenth of the window,
    and forgotten once their set has left the window. Past ``capacity`` ids, the oldest
    set is forgotten early and timestamps before its end are refused from then on: the
    window shortens rather than memory growing. ``remember=False`` checks timestamps only
    (for a channel whose duplicates something else catches). ``clock``: this receiver's
    time, in unix seconds (None: the machine's).
    """

    def __init__(
        self,
        window: float = DEFAULT_REPLAY_WINDOW,
        *,
        capacity: int = DEFAULT_REPLAY_CAPACITY,
        remember: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not (math.isfinite(window) and window > 0) or capacity < 1:
            raise ValueError("need a finite window > 0 and a capacity >= 1")
        self.clock = clock
        self.window = window
        self.window_ms = max(1, int(window * 1000))
        self.capacity = capacity
        self.remember = remember
        self._span = -(-self.window_ms // _BUCKETS)
        self._buckets: dict[int, set[bytes]] = {}
        self._size = 0
        self._floor = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many ids are remembered."""
        return self._size

    def check(
        self, message_id: bytes, ts: int, *, valid_until: int = 0, now_ms: int | None = None
    ) -> None:
        """Take a message, or raise InvalidMessage (path ``ts`` or ``id``) saying why not.

        ``valid_until`` (unix ms): a signed deadline that keeps a message acceptable past
        the window (a request waiting for a daemon); its timestamp must still not be ahead.
        """
        if now_ms is not None:
            now = now_ms
        elif self.clock is None:
            now = time.time_ns() // 1_000_000
        else:
            now = int(self.clock() * 1000)
        window = self.window_ms
        if ts > now + window:
            raise InvalidMessage(
                f"timestamp {ts} is more than {self.window:g} s ahead of this receiver's "
                "clock (replay window)",
                path="ts",
            )
        if ts < now - window and valid_until < now:
            raise InvalidMessage(
                f"timestamp {ts} is more than {self.window:g} s old (replay window)", path="ts"
            )
        if not self.remember:
            return
        index = ts // self._span
        buckets = self._buckets
        with self._lock:
            bucket = buckets.get(index)
            if bucket is None or message_id in bucket or ts < self._floor:
                self._remember_slowly(message_id, ts, now)
                return
            bucket.add(message_id)
            self._size += 1
            if self._size > self.capacity:
                self._shorten()

    def _remember_slowly(self, message_id: bytes, ts: int, now: int) -> None:
        """Take an id into a set not made yet, or refuse it (the lock held)."""
        if ts < self._floor:
            raise InvalidMessage(
                f"timestamp {ts} is older than the {self.capacity} ids this receiver "
                "remembers (replay window shortened under load)",
                path="ts",
            )
        index = ts // self._span
        bucket = self._buckets.get(index)
        if bucket is None:
            self._forget_before(now - self.window_ms)
            bucket = self._buckets[index] = set()
        elif message_id in bucket:
            raise InvalidMessage(
                "a message with this id was taken already (replay window)", path="id"
            )
        bucket.add(message_id)
        self._size += 1
        self._shorten()

    def _shorten(self) -> None:
        """Past capacity, forget the oldest sets, and refuse timestamps before their end."""
        while self._size > self.capacity and len(self._buckets) > 1:
            oldest = min(self._buckets)
            self._size -= len(self._buckets.pop(oldest))
            self._floor = max(self._floor, (oldest + 1) * self._span)

    def _forget_before(self, ts: int) -> None:
        """Drop the sets whose whole span is older than ``ts``."""
        for index in [i for i in self._buckets if (i + 1) * self._span <= ts]:
            self._size -= len(self._buckets.pop(index))
