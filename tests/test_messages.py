"""The ``@message`` registry, message kinds, field metadata, and in-process ``validate()``."""

from __future__ import annotations

import dataclasses
import enum
import linecache
import math
import pickle
import re
import traceback
import types
from typing import Annotated, Any, Literal

import msgspec
import pytest

from corral import errors
from corral.errors import CorralError, InvalidMessage, error_class
from corral.messages import (
    Codec,
    ErrorReply,
    Event,
    HealthCheck,
    Message,
    Ping,
    Pong,
    Reply,
    Request,
    lookup,
    message,
    registered,
    validate,
)
from corral.messages.base import (
    INT64_MAX,
    MAX_NESTING,
    MAX_TTL,
    TIMEOUT,
    Count,
    FieldInfo,
    Range,
    TimeLimit,
    Ttl,
)


class Shade(enum.Enum):
    LIGHT = "light"
    DARK = "dark"


@message("test.msg_item")
class MsgItem(Reply):
    name: str
    qty: int = 0


@message("test.msg_sample", version=3)
class MsgSample(Request["MsgSampleReply"]):
    """Every supported field type; its reply is named by a forward reference (a string)."""

    manager = "sampler"
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
    mode: Literal["fast", "slow"]
    shade: Shade
    item: MsgItem
    items: list[MsgItem]
    extra: Any
    opt_item: MsgItem | None = None
    tags: list[str] = msgspec.field(default_factory=list)


@message("test.msg_sample_reply")
class MsgSampleReply(Reply):
    ok: bool = True


@message("test.msg_direct")
class MsgDirect(Request[MsgItem]):
    """Its reply type is given as a class, not a string."""

    manager = "sampler"


@message("test.msg_untyped_request")
class MsgUntypedRequest(Request):  # type: ignore[type-arg]
    """A Request that names no reply type."""


@message("test.msg_event")
class MsgEvent(Event):
    topic: str = ""


@message("test.msg_blob")
class MsgBlob(Event):
    data: Any = None


@message("test.msg_holder")
class MsgHolder(Event):
    """Holds no Any itself, but a nested message that does."""

    inner: MsgEvent
    blob: MsgBlob


@message("test.msg_base")
class MsgBase(Event):
    a: int = 0


@message("test.msg_derived")
class MsgDerived(MsgBase):
    """A message that extends another: it keeps the base's fields."""

    b: str = ""


@message("test.msg_bounded")
class MsgBounded(Request[MsgItem]):
    """Number fields with declared bounds, next to plain ones."""

    manager = "sampler"
    ttl: Ttl | None = None
    wait: TimeLimit = 1.0
    count: Count = 0
    copies: Annotated[int, Range(ge=1, le=8)] = 1
    ratio: Annotated[float, Range(gt=0, le=1)] = 0.5
    anything: Annotated[float, Range(finite=False)] = 0.0
    scores: list[Annotated[float, Range(ge=0)]] = msgspec.field(default_factory=list)
    plain: float = 0.0
    whole: int = 0


class MsgTeapot(errors.RequestError):
    """An error class defined outside corral.errors: error_class still finds it."""

    code = "test_teapot"


def sample(**overrides: Any) -> MsgSample:
    fields: dict[str, Any] = {
        "s": "text",
        "i": 7,
        "f": 1.5,
        "flag": True,
        "raw": b"\x00\xff",
        "nothing": None,
        "ints": [1, 2, 3],
        "scores": {"a": 0.5},
        "maybe": None,
        "either": "x",
        "mode": "fast",
        "shade": Shade.DARK,
        "item": MsgItem(name="one", qty=1),
        "items": [MsgItem(name="a"), MsgItem(name="b")],
        "extra": {"k": [1, "two", None, {"deep": b"bytes"}]},
    }
    fields.update(overrides)
    return MsgSample(**fields)


def unchecked(cls: type[Message], **fields: Any) -> Message:
    """Build a message with fields of the wrong types (which only validate() catches)."""
    return cls(**fields)


# -- @message: what it makes ----------------------------------------------------------


def test_message_is_a_frozen_struct() -> None:
    msg = sample()
    assert isinstance(msg, msgspec.Struct)
    with pytest.raises(AttributeError, match="immutable"):
        msg.i = 8  # type: ignore[misc]
    assert msg.i == 7
    assert hash(MsgItem(name="a")) == hash(MsgItem(name="a"))


def test_message_is_slotted() -> None:
    msg = MsgItem(name="a")
    assert "__slots__" in vars(MsgItem)
    assert set(vars(MsgItem)["__slots__"]) == {"name", "qty"}
    assert not hasattr(msg, "__dict__")


def test_message_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        MsgItem("a")  # type: ignore[call-arg]
    assert MsgItem(name="a", qty=2) == MsgItem(qty=2, name="a")


def test_message_equality_and_hash_follow_fields() -> None:
    assert MsgItem(name="a") == MsgItem(name="a", qty=0)
    assert MsgItem(name="a") != MsgItem(name="a", qty=1)
    assert hash(MsgItem(name="a")) == hash(MsgItem(name="a"))


def test_class_attributes() -> None:
    assert MsgSample.type_name == "test.msg_sample"
    assert MsgSample.wire_version == 3
    assert MsgItem.wire_version == 1
    assert MsgSample.kind == "request"
    assert MsgItem.kind == "reply"
    assert MsgEvent.kind == "event"
    assert MsgSample.manager == "sampler"
    assert sample().route() == "sampler"
    assert MsgEvent().route() is None


def test_health_check_routes_to_its_target() -> None:
    assert HealthCheck(target="cache").route() == "cache"


# -- registry ---------------------------------------------------------------------------


def test_registry_lookup() -> None:
    assert lookup("test.msg_sample") is MsgSample
    assert lookup("test.msg_item") is MsgItem
    assert lookup("corral.error") is ErrorReply
    assert lookup("system.ping") is Ping
    assert lookup("test.msg_missing") is None


def test_registered_lists_every_message_and_is_a_copy() -> None:
    everything = registered()
    assert everything["test.msg_sample"] is MsgSample
    assert everything["system.pong"] is Pong
    assert all(cls.type_name == name for name, cls in everything.items())
    del everything["test.msg_sample"]
    assert lookup("test.msg_sample") is MsgSample
    assert "test.msg_sample" in registered()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "cache",
        "Cache.get",
        "cache.Get",
        "cache..get",
        ".cache.get",
        "cache.get.",
        "1cache.get",
        "cache.1get",
        "cache.get-all",
        "cache get",
        "cache.get\n",
        "cache/get",
    ],
)
def test_wire_name_must_be_snake_case_area_dot_name(name: str) -> None:
    with pytest.raises(ValueError, match="snake case"):
        message(name)


@pytest.mark.parametrize("name", ["cache.get", "state.update", "a.b_c.d2", "x1.y_"])
def test_wire_name_accepted(name: str) -> None:
    assert callable(message(name))  # builds the decorator only; nothing is registered


@pytest.mark.parametrize("version", [0, -1])
def test_version_starts_at_one(version: int) -> None:
    with pytest.raises(ValueError, match="versions start at 1"):
        message("test.msg_bad_version", version=version)


def test_duplicate_name_with_another_class_rejected() -> None:
    where = re.escape(f"{MsgItem.__module__}.MsgItem")
    with pytest.raises(ValueError, match=f"already registered by {where}$"):

        @message("test.msg_item")
        class Impostor(Reply):
            name: str

    assert lookup("test.msg_item") is MsgItem


def test_duplicate_name_with_same_class_name_from_another_module_rejected() -> None:
    def body(ns: dict[str, Any]) -> None:
        ns["__module__"] = "somewhere_else"
        ns["__qualname__"] = "MsgItem"
        ns["__annotations__"] = {"name": "str"}

    impostor = types.new_class("MsgItem", (Reply,), {}, body)
    with pytest.raises(ValueError, match="already registered"):
        message("test.msg_item")(impostor)
    assert lookup("test.msg_item") is MsgItem


def test_redefining_the_same_class_replaces_it() -> None:
    """Re-running a class statement (a module reload) re-registers the new class object."""
    classes: list[type[Message]] = []
    for _ in range(2):

        @message("test.msg_reloadable")
        class Reloadable(Event):
            n: int = 0

        classes.append(Reloadable)
    assert classes[0] is not classes[1]
    assert lookup("test.msg_reloadable") is classes[1]


@pytest.mark.parametrize(
    ("annotation", "problem"),
    [
        ("set[int]", "unsupported message field type"),
        ("dict[int, str]", "str keys"),
        ("tuple[int, int]", "unsupported message field type"),
        ("object", "unsupported message field type"),
    ],
)
def test_unsupported_field_types_rejected(annotation: str, problem: str) -> None:
    def body(ns: dict[str, Any]) -> None:
        ns["__annotations__"] = {"value": annotation}
        ns["__module__"] = __name__

    cls = types.new_class("MsgUnsupported", (Event,), {}, body)
    with pytest.raises(TypeError, match=problem):
        message("test.msg_unsupported")(cls)
    assert lookup("test.msg_unsupported") is None


def test_dataclass_field_default_rejected() -> None:
    class WithDataclassField(Event):
        tags: list[str] = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match=r"takes msgspec\.field"):
        message("test.msg_dataclass_field")(WithDataclassField)
    assert lookup("test.msg_dataclass_field") is None


def test_nested_message_must_be_registered() -> None:
    class Unregistered(Event):
        pass

    def body(ns: dict[str, Any]) -> None:
        ns["__annotations__"] = {"inner": Unregistered}
        ns["__module__"] = __name__

    cls = types.new_class("MsgNestsUnregistered", (Event,), {}, body)
    with pytest.raises(TypeError, match="must be registered first"):
        message("test.msg_nests_unregistered")(cls)
    assert lookup("test.msg_nests_unregistered") is None


def test_message_extending_another_message() -> None:
    msg = MsgDerived(a=1, b="x")
    assert [f.name for f in MsgDerived.fields_info] == ["a", "b"]
    assert isinstance(msg, MsgBase)
    assert MsgDerived.type_name == "test.msg_derived"
    assert MsgBase.type_name == "test.msg_base"
    codec = Codec()
    assert codec.decode(codec.encode(msg)).message == msg
    validate(msg)
    with pytest.raises(InvalidMessage, match=r"^a: expected int, got str$"):
        validate(unchecked(MsgDerived, a="1"))


# -- Request reply types ------------------------------------------------------------------


def test_reply_type_from_forward_reference_string() -> None:
    assert MsgSample.reply_type() is MsgSampleReply


def test_reply_type_from_class() -> None:
    assert MsgDirect.reply_type() is MsgItem


def test_reply_type_absent() -> None:
    assert MsgUntypedRequest.reply_type() is None


def test_reply_type_of_system_messages() -> None:
    assert Ping.reply_type() is Pong
    assert HealthCheck.reply_type() is lookup("health.health")


# -- field metadata -----------------------------------------------------------------------


def test_fields_info_in_declaration_order() -> None:
    infos = MsgSample.fields_info
    assert all(isinstance(f, FieldInfo) for f in infos)
    assert [f.name for f in infos] == [
        "s",
        "i",
        "f",
        "flag",
        "raw",
        "nothing",
        "ints",
        "scores",
        "maybe",
        "either",
        "mode",
        "shade",
        "item",
        "items",
        "extra",
        "opt_item",
        "tags",
    ]
    required = {f.name for f in infos if f.required}
    assert required == {f.name for f in infos} - {"opt_item", "tags"}


def test_fields_describe_their_types() -> None:
    described = {f.name: f.describe() for f in MsgSample.fields_info}
    assert described == {
        "s": "str",
        "i": "int",
        "f": "float",
        "flag": "bool",
        "raw": "bytes",
        "nothing": "None",
        "ints": "list[int]",
        "scores": "dict[str, float]",
        "maybe": "int | None",
        "either": "int | str",
        "mode": "'fast' | 'slow'",
        "shade": "Shade",
        "item": "test.msg_item",
        "items": "list[test.msg_item]",
        "extra": "any",
        "opt_item": "test.msg_item | None",
        "tags": "list[str]",
    }


def test_open_values_marks_messages_holding_any() -> None:
    assert MsgSample.open_values
    assert MsgBlob.open_values
    assert MsgHolder.open_values  # through its nested MsgBlob
    assert not MsgItem.open_values
    assert not MsgEvent.open_values


def test_to_wire_gives_plain_values() -> None:
    wire = sample(opt_item=MsgItem(name="o")).to_wire()
    assert wire["shade"] == "dark"
    assert wire["item"] == {"name": "one", "qty": 1}
    assert wire["items"] == [{"name": "a", "qty": 0}, {"name": "b", "qty": 0}]
    assert wire["opt_item"] == {"name": "o", "qty": 0}
    assert wire["maybe"] is None
    assert wire["tags"] == []


def test_default_factory_gives_a_fresh_value_per_message() -> None:
    first, second = sample(), sample()
    assert first.tags == [] and second.tags == []
    assert first.tags is not second.tags


# -- validate() for messages built in process ------------------------------------------


def test_validate_accepts_a_good_message() -> None:
    validate(sample())
    validate(sample(maybe=3, either=4, opt_item=MsgItem(name="x"), tags=["a"]))
    validate(sample(f=2))  # an int is a fine float
    validate(sample(extra=("a", 1)))  # tuples encode as msgpack arrays
    validate(MsgUntypedRequest())


@pytest.mark.parametrize(
    ("overrides", "text"),
    [
        ({"s": 1}, "s: expected str, got int"),
        ({"i": "3"}, "i: expected int, got str"),
        ({"i": True}, "i: expected int, got bool"),
        ({"i": 3.0}, "i: expected int, got float"),
        ({"f": "1.5"}, "f: expected float, got str"),
        ({"f": False}, "f: expected float, got bool"),
        ({"f": 10**400}, "f: expected float, got an int too large"),
        ({"flag": 1}, "flag: expected bool, got int"),
        ({"raw": "bytes"}, "raw: expected bytes, got str"),
        ({"raw": bytearray(b"x")}, "raw: expected bytes, got bytearray"),
        ({"nothing": 0}, "nothing: expected None, got int"),
        ({"ints": (1, 2)}, "ints: expected list, got tuple"),
        ({"ints": [1, "2"]}, "ints[1]: expected int, got str"),
        ({"scores": {"a": "x"}}, "scores.a: expected float, got str"),
        ({"scores": {1: 1.0}}, "scores: map keys must be str, got int"),
        ({"scores": [1.0]}, "scores: expected map, got list"),
        ({"maybe": "x"}, "maybe: expected int | None, got str"),
        ({"either": 1.5}, "either: expected int | str, got float"),
        ({"mode": "medium"}, "mode: expected one of 'fast', 'slow', got 'medium'"),
        ({"shade": "dark"}, "shade: expected Shade, got str"),
        ({"item": {"name": "x"}}, "item: expected test.msg_item, got dict"),
        ({"item": unchecked(MsgItem, name=5)}, "item.name: expected str, got int"),
        (
            {
                "items": [
                    MsgItem(name="a"),
                    MsgItem(name="b"),
                    unchecked(MsgItem, name="c", qty="9"),
                ]
            },
            "items[2].qty: expected int, got str",
        ),
        ({"extra": object()}, "extra: expected a msgpack value, got object"),
        ({"extra": {"a": [1, {2}]}}, "extra.a[1]: expected a msgpack value, got set"),
        ({"extra": {"a": {3: "x"}}}, "extra.a: map keys must be str, got int"),
        ({"opt_item": unchecked(MsgItem, name=b"x")}, "opt_item.name: expected str, got bytes"),
        ({"tags": ["a", None]}, "tags[1]: expected str, got NoneType"),
    ],
)
def test_validate_names_the_field(overrides: dict[str, Any], text: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        validate(sample(**overrides))
    assert str(caught.value) == text
    assert caught.value.path == text.split(": ", 1)[0]
    assert caught.value.details["path"] == caught.value.path


@pytest.mark.parametrize(
    ("overrides", "text"),
    [
        ({"ttl": math.inf}, f"ttl: must be > 0 and <= {MAX_TTL} s, got inf"),
        ({"ttl": math.nan}, f"ttl: must be > 0 and <= {MAX_TTL} s, got nan"),
        ({"ttl": 1e308}, f"ttl: must be > 0 and <= {MAX_TTL} s, got 1e+308"),
        ({"ttl": 0}, f"ttl: must be > 0 and <= {MAX_TTL} s, got 0.0"),
        ({"ttl": -1.0}, f"ttl: must be > 0 and <= {MAX_TTL} s, got -1.0"),
        ({"ttl": 10**400}, "ttl: expected float, got an int too large"),
        ({"wait": 86400.5}, "wait: must be > 0 and <= 86400 s, got 86400.5"),
        ({"count": -1}, f"count: must be >= 0 and <= {INT64_MAX}, got -1"),
        ({"count": 2**63}, f"count: must be >= 0 and <= {INT64_MAX}, got {2**63}"),
        ({"copies": 9}, "copies: must be >= 1 and <= 8, got 9"),
        ({"ratio": 0.0}, "ratio: must be > 0 and <= 1, got 0.0"),
        ({"scores": [1.0, -0.5]}, "scores[1]: must be >= 0, got -0.5"),
        ({"scores": [math.inf]}, "scores[0]: must be >= 0, got inf"),
        ({"plain": -math.inf}, "plain: must be a finite number, got -inf"),
        (
            {"whole": -(2**63) - 1},
            f"whole: must be >= {-(2**63)} and <= {INT64_MAX}, got {-(2**63) - 1}",
        ),
        (
            {"whole": 99999999999999999999999},
            f"whole: must be >= {-(2**63)} and <= {INT64_MAX}, got 99999999999999999999999",
        ),
    ],
)
def test_validate_checks_bounds(overrides: dict[str, Any], text: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        validate(MsgBounded(**overrides))
    assert str(caught.value) == text
    assert caught.value.path == text.split(": ", 1)[0]
    body = {k: v for k, v in MsgBounded(**overrides).to_wire().items() if k in overrides}
    with pytest.raises(InvalidMessage) as decoded:
        MsgBounded._from_wire(body, "b")
    assert decoded.value.path == "b." + caught.value.path
    assert decoded.value.message == caught.value.message


def test_generated_code_shows_in_tracebacks_with_its_source() -> None:
    def generated_frames(error: BaseException) -> list[traceback.FrameSummary]:
        frames = traceback.extract_tb(error.__traceback__)
        return [frame for frame in frames if frame.filename.startswith("<corral generated")]

    for run in (
        lambda: validate(MsgBounded(ttl=-1.0)),
        lambda: MsgBounded._from_wire({"ttl": -1.0}, "b"),
    ):
        with pytest.raises(InvalidMessage) as caught:
            run()
        frames = generated_frames(caught.value)
        assert frames, [f.filename for f in traceback.extract_tb(caught.value.__traceback__)]
        for frame in frames:
            assert frame.filename != "<string>"
            assert "MsgBounded" in frame.filename
            assert frame.line  # the generated line itself, read back through linecache
            source = linecache.getline(frame.filename, frame.lineno or 0)
            assert source.strip() == frame.line


@pytest.mark.parametrize(
    "overrides",
    [
        {"ttl": MAX_TTL, "wait": 86400, "count": INT64_MAX, "copies": 8, "ratio": 1},
        {"ttl": 5e-324, "wait": 1e-9, "count": 0, "copies": 1, "ratio": 1e-300},
        {"anything": math.inf},
        {"anything": -math.inf},
        {"anything": math.nan},
        {"plain": 1e308, "whole": -(2**63)},
    ],
)
def test_values_at_the_bounds_pass(overrides: dict[str, Any]) -> None:
    validate(MsgBounded(**overrides))
    MsgBounded._from_wire(MsgBounded(**overrides).to_wire(), "b")


def test_bounds_are_described() -> None:
    described = {f.name: f.describe() for f in MsgBounded.fields_info}
    assert described == {
        "ttl": f"float (> 0, <= {MAX_TTL} s) | None",
        "wait": "float (> 0, <= 86400 s)",
        "count": "int (>= 0)",
        "copies": "int (>= 1, <= 8)",
        "ratio": "float (> 0, <= 1)",
        "anything": "float (inf and nan allowed)",
        "scores": "list[float (>= 0)]",
        "plain": "float",
        "whole": "int",
    }


def test_a_range_checks_plain_numbers() -> None:
    assert TIMEOUT.check(0, "timeout") == 0
    assert TIMEOUT.check(2.5, "timeout") == 2.5
    for bad, text in [
        (math.inf, "timeout: must be >= 0 and <= 86400 s, got inf"),
        (math.nan, "timeout: must be >= 0 and <= 86400 s, got nan"),
        (-1, "timeout: must be >= 0 and <= 86400 s, got -1"),
        (2**70, f"timeout: must be >= 0 and <= 86400 s, got {2**70}"),
        (True, "timeout: expected a number, got bool"),
        ("5", "timeout: expected a number, got str"),
    ]:
        with pytest.raises(InvalidMessage) as caught:
            TIMEOUT.check(bad, "timeout")
        assert str(caught.value) == text


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: Range(ge=0, gt=0), "ge or gt"),
        (lambda: Range(le=math.inf), "finite"),
        (lambda: Range(ge=math.nan), "finite"),
        (lambda: Range(le=1, finite=False), "no bounds"),
    ],
)
def test_a_range_is_declared_sensibly(make: Any, problem: str) -> None:
    with pytest.raises(TypeError, match=problem):
        make()


def test_a_range_bounds_numbers_only() -> None:
    with pytest.raises(TypeError, match="bounds an int or a float"):

        @message("test.msg_bad_range")
        class MsgBadRange(Event):
            name: Annotated[str, Range(ge=1)] = "x"


def test_every_float_field_of_the_builtin_messages_is_finite() -> None:
    for name, cls in registered().items():
        if not name.startswith(("test.", "bench.")):
            for f in cls.fields_info:
                for bad in (math.inf, math.nan):
                    if "float" in f.describe():
                        with pytest.raises(InvalidMessage, match=f"^b\\.{f.name}: "):
                            f.from_wire(bad, f"b.{f.name}")


def test_any_values_nest_at_most_max_nesting_levels() -> None:
    value: Any = "leaf"
    for _ in range(MAX_NESTING - 1):
        value = [value]
    validate(MsgBlob(data=value))  # 100 levels, the leaf included
    MsgBlob._from_wire({"data": value}, "b")
    with pytest.raises(InvalidMessage, match=r"^data: nested deeper than 100 levels$"):
        validate(MsgBlob(data={"d": value}))
    with pytest.raises(InvalidMessage, match=r"^b\.data: nested deeper than 100 levels$"):
        MsgBlob._from_wire({"data": {"d": value}}, "b")


def test_validate_checks_nested_any() -> None:
    with pytest.raises(InvalidMessage, match=r"^blob\.data\.x: expected a msgpack value"):
        validate(MsgHolder(inner=MsgEvent(), blob=MsgBlob(data={"x": object()})))
    validate(MsgHolder(inner=MsgEvent(topic="t"), blob=MsgBlob(data={"x": [1.5]})))


# -- errors ---------------------------------------------------------------------------------

ERROR_CLASSES: list[type[CorralError]] = [
    errors.InvalidMessage,
    errors.ConfigError,
    errors.RequestError,
    errors.NotFound,
    errors.Conflict,
    errors.RateLimited,
    errors.Unauthorized,
    errors.UnavailableError,
    errors.ManagerUnavailable,
    errors.BackendUnavailable,
    errors.Overloaded,
    errors.Timeout,
    CorralError,
    MsgTeapot,
]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.code)
def test_error_class_maps_codes_back(cls: type[CorralError]) -> None:
    assert error_class(cls.code) is cls


def test_error_codes_are_unique() -> None:
    codes = [cls.code for cls in ERROR_CLASSES]
    assert len(codes) == len(set(codes))


def test_unknown_error_code_maps_to_base() -> None:
    assert error_class("test_no_such_code") is CorralError


def test_error_hierarchy() -> None:
    assert issubclass(errors.NotFound, errors.RequestError)
    assert issubclass(errors.Conflict, errors.RequestError)
    assert issubclass(errors.ManagerUnavailable, errors.UnavailableError)
    assert issubclass(errors.Timeout, CorralError)
    assert issubclass(InvalidMessage, CorralError)
    assert not issubclass(errors.Timeout, errors.UnavailableError)


def test_errors_pickle_with_details() -> None:
    original = errors.NotFound("no such key", {"key": "a"})
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is errors.NotFound
    assert (copy.message, copy.details) == ("no such key", {"key": "a"})
    invalid = pickle.loads(pickle.dumps(InvalidMessage("expected int, got str", path="b.ttl")))
    assert type(invalid) is InvalidMessage
    assert invalid.path == "b.ttl"
    assert str(invalid) == "b.ttl: expected int, got str"


def test_invalid_message_without_path() -> None:
    exc = InvalidMessage("not a msgpack message")
    assert str(exc) == "not a msgpack message"
    assert exc.path == ""
    assert "path" not in exc.details
    assert exc.code == "invalid_message"


def test_error_reply_fields() -> None:
    reply = ErrorReply(code="not_found")
    assert (reply.code, reply.message, reply.details) == ("not_found", "", {})
    assert ErrorReply.kind == "reply"
    assert ErrorReply.type_name == "corral.error"
    validate(ErrorReply(code="conflict", message="version 3 != 4", details={"expected": 3}))
    with pytest.raises(InvalidMessage, match=r"^details\.x: expected a msgpack value"):
        validate(ErrorReply(code="conflict", details={"x": object()}))
