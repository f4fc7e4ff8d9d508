"""Message codec throughput: corral's Codec against plain msgpack, side by side.

Run as ``python bench/codec.py``. Each corral figure is one ``encode`` plus one
``decode`` (which validates the envelope and every field); its reference is
``msgpack.packb`` plus ``msgpack.unpackb`` of the equivalent envelope dict, built
once. "Signed" signs and verifies; "replay-checked" signs for a channel, verifies,
and passes the decoded envelope through a replay guard (timestamp window, duplicate
ids), as every receiver of a signed channel does. A signed envelope is held to two
references: plain msgpack, and what one would write by hand to sign msgpack with the
same HMAC-SHA256 and key: ``packb`` with ``hmac.new(key, data, hashlib.sha256).digest()``
appended on send, and on receive ``hmac.compare_digest`` of a fresh ``hmac.new`` digest
of the rest, then ``unpackb`` (no field checks, no replay guard). The last row is what
signing and the replay guard cost against unsigned. Figures are calls per second: every
case runs in many short slices, interleaved with the others so that load from elsewhere
hits all of them alike, and the best slice counts. The design targets (reported, not
asserted): at least 1.5x msgpack unsigned, 1.0x signed.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

import msgpack
import msgspec
from _report import Row, report, timed

from corral.messages import Codec, Message, Reply, Request, message

ROUNDS = 25
SLICE_SECONDS = 0.025
TARGET = 1.5
SIGNED_TARGET = 1.0


@message("bench.cache_value")
class BenchCacheValue(Reply):
    value: bytes | None = None


@message("bench.get")
class BenchCacheGet(Request[BenchCacheValue]):
    """A cache-get-like request: the common small message."""

    manager = "cache"
    key: str
    namespace: str = "default"
    ttl: int | None = None


@message("bench.bulk_set")
class BenchBulkSet(Request[BenchCacheValue]):
    """A larger message: a 50-entry map in an ``Any`` field."""

    manager = "cache"
    namespace: str = "default"
    values: Any = msgspec.field(default_factory=dict)


SMALL = BenchCacheGet(key="user:42", namespace="default", ttl=300)
LARGE = BenchBulkSet(
    namespace="sessions",
    values={
        f"user:{i:05d}": {
            "name": f"user {i}",
            "score": i * 1.5,
            "tags": ["a", "b"],
            "ok": i % 2 == 0,
        }
        for i in range(50)
    },
)
REPLY_TO = None
KEYS = [b"k" * 32]
CHANNEL = b"corral:bench.topic"


def _envelope(msg: Message) -> dict[str, Any]:
    """The plain dict corral puts on the wire for ``msg`` (unsigned)."""
    return {
        "t": msg.type_name,
        "v": msg.wire_version,
        "id": bytes(16),
        "c": None,
        "r": REPLY_TO,
        "ts": int(time.time() * 1000),
        "b": msg.to_wire(),
    }


def _corral(codec: Codec, msg: Message) -> Callable[[], object]:
    encode, decode = codec.encode, codec.decode

    def run() -> object:
        return decode(encode(msg, reply_to=REPLY_TO))

    return run


def _replay_checked(codec: Codec, msg: Message) -> Callable[[], object]:
    encode, decode, guard = codec.encode, codec.decode, codec.replay_guard()

    def run() -> object:
        data = encode(msg, reply_to=REPLY_TO, channel=CHANNEL)
        return decode(data, channel=CHANNEL, guard=guard)

    return run


def _plain(envelope: dict[str, Any]) -> Callable[[], object]:
    packb, unpackb = msgpack.packb, msgpack.unpackb

    def run() -> object:
        return unpackb(packb(envelope, use_bin_type=True), raw=False)

    return run


def _by_hand(envelope: dict[str, Any]) -> Callable[[], object]:
    """msgpack signed by hand: the HMAC of the packed bytes appended, checked before unpacking."""
    packb, unpackb, new, sha256, compare = (
        msgpack.packb,
        msgpack.unpackb,
        hmac.new,
        hashlib.sha256,
        hmac.compare_digest,
    )
    key = KEYS[0]

    def run() -> object:
        data = packb(envelope, use_bin_type=True)
        data += new(key, data, sha256).digest()
        body = data[:-32]
        if not compare(new(key, body, sha256).digest(), data[-32:]):
            raise ValueError("signature does not match")
        return unpackb(body, raw=False)

    return run


def _calls_per_slice(fn: Callable[[], object]) -> int:
    """How many calls of ``fn`` take about SLICE_SECONDS."""
    n = 10
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed > SLICE_SECONDS / 4:
            return max(1, int(n * SLICE_SECONDS / elapsed))
        n *= 4


def main() -> None:
    plain, signed = Codec(), Codec(keys=KEYS)
    small_env, large_env = _envelope(SMALL), _envelope(LARGE)
    cases: dict[str, Callable[[], object]] = {
        "small": _corral(plain, SMALL),
        "small signed": _corral(signed, SMALL),
        "small replay-checked": _replay_checked(signed, SMALL),
        "small msgpack": _plain(small_env),
        "small by hand": _by_hand(small_env),
        "large": _corral(plain, LARGE),
        "large signed": _corral(signed, LARGE),
        "large replay-checked": _replay_checked(signed, LARGE),
        "large msgpack": _plain(large_env),
        "large by hand": _by_hand(large_env),
        "small encode": lambda: plain.encode(SMALL, reply_to=REPLY_TO),
        "small packb": lambda: msgpack.packb(small_env, use_bin_type=True),
    }
    small_bytes = plain.encode(SMALL, reply_to=REPLY_TO)
    small_packed = msgpack.packb(small_env, use_bin_type=True)
    cases["small decode"] = lambda: plain.decode(small_bytes)
    cases["small unpackb"] = lambda: msgpack.unpackb(small_packed, raw=False)

    sizes = {n: _calls_per_slice(fn) for n, fn in cases.items()}
    best = dict.fromkeys(cases, 0.0)
    for _ in range(ROUNDS):
        for name, fn in cases.items():
            best[name] = max(best[name], timed(fn, sizes[name]))

    large_bytes = plain.encode(LARGE, reply_to=REPLY_TO)
    signed_bytes = signed.encode(SMALL, reply_to=REPLY_TO)
    rows = [
        Row(f"small encode+decode ({len(small_bytes)} B)", best["small"], best["small msgpack"]),
        Row(
            f"small signed encode+decode ({len(signed_bytes)} B)",
            best["small signed"],
            best["small msgpack"],
        ),
        Row(
            "small signed vs msgpack + hmac by hand",
            best["small signed"],
            best["small by hand"],
        ),
        Row(
            "small signed, replay-checked encode+decode",
            best["small replay-checked"],
            best["small msgpack"],
        ),
        Row(f"large encode+decode ({len(large_bytes)} B)", best["large"], best["large msgpack"]),
        Row("large signed encode+decode", best["large signed"], best["large msgpack"]),
        Row("large signed vs msgpack + hmac by hand", best["large signed"], best["large by hand"]),
        Row(
            "large signed, replay-checked encode+decode",
            best["large replay-checked"],
            best["large msgpack"],
        ),
        Row("small encode only", best["small encode"], best["small packb"]),
        Row("small decode only", best["small decode"], best["small unpackb"]),
        Row(
            "small signed + replay-checked vs unsigned (corral)",
            best["small replay-checked"],
            best["small"],
        ),
    ]
    report(
        "corral Codec vs plain msgpack (figure: corral, reference: msgpack packb/unpackb, "
        "signed with hmac by hand where named)",
        rows,
        note=(
            f"design target: ratio >= {TARGET}x, signed >= {SIGNED_TARGET}x; "
            f"best of {ROUNDS} interleaved slices per case"
        ),
    )


if __name__ == "__main__":
    main()
