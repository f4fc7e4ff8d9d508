"""Fuzzing ``Codec.decode``: whatever arrives, the only exception is InvalidMessage.

Three kinds of input, 10,000 examples each, fed to a plain and to a signing codec:
random bytes (and mutations of real messages), random msgpack structures, and
structures shaped like envelopes, with registered type names and bodies built
from each message's own field types (valid, nearly valid, or junk). Anything that
decodes must be a registered message of the type the envelope names, and the codec's
msgspec path must agree with its reference path (msgpack and each message's own
checks) on every input: the same envelope, or the same error.

Then plain ``msgpack`` as the reference of the wire, over every registered message
type: what corral encodes, ``msgpack.unpackb`` reads, and what ``msgpack.packb``
writes of a well-formed envelope, corral decodes.

Examples are derandomized, so a run is reproducible and CI sees the same inputs.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import random
import types
import typing
from typing import Annotated, Any, Literal

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from corral.errors import InvalidMessage
from corral.messages import (
    Codec,
    Event,
    Message,
    Reply,
    Request,
    lookup,
    message,
    registered,
    validate,
)
from corral.messages.base import Range

KEY = b"fuzz-key"
# Deep enough for every valid body built below, shallow enough for "too_deep" to pass it.
PLAIN = Codec(max_size=4096, max_depth=12)
SIGNING = Codec(keys=[b"other", KEY], max_size=4096, max_depth=12)

FUZZ = settings(
    max_examples=10_000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Flavor(enum.Enum):
    SWEET = "sweet"
    ONE = 1


@message("test.fuzz_part")
class FuzzPart(Reply):
    name: str
    weight: float = 0.0
    share: Annotated[float, Range(gt=0, le=1)] = 1.0
    size: Annotated[int, Range(ge=0, le=2**53)] | None = None
    wild: Annotated[float, Range(finite=False)] = 0.0


@message("test.fuzz_order")
class FuzzOrder(Request[FuzzPart]):
    """A message with one field of each kind, so that fuzzed bodies reach every check."""

    manager = "fuzz"
    key: str
    count: int
    ratio: float
    ok: bool
    raw: bytes
    tags: list[str]
    totals: dict[str, int]
    limit: int | None
    either: int | str
    mode: Literal["a", "b", 3]
    flavor: Flavor
    part: FuzzPart
    parts: list[FuzzPart]
    maybe_part: FuzzPart | None
    extra: Any
    note: str = ""
    more: list[FuzzPart] = msgspec.field(default_factory=list)


class Size(enum.Enum):
    SMALL = "s"
    LARGE = "l"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@message("test.fuzz_typed")
class FuzzTyped(Request[FuzzPart]):
    """Every kind of field msgspec decodes in C (FuzzOrder's enum mixes str and int)."""

    manager = "fuzz"
    key: str
    count: int
    ratio: float
    ok: bool
    raw: bytes
    tags: list[str]
    totals: dict[str, int]
    limit: int | None
    either: int | str
    either_number: int | float
    mode: Literal["a", "b", 3]
    size: Size
    level: Level
    part: FuzzPart
    parts: list[FuzzPart]
    parts_by_name: dict[str, FuzzPart]
    maybe_part: FuzzPart | None
    maybe_parts: list[FuzzPart] | None
    extra: Any
    extras: list[Any]
    details: dict[str, Any] | None
    note: str = ""
    ttl: Annotated[float, Range(gt=0, le=60)] | None = None
    few: Annotated[int, Range(gt=0.5, le=3.5)] = 1
    more: list[FuzzPart] = msgspec.field(default_factory=list)
    spare: FuzzPart = FuzzPart(name="spare")


@message("test.fuzz_versioned", version=3)
class FuzzVersioned(Event):
    """Version 3; older bodies are upgraded (and may be junk, which must still fail cleanly)."""

    name: str
    size: int = 0

    @classmethod
    def upgrade(cls, fields: dict[str, Any], from_version: int) -> dict[str, Any]:
        fields = dict(fields)
        if from_version < 2 and "title" in fields:
            fields["name"] = fields.pop("title")
        return fields


# -- strategies ------------------------------------------------------------------------------

TEXT = st.text(max_size=8)
INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
# Leaves, with values msgpack carries that no message field accepts (ext types, timestamps).
LEAVES = st.one_of(
    st.sampled_from([None, True, False, msgpack.ExtType(1, b"x"), msgpack.Timestamp(5, 0)]),
    INTS,
    st.floats(),
    TEXT,
    st.binary(max_size=8),
)
KEYS = st.one_of(TEXT, st.sampled_from(["t", "v", "id", "b", "s"]), st.binary(max_size=4), INTS)
# Recursive maps and lists (st.deferred: as varied as st.recursive here, and a third cheaper).
STRUCTURES: st.SearchStrategy[Any] = st.deferred(
    lambda: (
        LEAVES | st.lists(STRUCTURES, max_size=4) | st.dictionaries(KEYS, STRUCTURES, max_size=4)
    )
)

# Envelope-shaped input is built by plain Python from a seed that hypothesis draws,
# with a kind of damage that hypothesis draws too: building these from nested
# strategies costs ~10 ms an example, this well under 1 ms. The messages are
# corral's own and this file's: the same set whichever other tests were imported.
MESSAGE_CLASSES = sorted(
    (
        c
        for c in registered().values()
        if c.__module__.startswith("corral.") or c.__module__ == __name__
    ),
    key=lambda cls: cls.type_name,
)
DAMAGES = [
    "none",
    "none",
    "field_junk",
    "field_missing",
    "field_extra",
    "nested_junk",
    "too_deep",
    "entry_junk",
    "entry_missing",
    "entry_extra",
    "version",
    "type_name",
    "body_junk",
    "field_extreme",
]
EXTREMES: list[Any] = [
    float("inf"),
    float("-inf"),
    float("nan"),
    1e308,
    -1e308,
    2**63,
    2**64 - 1,
    -(2**63),
    -1,
    0,
    0.0,
]
ODD_VALUES: list[Any] = [
    msgpack.ExtType(1, b"x"),
    msgpack.Timestamp(0, 0),
    float("nan"),
    2**64 - 1,
    -(2**63),
    b"\xff",
    "",
    True,
]


def valid_value(annotation: Any, rng: random.Random, depth: int = 0) -> Any:
    """A random wire value that a field of this type accepts."""
    if annotation is Any:
        return junk(rng, depth, odd=False, str_keys=True)
    if typing.get_origin(annotation) is Annotated:
        base, *extras = typing.get_args(annotation)
        bounds = [extra for extra in extras if isinstance(extra, Range)]
        return valid_number(base, bounds[0], rng) if bounds else valid_value(base, rng, depth)
    if annotation is str:
        return rng.choice(["", "k", "ключ", "a.b", "x" * rng.randrange(40)])
    if annotation is int:
        return rng.choice([0, 1, -1, 2**63 - 1, -(2**63), rng.randrange(-1000, 1000)])
    if annotation is float:
        return rng.choice([0.0, -1.5, -1e308, 1e300, rng.random(), rng.randrange(100)])
    if annotation is bool:
        return rng.random() < 0.5
    if annotation is bytes:
        return rng.randbytes(rng.randrange(20))
    if annotation is type(None):
        return None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return [valid_value(args[0], rng, depth + 1) for _ in range(rng.randrange(4))]
    if origin is dict:
        return {f"k{i}": valid_value(args[1], rng, depth + 1) for i in range(rng.randrange(4))}
    if origin in (typing.Union, types.UnionType):
        return valid_value(rng.choice(args), rng, depth)
    if origin is Literal:
        return rng.choice(args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return rng.choice([m.value for m in annotation])
    if isinstance(annotation, type) and issubclass(annotation, Message):
        return valid_body(annotation, rng, depth + 1)
    raise AssertionError(f"no generator for {annotation!r}")


def valid_number(kind: type, bounds: Range, rng: random.Random) -> float:
    """A number within ``bounds`` (its ends included when they are)."""
    if not bounds.finite:  # (nan too, but a message holding it is not equal to itself)
        return rng.choice([float("inf"), float("-inf"), -1.5])
    floor, ceiling = (-(2**63), 2**63 - 1) if kind is int else (-1e308, 1e308)
    low: float = floor if bounds.ge is None and bounds.gt is None else bounds.ge or bounds.gt or 0
    high: float = ceiling if bounds.le is None else bounds.le
    if kind is int:
        first = int(low) + (1 if bounds.gt is not None else 0)
        return rng.choice([first, int(high), rng.randint(first, int(high))])
    start = math.nextafter(low, high) if bounds.gt is not None else low
    return rng.choice([start, float(high), low / 2 + high / 2])


def valid_body(cls: type[Message], rng: random.Random, depth: int = 0) -> dict[str, Any]:
    return {
        f.name: valid_value(f.annotation, rng, depth)
        for f in cls.fields_info
        if f.required or rng.random() < 0.5
    }


def junk(rng: random.Random, depth: int = 0, *, odd: bool = True, str_keys: bool = False) -> Any:
    """Any msgpack value; with ``odd``, also ext types, timestamps and strange keys."""
    roll = rng.random()
    if depth < 3 and roll < 0.25:
        return [junk(rng, depth + 1, odd=odd, str_keys=str_keys) for _ in range(rng.randrange(4))]
    if depth < 3 and roll < 0.5:
        keys: list[Any] = ["a", "name", "t", "b", ""]
        if odd and not str_keys:
            keys += [b"a", 1, -1]
        return {
            rng.choice(keys): junk(rng, depth + 1, odd=odd, str_keys=str_keys)
            for _ in range(rng.randrange(4))
        }
    leaves: list[Any] = [None, True, False, 0, -7, 3.25, "s", "health.check", b"", b"\x00" * 16]
    if odd:
        leaves += ODD_VALUES
    return rng.choice(leaves)


def _containers(value: Any) -> list[Any]:
    """Every list and map inside ``value``, ``value`` included."""
    found: list[Any] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            found.append(item)
            stack.extend(item)
    return found


def damage(env: dict[Any, Any], kind: str, rng: random.Random) -> None:
    """Break ``env`` in place in the way named by ``kind``."""
    body = env["b"]
    cls = lookup(env["t"])
    assert cls is not None
    if kind == "field_junk" and body:
        body[rng.choice(list(body))] = junk(rng)
    elif kind == "field_missing" and body:
        del body[rng.choice(list(body))]
    elif kind == "field_extra":
        body[rng.choice(["extra", "name", b"key", "x" * 9])] = junk(rng)
    elif kind == "nested_junk":
        target = rng.choice(_containers(body))
        if isinstance(target, dict) and target:
            target[rng.choice(list(target))] = junk(rng)
        elif isinstance(target, list) and target:
            target[rng.randrange(len(target))] = junk(rng)
        else:
            body["extra"] = junk(rng)
    elif kind == "too_deep":
        value: Any = junk(rng, odd=False, str_keys=True)
        for _ in range(rng.randrange(5, 12)):
            value = [value] if rng.random() < 0.5 else {"d": value}
        body[rng.choice([f.name for f in cls.fields_info] or ["x"])] = value
    elif kind == "entry_junk":
        env[rng.choice(["t", "v", "id", "c", "r", "ts", "b"])] = junk(rng)
    elif kind == "entry_missing":
        del env[rng.choice(["t", "v", "id", "c", "r", "ts", "b"])]
    elif kind == "entry_extra":
        env[rng.choice(["x", "sig", "T", b"t", 5])] = junk(rng)
    elif kind == "version":
        env["v"] = rng.choice([0, -1, cls.wire_version + 1, 2**64 - 1, 1, 2, True, 1.0])
    elif kind == "type_name":  # another message's name on this body, or no message's
        env["t"] = rng.choice([*(c.type_name for c in MESSAGE_CLASSES), "test.fuzz_none", ""])
    elif kind == "body_junk":
        env["b"] = junk(rng)
    elif kind == "field_extreme":  # a number out of (or at the very end of) any bounds
        targets = _containers(body)
        target = rng.choice(targets)
        if isinstance(target, dict) and target:
            target[rng.choice(list(target))] = rng.choice(EXTREMES)
        elif isinstance(target, list) and target:
            target[rng.randrange(len(target))] = rng.choice(EXTREMES)
        else:
            body[rng.choice([f.name for f in cls.fields_info] or ["x"])] = rng.choice(EXTREMES)


@st.composite
def envelopes(draw: st.DrawFn) -> tuple[dict[Any, Any], str]:
    rng = random.Random(draw(st.integers(0, 2**64 - 1)))
    cls = MESSAGE_CLASSES[draw(st.integers(0, len(MESSAGE_CLASSES) - 1))]
    env: dict[Any, Any] = {
        "t": cls.type_name,
        "v": rng.randint(1, cls.wire_version),
        "id": rng.randbytes(16),
        "c": rng.choice([None, rng.randbytes(16)]),
        "r": rng.choice([None, "reply.node.7"]),
        "ts": rng.randrange(2**45),
        "b": valid_body(cls, rng),
    }
    kind = draw(st.sampled_from(DAMAGES))
    damage(env, kind, rng)
    return env, kind


def encoded(env: dict[Any, Any], signature: int) -> bytes:
    """Pack ``env``: unsigned, signed with KEY, signed with a wrong key, or with a junk "s"."""
    if signature == 0:
        return pack(env)
    if signature == 3:
        return pack({**env, "s": b"\x00" * 32})
    key = KEY if signature == 1 else b"wrong"
    return pack({**env, "s": hmac.new(key, pack(env), hashlib.sha256).digest()})


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def real_messages() -> list[bytes]:
    """Encoded messages to mutate: valid input, close to what the decoder parses for real."""
    order = FuzzOrder(
        key="k",
        count=1,
        ratio=0.5,
        ok=True,
        raw=b"r",
        tags=["a"],
        totals={"x": 1},
        limit=None,
        either="e",
        mode=3,
        flavor=Flavor.ONE,
        part=FuzzPart(name="p", size=7),
        parts=[FuzzPart(name="q", weight=1.0, share=0.5, wild=float("inf"))],
        maybe_part=None,
        extra={"n": [1, None]},
    )
    typed = FuzzTyped(
        key="k",
        count=-1,
        ratio=2.5,
        ok=False,
        raw=b"\x00",
        tags=["a", "b"],
        totals={"x": 1},
        limit=7,
        either=3,
        either_number=1.5,
        mode="a",
        size=Size.LARGE,
        level=Level.HIGH,
        part=FuzzPart(name="p", share=0.25),
        parts=[],
        parts_by_name={"q": FuzzPart(name="q", size=2**53)},
        maybe_part=FuzzPart(name="m"),
        maybe_parts=None,
        extra=[{"a": b"b"}, 1.5, None],
        extras=[1, "two"],
        details={"d": {"e": []}},
        ttl=60.0,
    )
    found: list[bytes] = []
    for codec in (Codec(), Codec(keys=[KEY])):
        found.append(codec.encode(order))
        found.append(codec.encode(typed, reply_to="r"))
        found.append(codec.encode(FuzzVersioned(name="v"), reply_to="r", correlation=b"c" * 16))
    return found


def mutated(args: tuple[bytes, int]) -> bytes:
    """``data`` with a few bytes changed, maybe cut short."""
    data, seed = args
    rng = random.Random(seed)
    buffer = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        buffer[rng.randrange(len(buffer))] = rng.randrange(256)
    return bytes(buffer[: len(buffer) - rng.choice([0, 0, 0, 1, 5, 40])])


MUTATIONS = st.tuples(st.sampled_from(real_messages()), st.integers(0, 2**64 - 1)).map(mutated)


# -- checks ------------------------------------------------------------------------------


def check_decode(data: bytes) -> int:
    """Decode with both codecs; return how many decoded (each must be a registered message)."""
    decoded, problems = 0, []
    for codec in (PLAIN, SIGNING):
        try:
            env = codec.decode(data)
        except InvalidMessage as exc:
            problems.append(str(exc))
            env = None
            outcome = f"InvalidMessage: {exc}"
        else:
            outcome = repr(env)  # repr: 1, 1.0 and True differ
        assert reference_decode(codec, data) == outcome
        if env is None:
            continue
        msg = env.message
        assert isinstance(msg, Message)
        assert lookup(msg.type_name) is type(msg)
        validate(msg)  # what decodes is within every bound a message built in process meets
        assert type(env.id) is bytes and len(env.id) == 16
        decoded += 1
    assert all(problems)  # every rejection says what is wrong
    return decoded


def reference_decode(codec: Codec, data: bytes) -> str:
    """What the codec's reference path (msgpack, each message's own checks) makes of ``data``."""
    try:
        return repr(codec._decode_checked(data, None, None))
    except InvalidMessage as exc:
        return f"InvalidMessage: {exc}"


@FUZZ
@given(st.binary(max_size=64) | MUTATIONS)
def test_random_bytes(data: bytes) -> None:
    check_decode(data)


@FUZZ
@given(STRUCTURES)
def test_random_msgpack_structures(value: Any) -> None:
    assert check_decode(pack(value)) == 0  # too small to hold a 16-byte id: never an envelope


@FUZZ
@given(envelopes(), st.integers(0, 3))
def test_envelope_shaped_structures(case: tuple[dict[Any, Any], str], signature: int) -> None:
    env, kind = case
    note(f"{kind}: {env!r}")
    decoded = check_decode(encoded(env, signature))
    if kind == "none":  # undamaged: the plain codec takes it, the signing one if signed right
        assert decoded == (2 if signature == 1 else 1)
        msg = PLAIN.decode(encoded(env, signature)).message
        assert msg.type_name == env["t"]
        assert PLAIN.decode(PLAIN.encode(msg)).message == msg


# -- msgpack, the reference of the wire ------------------------------------------------------

INTEROP = settings(
    max_examples=2_000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
MESSAGE_INDEXES = st.integers(0, len(MESSAGE_CLASSES) - 1)
SEEDS = st.integers(0, 2**64 - 1)


def random_message(index: int, seed: int) -> tuple[type[Message], dict[str, Any], Message]:
    """A registered class, a valid body of it (as msgpack carries it), and its message."""
    cls = MESSAGE_CLASSES[index]
    body = valid_body(cls, random.Random(seed))
    return cls, body, cls._from_wire(body, "b")


@INTEROP
@given(MESSAGE_INDEXES, SEEDS, st.booleans())
def test_msgpack_reads_what_corral_encodes(index: int, seed: int, signed: bool) -> None:
    cls, _, msg = random_message(index, seed)
    codec = SIGNING if signed else PLAIN
    data = codec.encode(msg, correlation=b"c" * 16, reply_to="reply.node.7", deadline=5)
    raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    assert list(raw)[:8] == ["t", "v", "id", "c", "r", "ts", "b", "d"]
    assert (raw["t"], raw["v"], raw["c"], raw["r"], raw["d"]) == (
        cls.type_name,
        cls.wire_version,
        b"c" * 16,
        "reply.node.7",
        5,
    )
    assert raw["b"] == msg.to_wire()
    assert pack(raw) == data  # byte for byte what msgpack writes for the same map
    assert codec.decode(data).message == msg


@INTEROP
@given(MESSAGE_INDEXES, SEEDS, st.integers(0, 2))
def test_corral_decodes_what_msgpack_writes(index: int, seed: int, signature: int) -> None:
    """Any key order, signed (with the right key) or not."""
    cls, body, msg = random_message(index, seed)
    rng = random.Random(seed)
    env: dict[str, Any] = {
        "t": cls.type_name,
        "v": cls.wire_version,
        "id": rng.randbytes(16),
        "c": rng.choice([None, rng.randbytes(16)]),
        "r": rng.choice([None, "reply.node.7"]),
        "ts": rng.randrange(2**45),
        "b": dict(rng.sample(list(body.items()), len(body))),
    }
    env = dict(rng.sample(list(env.items()), len(env)))
    data = encoded(env, signature)
    assert PLAIN.decode(data).message == msg
    if signature == 1:
        assert SIGNING.decode(data).message == msg


def test_every_builtin_message_decodes_through_msgspec(monkeypatch: pytest.MonkeyPatch) -> None:
    """corral's own messages never need the reference path (which this test takes away)."""

    def refuse(*args: Any) -> None:
        raise AssertionError("decoded by the reference path")

    monkeypatch.setattr(Codec, "_decode_checked", refuse)
    builtin = [c for c in MESSAGE_CLASSES if c.__module__.startswith("corral.")]
    classes: list[type[Message]] = [*builtin, FuzzTyped]
    for cls in classes:
        for seed in range(10):
            msg = cls._from_wire(valid_body(cls, random.Random(seed)), "b")
            for codec in (Codec(), Codec(keys=[KEY])):
                data = codec.encode(msg, reply_to="r", channel="corral:c")
                assert codec.decode(data, channel="corral:c").message == msg
