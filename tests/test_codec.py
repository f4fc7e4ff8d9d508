"""The msgpack envelope: round trips, field checks with paths, envelope checks, limits, signing."""

from __future__ import annotations

import concurrent.futures
import enum
import hashlib
import hmac
import math
import time
from typing import Annotated, Any, Literal

import msgpack
import msgspec
import pytest

from corral.errors import CorralError, InvalidMessage, NotFound, error_class
from corral.messages import (
    ChildStatus,
    Codec,
    Envelope,
    ErrorReply,
    Event,
    Health,
    HealthChanged,
    Message,
    Ping,
    Pong,
    Reply,
    Request,
    SystemHealth,
    message,
)
from corral.messages.base import Range
from corral.messages.codec import DEFAULT_MAX_DEPTH, DEFAULT_MAX_SIZE, new_id
from corral.messages.signing import ReplayGuard

KEY = b"k" * 32
OLD_KEY = b"old-key"
OTHER_KEY = b"someone else's key"


class Hue(enum.Enum):
    RED = "red"
    GREEN = "green"


class Rank(enum.Enum):
    LOW = 1
    HIGH = 2


@message("test.codec_item")
class CodecItem(Reply):
    name: str
    qty: int = 0


@message("test.codec_cache_get")
class CodecCacheGet(Request["CodecCacheValue"]):
    manager = "cache"
    key: str
    namespace: str = "default"
    ttl: int = 0


@message("test.codec_cache_value")
class CodecCacheValue(Reply):
    value: bytes | None = None


@message("test.codec_all")
class CodecAll(Event):
    """Every supported field type."""

    s: str
    i: int
    f: float
    flag: bool
    raw: bytes
    nothing: None
    ints: list[int]
    scores: dict[str, float]
    maybe: int | None
    either: int | str
    mode: Literal["fast", "slow", 3]
    hue: Hue
    rank: Rank
    item: CodecItem
    items: list[CodecItem]
    by_name: dict[str, list[CodecItem]]
    extra: Any
    opt_item: CodecItem | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    wide: Annotated[float, Range(finite=False)] = 0.0
    ttl: Annotated[float, Range(gt=0, le=60, unit="s")] | None = None
    few: Annotated[int, Range(ge=1, le=3)] = 1


@message("test.codec_blob")
class CodecBlob(Event):
    data: Any = None


@message("test.codec_renamed", version=2)
class CodecRenamed(Event):
    """Version 1 called ``name`` ``title``; version 2 renamed it and added ``count``."""

    name: str
    count: int = 0

    @classmethod
    def upgrade(cls, fields: dict[str, Any], from_version: int) -> dict[str, Any]:
        if from_version == 1:
            fields = dict(fields)
            fields["name"] = fields.pop("title", "")
        return fields


def full(**overrides: Any) -> CodecAll:
    fields: dict[str, Any] = {
        "s": "héllo ✓",
        "i": -(2**63),
        "f": 2.5,
        "flag": False,
        "raw": bytes(range(256)),
        "nothing": None,
        "ints": [0, 1, 2**63 - 1],
        "scores": {"a": 1.0, "": -0.0},
        "maybe": 5,
        "either": "five",
        "mode": 3,
        "hue": Hue.GREEN,
        "rank": Rank.HIGH,
        "item": CodecItem(name="one", qty=1),
        "items": [CodecItem(name="a"), CodecItem(name="b", qty=2)],
        "by_name": {"x": [CodecItem(name="x")], "y": []},
        "extra": {"list": [1, 2.5, "s", b"b", None, True, {"nested": []}], "n": -1},
    }
    fields.update(overrides)
    return CodecAll(**fields)


def roundtrip(msg: Message, codec: Codec | None = None) -> Message:
    codec = codec or Codec()
    return codec.decode(codec.encode(msg)).message


def envelope(body: dict[Any, Any] | None = None, **keys: Any) -> dict[str, Any]:
    """A valid test.codec_cache_get envelope as a plain dict; ``keys`` override its entries."""
    env: dict[str, Any] = {
        "t": "test.codec_cache_get",
        "v": 1,
        "id": b"\x01" * 16,
        "c": None,
        "r": None,
        "ts": 1_700_000_000_000,
        "b": {"key": "a", "namespace": "ns", "ttl": 30} if body is None else body,
    }
    env.update(keys)
    return env


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def signed(env: dict[str, Any], key: bytes = KEY) -> bytes:
    """Sign ``env`` as any msgpack encoder would: HMAC over the map without "s"."""
    unsigned = {k: v for k, v in env.items() if k != "s"}
    return pack({**unsigned, "s": hmac.new(key, pack(unsigned), hashlib.sha256).digest()})


def rejected(data: bytes, codec: Codec | None = None) -> str:
    """The text of the InvalidMessage that decoding ``data`` raises."""
    with pytest.raises(InvalidMessage) as caught:
        (codec or Codec()).decode(data)
    return str(caught.value)


# -- round trips ------------------------------------------------------------------------------


def test_round_trip_every_field_type() -> None:
    msg = full(opt_item=CodecItem(name="opt"), tags=["t1", "t2"])
    assert roundtrip(msg) == msg


def test_round_trip_defaults_and_nones() -> None:
    msg = full(maybe=None, either=0, mode="slow", extra=None, scores={}, items=[], by_name={})
    back = roundtrip(msg)
    assert back == msg
    assert isinstance(back, CodecAll)
    assert back.opt_item is None
    assert back.tags == []


def test_round_trip_enums_are_members() -> None:
    back = roundtrip(full())
    assert isinstance(back, CodecAll)
    assert back.hue is Hue.GREEN
    assert back.rank is Rank.HIGH


@pytest.mark.parametrize("value", [0.0, -1.5, 1e308, -1e308, 5e-324])
def test_round_trip_floats(value: float) -> None:
    back = roundtrip(full(f=value))
    assert isinstance(back, CodecAll)
    assert back.f == value


@pytest.mark.parametrize("value", [math.inf, -math.inf, 1e308])
def test_round_trip_non_finite_floats_where_a_field_allows_them(value: float) -> None:
    back = roundtrip(full(wide=value))
    assert isinstance(back, CodecAll)
    assert back.wide == value


def test_round_trip_nan() -> None:
    back = roundtrip(full(wide=math.nan))
    assert isinstance(back, CodecAll)
    assert math.isnan(back.wide)


@pytest.mark.parametrize("value", [0, -1, 2**31, -(2**63), 2**63 - 1])
def test_round_trip_ints(value: int) -> None:
    back = roundtrip(full(i=value))
    assert isinstance(back, CodecAll)
    assert back.i == value


@pytest.mark.parametrize("value", [1, "1", 3, "fast"])
def test_round_trip_unions_and_literals(value: Any) -> None:
    field = "mode" if value in ("fast", 3) else "either"
    back = roundtrip(full(**{field: value}))
    assert getattr(back, field) == value
    assert type(getattr(back, field)) is type(value)


def test_round_trip_system_messages() -> None:
    health = Health(status="degraded", details={"lag": 3}, dependencies={"redis": "healthy"})
    child = ChildStatus(
        name="cache",
        state="running",
        status="healthy",
        critical=True,
        restarts=2,
        last_error=None,
        mailbox_depth=0,
        uptime_s=12.5,
        health=health,
    )
    for msg in (
        SystemHealth(status="degraded", managers={"cache": child}),
        HealthChanged(status="unhealthy", previous="healthy", reasons=["cache down"]),
        Ping(payload=b"hi"),
        Pong(),
    ):
        assert roundtrip(msg) == msg


def test_envelope_fields() -> None:
    codec = Codec()
    before = int(time.time() * 1000)
    data = codec.encode(Ping(), id=b"i" * 16, correlation=b"c" * 16, reply_to="reply.node.1")
    env = codec.decode(data)
    assert isinstance(env, Envelope)
    assert env.message == Ping()
    assert env.id == b"i" * 16
    assert env.correlation == b"c" * 16
    assert env.reply_to == "reply.node.1"
    assert env.version == 1
    assert before <= env.ts <= int(time.time() * 1000)
    raw = msgpack.unpackb(data)
    assert set(raw) == {"t", "v", "id", "c", "r", "ts", "b"}
    assert (raw["t"], raw["v"], raw["b"]) == ("system.ping", 1, {"payload": b""})


def test_envelope_defaults_and_unique_ids() -> None:
    codec = Codec()
    envs = [codec.decode(codec.encode(Pong())) for _ in range(1000)]
    assert all(len(e.id) == 16 for e in envs)
    assert len({e.id for e in envs}) == 1000
    assert all(e.correlation is None and e.reply_to is None for e in envs)
    assert len(new_id()) == 16


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = Codec().encode(Ping(payload=b"x"))
    assert Codec().decode(bytearray(data)).message == Ping(payload=b"x")
    assert Codec().decode(memoryview(data)).message == Ping(payload=b"x")


def test_optional_envelope_entries_may_be_absent() -> None:
    env = envelope()
    for key in ("c", "r", "ts"):
        del env[key]
    decoded = Codec().decode(pack(env))
    assert decoded.message == CodecCacheGet(key="a", namespace="ns", ttl=30)
    assert (decoded.correlation, decoded.reply_to, decoded.ts) == (None, None, 0)


def test_fields_with_defaults_may_be_absent() -> None:
    decoded = Codec().decode(pack(envelope({"key": "a"})))
    assert decoded.message == CodecCacheGet(key="a")


def test_error_reply_round_trip_and_error_class() -> None:
    reply = ErrorReply(code="not_found", message="no key 'a'", details={"key": "a", "n": [1, 2]})
    back = roundtrip(reply, Codec(keys=[KEY]))
    assert back == reply
    assert isinstance(back, ErrorReply)
    exc = error_class(back.code)(back.message, back.details)
    assert type(exc) is NotFound
    assert (exc.message, exc.details) == ("no key 'a'", {"key": "a", "n": [1, 2]})
    unknown = roundtrip(ErrorReply(code="test_made_up"))
    assert isinstance(unknown, ErrorReply)
    assert error_class(unknown.code) is CorralError


# -- field types on the wire -----------------------------------------------------------------


def test_int_is_accepted_for_float_and_becomes_float() -> None:
    body = {**full().to_wire(), "f": 3, "scores": {"a": 1}}
    msg = Codec().decode(pack(envelope(body, t="test.codec_all"))).message
    assert isinstance(msg, CodecAll)
    assert msg.f == 3.0 and type(msg.f) is float
    assert type(msg.scores["a"]) is float


def test_int_given_for_float_in_process_decodes_as_float() -> None:
    back = roundtrip(full(f=4))
    assert isinstance(back, CodecAll)
    assert type(back.f) is float and back.f == 4.0


def test_cache_get_ttl_path() -> None:
    data = pack(envelope({"key": "a", "ttl": "30"}))
    assert rejected(data) == "b.ttl: expected int, got str"


@pytest.mark.parametrize(
    ("field", "value", "text"),
    [
        ("s", b"x", "b.s: expected str, got bytes"),
        ("s", None, "b.s: expected str, got NoneType"),
        ("i", "3", "b.i: expected int, got str"),
        ("i", True, "b.i: expected int, got bool"),
        ("i", 1.0, "b.i: expected int, got float"),
        ("f", True, "b.f: expected float, got bool"),
        ("f", "1.0", "b.f: expected float, got str"),
        ("flag", 1, "b.flag: expected bool, got int"),
        ("raw", "x", "b.raw: expected bytes, got str"),
        ("nothing", 0, "b.nothing: expected None, got int"),
        ("nothing", False, "b.nothing: expected None, got bool"),
        ("ints", {"a": 1}, "b.ints: expected list, got dict"),
        ("ints", [1, 2, "3"], "b.ints[2]: expected int, got str"),
        ("ints", [1, False], "b.ints[1]: expected int, got bool"),
        ("scores", [1.0], "b.scores: expected map, got list"),
        ("scores", {"a": 1.0, "b": "x"}, "b.scores.b: expected float, got str"),
        ("scores", {b"a": 1.0}, "b.scores: map keys must be str, got bytes"),
        ("maybe", "x", "b.maybe: expected int | None, got str"),
        ("maybe", True, "b.maybe: expected int | None, got bool"),
        ("either", 1.5, "b.either: expected int | str, got float"),
        ("either", None, "b.either: expected int | str, got NoneType"),
        ("mode", "medium", "b.mode: expected one of 'fast', 'slow', 3, got 'medium'"),
        ("mode", 3.0, "b.mode: expected one of 'fast', 'slow', 3, got 3.0"),
        ("mode", [], "b.mode: expected one of 'fast', 'slow', 3, got []"),
        ("hue", "blue", "b.hue: expected one of 'red', 'green', got 'blue'"),
        ("hue", ["red"], "b.hue: expected one of 'red', 'green', got ['red']"),
        ("rank", True, "b.rank: expected one of 1, 2, got True"),
        ("rank", 1.0, "b.rank: expected one of 1, 2, got 1.0"),
        ("rank", "LOW", "b.rank: expected one of 1, 2, got 'LOW'"),
        ("item", "x", "b.item: expected test.codec_item map, got str"),
        ("item", {"name": 1}, "b.item.name: expected str, got int"),
        ("item", {}, "b.item.name: missing required field"),
        (
            "items",
            [{"name": "a"}, {"name": "b"}, {"name": 5}],
            "b.items[2].name: expected str, got int",
        ),
        ("items", [{"name": "a"}, "b"], "b.items[1]: expected test.codec_item map, got str"),
        (
            "by_name",
            {"k": [{"name": "a", "qty": "1"}]},
            "b.by_name.k[0].qty: expected int, got str",
        ),
        ("opt_item", {"name": 2}, "b.opt_item.name: expected str, got int"),
        ("opt_item", "x", "b.opt_item: expected test.codec_item | None, got str"),
        ("extra", msgpack.ExtType(5, b"x"), "b.extra: expected a msgpack value, got ExtType"),
        (
            "extra",
            {"a": [1, msgpack.Timestamp(0, 0)]},
            "b.extra.a[1]: expected a msgpack value, got Timestamp",
        ),
        ("extra", {"a": {b"k": 1}}, "b.extra.a: map keys must be str, got bytes"),
        ("tags", ["a", 1], "b.tags[1]: expected str, got int"),
        ("f", math.inf, "b.f: must be a finite number, got inf"),
        ("f", -math.inf, "b.f: must be a finite number, got -inf"),
        ("f", math.nan, "b.f: must be a finite number, got nan"),
        ("scores", {"a": math.nan}, "b.scores.a: must be a finite number, got nan"),
        (
            "i",
            2**63,
            "b.i: must be >= -9223372036854775808 and <= 9223372036854775807, "
            "got 9223372036854775808",
        ),
        (
            "i",
            2**64 - 1,
            "b.i: must be >= -9223372036854775808 and <= 9223372036854775807, "
            "got 18446744073709551615",
        ),
        (
            "ints",
            [1, 2**64 - 1],
            "b.ints[1]: must be >= -9223372036854775808 and "
            "<= 9223372036854775807, got 18446744073709551615",
        ),
        (
            "maybe",
            2**63,
            "b.maybe: must be >= -9223372036854775808 and <= 9223372036854775807, "
            "got 9223372036854775808",
        ),
        ("ttl", 0.0, "b.ttl: must be > 0 and <= 60 s, got 0.0"),
        ("ttl", 0, "b.ttl: must be > 0 and <= 60 s, got 0.0"),
        ("ttl", 61, "b.ttl: must be > 0 and <= 60 s, got 61.0"),
        ("ttl", math.inf, "b.ttl: must be > 0 and <= 60 s, got inf"),
        ("ttl", math.nan, "b.ttl: must be > 0 and <= 60 s, got nan"),
        ("ttl", "1", "b.ttl: expected float (> 0, <= 60 s) | None, got str"),
        ("few", 0, "b.few: must be >= 1 and <= 3, got 0"),
        ("few", 4, "b.few: must be >= 1 and <= 3, got 4"),
        ("few", 2.0, "b.few: expected int, got float"),
    ],
)
def test_wrong_type_names_the_path(field: str, value: Any, text: str) -> None:
    body = {**full().to_wire(), field: value}
    data = pack(envelope(body, t="test.codec_all"))
    assert rejected(data) == text
    with pytest.raises(InvalidMessage) as caught:
        Codec().decode(data)
    assert caught.value.path == text.split(": ", 1)[0]


def test_unknown_nested_field_lists_fields() -> None:
    body = {**full().to_wire(), "item": {"name": "a", "bogus": 1}}
    text = rejected(pack(envelope(body, t="test.codec_all")))
    assert text == "b.item.bogus: unknown field of test.codec_item (fields: name, qty)"


# -- the envelope ------------------------------------------------------------------------------


def test_valid_hand_built_envelope() -> None:
    decoded = Codec().decode(pack(envelope()))
    assert decoded == Envelope(
        CodecCacheGet(key="a", namespace="ns", ttl=30), b"\x01" * 16, None, None, 1_700_000_000_000
    )


def test_decoded_envelope_compares_by_its_fields() -> None:
    codec = Codec()
    decoded = codec.decode(codec.encode(CodecCacheGet(key="a"), id=b"\x02" * 16, reply_to="r"))
    built = Envelope(decoded.message, b"\x02" * 16, None, "r", decoded.ts)
    assert decoded == built and built == decoded
    assert (decoded != built) is False and hash(decoded) == hash(built)
    assert decoded != Envelope(decoded.message, b"\x03" * 16, None, "r", decoded.ts)
    assert repr(decoded) == repr(built)


def test_unknown_type() -> None:
    text = rejected(pack(envelope(t="test.codec_nope")))
    assert text == "t: unknown message type 'test.codec_nope'"


@pytest.mark.parametrize(("value", "got"), [(None, "NoneType"), (1, "int"), (b"t", "bytes")])
def test_type_name_must_be_str(value: Any, got: str) -> None:
    assert rejected(pack(envelope(t=value))) == f"t: expected str, got {got}"


def test_type_name_missing() -> None:
    env = envelope()
    del env["t"]
    assert rejected(pack(env)) == "t: expected str, got NoneType"


def test_missing_required_field() -> None:
    assert rejected(pack(envelope({"namespace": "x"}))) == "b.key: missing required field"


def test_unknown_field_lists_the_fields() -> None:
    with pytest.raises(InvalidMessage) as caught:
        Codec().decode(pack(envelope({"key": "a", "bogus": 1, "zzz": 2})))
    assert caught.value.path == "b.bogus"
    assert str(caught.value) == (
        "b.bogus: unknown field of test.codec_cache_get (fields: key, namespace, ttl)"
    )


def test_unknown_field_with_bytes_name() -> None:
    text = rejected(pack(envelope({"key": "a", b"key": "b"})))
    assert text.startswith("b.b'key': unknown field of test.codec_cache_get")


def test_unknown_envelope_key() -> None:
    text = rejected(pack({**envelope(), "x": 1, "extra": 2}))
    assert text == "extra: unknown envelope key"


def test_newer_version_rejected_clearly() -> None:
    text = rejected(pack(envelope(v=2)))
    assert text == "v: test.codec_cache_get version 2 is newer than this reader's 1"


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, True, None])
def test_bad_version(version: Any) -> None:
    assert rejected(pack(envelope(v=version))).startswith("v: expected a version >= 1, got ")


def test_older_version_accepted_and_upgraded() -> None:
    env = envelope({"title": "old name"}, t="test.codec_renamed", v=1)
    decoded = Codec().decode(msgpack.packb(env, use_bin_type=True))
    assert decoded.message == CodecRenamed(name="old name", count=0)
    assert decoded.version == 1


def test_current_version_is_not_upgraded() -> None:
    env = envelope({"name": "new", "count": 2}, t="test.codec_renamed", v=2)
    decoded = Codec().decode(pack(env))
    assert decoded.message == CodecRenamed(name="new", count=2)
    assert decoded.version == 2
    # a version-1 field name in a version-2 body is an unknown field, not upgraded
    bad = envelope({"title": "x"}, t="test.codec_renamed", v=2)
    assert rejected(pack(bad)).startswith("b.title: unknown field of test.codec_renamed")


def test_upgraded_fields_are_still_checked() -> None:
    env = envelope({"title": 5}, t="test.codec_renamed", v=1)
    assert rejected(pack(env)) == "b.name: expected str, got int"


def test_round_trip_of_a_later_version() -> None:
    msg = CodecRenamed(name="n", count=1)
    decoded = Codec().decode(Codec().encode(msg))
    assert decoded.message == msg
    assert decoded.version == 2


@pytest.mark.parametrize("msg_id", [b"", b"x" * 15, b"x" * 17, "x" * 16, None, 16])
def test_id_must_be_16_bytes(msg_id: Any) -> None:
    assert rejected(pack(envelope(id=msg_id))) == "id: expected 16 bytes"


def test_id_missing() -> None:
    env = envelope()
    del env["id"]
    assert rejected(pack(env)) == "id: expected 16 bytes"


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("c", "corr", "c: expected bytes or nil, got str"),
        ("c", 5, "c: expected bytes or nil, got int"),
        ("r", b"reply", "r: expected str or nil, got bytes"),
        ("ts", 1.5, "ts: expected int, got float"),
        ("ts", None, "ts: expected int, got NoneType"),
        ("b", [], "b: expected map, got list"),
        ("b", None, "b: expected map, got NoneType"),
        ("id", msgpack.ExtType(1, b"x" * 16), "id: expected 16 bytes"),
        ("ts", msgpack.Timestamp(1, 0), "ts: expected int, got Timestamp"),
    ],
)
def test_envelope_entry_types(key: str, value: Any, text: str) -> None:
    assert rejected(pack(envelope(**{key: value}))) == text


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x93\x01",  # truncated array
        b"\x87\xa1t",  # truncated map
        b"\xd9",  # truncated str8 header
        b"\xdd\xff\xff\xff\xff",  # array claiming 4 G items
        b"\x81\x01\x02",  # int map key
        b"\x81\xc0\x02",  # nil map key
        b"\x81\x91\x01\x02",  # array map key
        b"\x80\x00",  # extra data after the map
        b"\xa2\xff\xfe",  # invalid utf-8 in a str
        b"\x81\xa2\xff\xfe\x01",  # invalid utf-8 in a key
        b"\x91" * 5000 + b"\xc0",  # deeper than msgpack's own stack
    ],
)
def test_garbage_is_not_msgpack(data: bytes) -> None:
    assert rejected(data).startswith("not a msgpack message")


@pytest.mark.parametrize(
    ("value", "got"),
    [([1, 2], "list"), (5, "int"), ("str", "str"), (None, "NoneType"), (b"b", "bytes")],
)
def test_top_level_must_be_a_map(value: Any, got: str) -> None:
    assert rejected(pack(value)) == f"expected an envelope map, got {got}"


def test_ext_type_at_top_level_is_not_a_map() -> None:
    assert rejected(pack(msgpack.ExtType(3, b"x"))) == "expected an envelope map, got ExtType"
    assert rejected(pack(msgpack.Timestamp(3, 0))) == "expected an envelope map, got Timestamp"


@pytest.mark.parametrize("data", ["text", None, 5, [b"x"]])
def test_decode_needs_bytes(data: Any) -> None:
    with pytest.raises(InvalidMessage, match=r"^expected bytes, got "):
        Codec().decode(data)


# -- limits ------------------------------------------------------------------------------------


def test_default_limits() -> None:
    codec = Codec()
    assert (codec.max_size, codec.max_depth) == (DEFAULT_MAX_SIZE, DEFAULT_MAX_DEPTH)
    assert DEFAULT_MAX_SIZE == 1 << 20


def test_size_limit_on_decode() -> None:
    data = Codec().encode(Ping(payload=b"x" * 200))
    assert Codec(max_size=len(data)).decode(data).message == Ping(payload=b"x" * 200)
    text = rejected(data, Codec(max_size=len(data) - 1))
    assert text == f"message is {len(data)} bytes, over the {len(data) - 1}-byte limit"


def test_size_limit_is_checked_before_parsing() -> None:
    garbage = b"\xc1" * (DEFAULT_MAX_SIZE + 1)
    assert rejected(garbage) == (
        f"message is {DEFAULT_MAX_SIZE + 1} bytes, over the {DEFAULT_MAX_SIZE}-byte limit"
    )


def test_size_limit_on_encode() -> None:
    with pytest.raises(InvalidMessage, match=r"over the 1048576-byte limit$"):
        Codec().encode(Ping(payload=b"x" * DEFAULT_MAX_SIZE))
    small = Codec(max_size=128)
    with pytest.raises(InvalidMessage, match=r"over the 128-byte limit$"):
        small.encode(Ping(payload=b"x" * 128))
    assert len(small.encode(Ping())) <= 128


def test_size_limit_on_encode_counts_the_signature() -> None:
    size = len(Codec().encode(Ping()))
    with pytest.raises(InvalidMessage, match="byte limit"):
        Codec(keys=[KEY], max_size=size).encode(Ping())


def nested_lists(levels: int) -> Any:
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_depth_limit_for_any_values() -> None:
    # The envelope is level 1, the body level 2, a field's value level 3.
    codec = Codec(max_depth=5)
    ok = CodecBlob(data=nested_lists(3))  # levels 3, 4, 5
    assert codec.decode(codec.encode(ok)).message == ok
    too_deep = codec.encode(CodecBlob(data=nested_lists(4)))
    assert rejected(too_deep, codec) == "b: nesting deeper than 5 levels"
    maps = codec.encode(CodecBlob(data={"a": {"b": {"c": 1}}}))  # the 1 is at level 6
    assert rejected(maps, codec) == "b: nesting deeper than 5 levels"


def test_default_depth_limit() -> None:
    codec = Codec()
    ok = CodecBlob(data=nested_lists(DEFAULT_MAX_DEPTH - 2))
    assert codec.decode(codec.encode(ok)).message == ok
    too_deep = codec.encode(CodecBlob(data=nested_lists(DEFAULT_MAX_DEPTH - 1)))
    assert rejected(too_deep) == f"b: nesting deeper than {DEFAULT_MAX_DEPTH} levels"


def test_depth_limit_inside_typed_containers_of_any() -> None:
    codec = Codec(max_depth=5)
    deep = ErrorReply(code="x", details={"a": {"b": {"c": 1}}})
    assert rejected(codec.encode(deep), codec) == "b: nesting deeper than 5 levels"
    assert roundtrip(ErrorReply(code="x", details={"a": {"b": 1}}), codec) == ErrorReply(
        code="x", details={"a": {"b": 1}}
    )


def test_deep_values_in_typed_fields_fail_on_type() -> None:
    body = {"key": "a", "ttl": nested_lists(900)}
    assert rejected(pack(envelope(body))) == "b.ttl: expected int, got list"


def test_very_deep_signed_message_is_rejected_cleanly() -> None:
    data = b"\x82\xa1s\xc4\x01x\xa1t" + b"\x91" * 1020 + b"\xc0"
    text = rejected(data, Codec(keys=[KEY]))
    assert text.startswith(("s: ", "not a msgpack message"))


# -- threads ------------------------------------------------------------------------------------


def test_encode_and_decode_from_many_threads() -> None:
    codecs = [Codec(), Codec(keys=[KEY])]

    def work(n: int) -> list[bool]:
        results = []
        for i in range(300):
            codec = codecs[i % 2]
            msg = CodecBlob(
                data={"thread": n, "i": i, "pad": "x" * (i % 50), "list": [n] * (i % 7)}
            )
            results.append(codec.decode(codec.encode(msg)).message == msg)
        return results

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = [ok for batch in pool.map(work, range(8)) for ok in batch]
    assert len(outcomes) == 2400
    assert all(outcomes)


# -- encode ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        CodecBlob(data=object()),
        CodecBlob(data=[2**64]),
        CodecBlob(data={"n": -(2**63) - 1}),
        CodecBlob(data=nested_lists(100_000)),
    ],
)
def test_encode_of_unencodable_values_is_invalid_message(msg: Message) -> None:
    """``validate()`` is optional before sending; encode still fails only with InvalidMessage."""
    with pytest.raises(InvalidMessage, match=r"^cannot encode test\.codec_blob: "):
        Codec().encode(msg)
    with pytest.raises(InvalidMessage, match=r"^cannot encode test\.codec_blob: "):
        Codec(keys=[KEY]).encode(msg)


# -- signing -----------------------------------------------------------------------------------


def test_signed_round_trip() -> None:
    codec = Codec(keys=[KEY])
    assert codec.signing
    assert not Codec().signing
    msg = full(opt_item=CodecItem(name="o"))
    data = codec.encode(msg, correlation=b"c" * 16, reply_to="r")
    raw = msgpack.unpackb(data)
    assert type(raw["s"]) is bytes and len(raw["s"]) == 32
    unsigned = {k: v for k, v in raw.items() if k != "s"}
    assert raw["s"] == hmac.new(KEY, pack(unsigned), hashlib.sha256).digest()
    assert data == pack({**unsigned, "s": raw["s"]})  # "s" last, as a map packer writes it
    decoded = codec.decode(data)
    assert decoded.message == msg
    assert (decoded.correlation, decoded.reply_to) == (b"c" * 16, "r")


def test_signed_message_from_another_encoder_verifies() -> None:
    """The signature covers the map without "s", whatever the key order."""
    env = envelope()
    reordered = dict(reversed(list(env.items())))
    codec = Codec(keys=[KEY])
    assert codec.decode(signed(reordered)).message == CodecCacheGet(key="a", namespace="ns", ttl=30)
    unsigned = pack(env)
    signature = hmac.new(KEY, unsigned, hashlib.sha256).digest()
    s_first = pack({"s": signature, **env})
    assert codec.decode(s_first).message == CodecCacheGet(key="a", namespace="ns", ttl=30)


def test_unsigned_message_rejected_when_keys_set() -> None:
    data = Codec().encode(Ping())
    text = rejected(data, Codec(keys=[KEY]))
    assert text == "s: signature missing (this receiver requires signed messages)"


def test_signed_message_accepted_by_a_receiver_without_keys() -> None:
    data = Codec(keys=[KEY]).encode(Ping(payload=b"p"))
    assert Codec().decode(data).message == Ping(payload=b"p")


def test_tampered_body_rejected() -> None:
    codec = Codec(keys=[KEY])
    raw = msgpack.unpackb(codec.encode(CodecCacheGet(key="a", ttl=1)))
    raw["b"]["ttl"] = 2
    assert rejected(pack(raw), codec) == "s: signature does not match"


def test_tampered_envelope_rejected() -> None:
    codec = Codec(keys=[KEY])
    raw = msgpack.unpackb(codec.encode(CodecCacheGet(key="a"), reply_to="reply.a"))
    raw["r"] = "reply.b"
    assert rejected(pack(raw), codec) == "s: signature does not match"


def test_tampered_bytes_rejected() -> None:
    codec = Codec(keys=[KEY])
    data = codec.encode(CodecCacheGet(key="abcdef"))
    flipped = data.replace(b"abcdef", b"abcdeg")
    assert flipped != data
    assert rejected(flipped, codec) == "s: signature does not match"


def test_tampered_signature_rejected() -> None:
    codec = Codec(keys=[KEY])
    data = codec.encode(Ping())
    bad = data[:-1] + bytes([data[-1] ^ 1])
    assert rejected(bad, codec) == "s: signature does not match"
    raw = msgpack.unpackb(data)
    for signature in (b"", raw["s"][:16], raw["s"] + b"x"):
        assert rejected(pack({**raw, "s": signature}), codec) == "s: signature does not match"
    assert rejected(pack({**raw, "s": "text"}), codec) == "s: expected bytes"
    assert rejected(pack({**raw, "s": None}), codec).startswith("s: signature missing")


def test_wrong_key_rejected() -> None:
    data = Codec(keys=[OTHER_KEY]).encode(Ping())
    assert rejected(data, Codec(keys=[KEY])) == "s: signature does not match"


def test_key_rotation() -> None:
    old_sender = Codec(keys=[OLD_KEY])
    rotated = Codec(keys=[KEY, OLD_KEY])
    new_only = Codec(keys=[KEY])
    # the rotated receiver verifies what the old sender signed ...
    assert rotated.decode(old_sender.encode(Ping(payload=b"1"))).message == Ping(payload=b"1")
    # ... and signs with the new key, which receivers that dropped the old key verify
    data = rotated.encode(Ping(payload=b"2"))
    assert new_only.decode(data).message == Ping(payload=b"2")
    assert rejected(data, old_sender) == "s: signature does not match"
    assert rejected(old_sender.encode(Ping()), new_only) == "s: signature does not match"


def test_keys_can_be_replaced() -> None:
    codec = Codec(keys=[OLD_KEY])
    codec.keys = [KEY]
    assert codec.keys == (KEY,)
    assert Codec(keys=[KEY]).decode(codec.encode(Ping())).message == Ping()
    assert rejected(Codec(keys=[OLD_KEY]).encode(Ping()), codec) == "s: signature does not match"
    codec.keys = []
    assert not codec.signing
    assert codec.decode(Codec().encode(Ping())).message == Ping()


def test_signature_checked_before_the_body() -> None:
    """A bad signature wins over a bad body: nothing of an unverified body is trusted."""
    codec = Codec(keys=[KEY])
    env = envelope({"key": 5}, s=b"x" * 32)
    assert rejected(pack(env), codec) == "s: signature does not match"
    assert rejected(signed(envelope({"key": 5})), codec) == "b.key: expected str, got int"


def test_event_and_request_kinds_round_trip_signed() -> None:
    codec = Codec(keys=[KEY])
    for msg in (CodecCacheGet(key="k"), CodecCacheValue(value=b"v"), CodecBlob(data=[1])):
        assert roundtrip(msg, codec) == msg
    assert CodecCacheGet.reply_type() is CodecCacheValue
    assert issubclass(CodecBlob, Event) and issubclass(CodecCacheValue, Reply)


# -- the replay guard ------------------------------------------------------------------------

NOW = 1_700_000_000_000


def guard_refusal(guard: ReplayGuard, message_id: bytes, ts: int, **kwargs: Any) -> str:
    with pytest.raises(InvalidMessage) as caught:
        guard.check(message_id, ts, now_ms=NOW, **kwargs)
    return str(caught.value)


def test_replay_guard_refuses_duplicates_and_timestamps_outside_its_window() -> None:
    guard = ReplayGuard(window=10.0)
    guard.check(b"a" * 16, NOW, now_ms=NOW)
    assert guard_refusal(guard, b"a" * 16, NOW).startswith("id: a message with this id was")
    guard.check(b"b" * 16, NOW - 10_000, now_ms=NOW)
    guard.check(b"c" * 16, NOW + 10_000, now_ms=NOW)
    assert guard_refusal(guard, b"d" * 16, NOW - 10_001) == (
        f"ts: timestamp {NOW - 10_001} is more than 10 s old (replay window)"
    )
    assert guard_refusal(guard, b"d" * 16, NOW + 10_001).startswith("ts: timestamp ")
    # a signed deadline keeps an old message acceptable until it passes, but never a future one
    guard.check(b"e" * 16, NOW - 60_000, valid_until=NOW, now_ms=NOW)
    assert guard_refusal(guard, b"f" * 16, NOW - 60_000, valid_until=NOW - 1).endswith(
        "old (replay window)"
    )
    assert guard_refusal(guard, b"f" * 16, NOW + 60_000, valid_until=NOW + 90_000).endswith(
        "ahead of this receiver's clock (replay window)"
    )
    assert len(guard) == 4


def test_replay_guard_forgets_old_ids_and_shortens_its_window_past_capacity() -> None:
    guard = ReplayGuard(window=16.0, capacity=4)  # ids kept in sets of 1 s each
    for i in range(4):
        guard.check(bytes([i]) * 16, NOW - 15_000 + i * 1000, now_ms=NOW)
    guard.check(b"x" * 16, NOW, now_ms=NOW)  # the fifth: the oldest set is forgotten
    assert len(guard) == 4
    assert guard_refusal(guard, b"y" * 16, NOW - 15_000).startswith(
        "ts: timestamp 1699999985000 is older than the 4 ids this receiver remembers"
    )
    guard.check(b"y" * 16, NOW - 14_000, now_ms=NOW)  # the oldest set still kept
    later = NOW + 20_000
    guard.check(b"z" * 16, later, now_ms=later)  # every set before it has left the window
    assert len(guard) == 1
    guard.check(bytes([3]) * 16, later - 1, now_ms=later)  # forgotten: taken again
