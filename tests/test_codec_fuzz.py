"""Fuzzing ``Codec.decode``: whatever arrives, the only exception is InvalidMessage.

Three kinds of input, 10,000 examples each, fed to a plain and to a signing codec:
random bytes (and mutations of real messages), random msgpack structures, and
structures shaped like envelopes, with registered type names and bodies built
from each message's own field types (valid, nearly valid, or junk). Anything that
decodes must be a registered message of the type the envelope names.

Examples are derandomized, so a run is reproducible and CI sees the same inputs.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import math
import random
import types
import typing
from typing import Annotated, Any, Literal

import msgpack
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
    more: list[FuzzPart] = dataclasses.field(default_factory=list)


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
    found: list[bytes] = []
    for codec in (Codec(), Codec(keys=[KEY])):
        found.append(codec.encode(order))
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
            continue
        msg = env.message
        assert isinstance(msg, Message)
        assert lookup(msg.type_name) is type(msg)
        validate(msg)  # what decodes is within every bound a message built in process meets
        assert type(env.id) is bytes and len(env.id) == 16
        decoded += 1
    assert all(problems)  # every rejection says what is wrong
    return decoded


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
