"""Typed messages: the ``@message`` registry and the kinds Request, Reply and Event.

A message is a frozen, keyword-only ``msgspec.Struct`` registered under a stable
wire name and version. Its field types come from its annotations and are checked
on the way in (``from_wire``) and, for messages built in process, by
:func:`validate`::

    @message("cache.get", version=1)
    class CacheGet(Request["CacheValue"]):
        manager = "cache"
        key: str
        namespace: str = "default"

Supported field types: ``str int float bool bytes None``, ``list[T]``,
``dict[str, T]``, unions such as ``T | None``, ``Literal[...]``, ``enum.Enum``,
nested messages, and ``Any`` (any msgpack value).

Numbers are bounded. A float is finite (no ``inf``, no ``nan``) and an int fits
in a signed 64-bit integer, unless the field declares otherwise with a
:class:`Range`; durations, TTLs, sizes, counts and offsets declare theirs, with
the aliases below or their own ``Annotated[int, Range(...)]``::

    @message("cache.set", version=1)
    class CacheSet(Request["CacheStored"]):
        manager = "cache"
        key: str
        ttl: Ttl | None = None                          # > 0, <= ten years
        copies: Annotated[int, Range(ge=1, le=8)] = 1
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, ClassVar, Generic, TypeVar

import msgspec

from corral.errors import CorralError, InvalidMessage, error_class
from corral.messages._generated import run_generated

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_BATCH",
    "MAX_COST",
    "MAX_NESTING",
    "MAX_OFFSET",
    "MAX_TIMEOUT",
    "MAX_TTL",
    "TIMEOUT",
    "CloseCode",
    "Cost",
    "Count",
    "Duration",
    "ErrorReply",
    "Event",
    "FieldInfo",
    "Message",
    "Offset",
    "Range",
    "Reply",
    "Request",
    "TimeLimit",
    "Ttl",
    "check_batch",
    "lookup",
    "message",
    "registered",
    "settled",
    "unwrap",
    "validate",
]

_WIRE_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")

Check = Callable[[Any, str], Any]
"""A compiled field check: takes a value and its path, returns the value or raises."""

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
"""The ints every field stays within, whatever its Range: what Redis and Lua take."""

MAX_TTL = 10 * 365 * 24 * 3600
"""The longest TTL or duration (seconds): ten years. Redis ``PX`` of it never overflows."""

MAX_TIMEOUT = 24 * 3600
MAX_BATCH = 1_000
"""How many requests one ``ask_many`` may send."""
"""The longest timeout or wait (seconds): one day, far below what a thread can wait."""

MAX_OFFSET = 2**53 - 1
"""The largest offset or version: exact in a double (Lua numbers, JavaScript)."""

MAX_COST = 10**9
"""The largest cost one rate-limited call can charge."""

MAX_NESTING = 100
"""How deep lists and maps may nest in an ``Any`` field (the codec's ``max_depth``, 32 by
default, bounds a whole message first): deep enough for any document, shallow enough
for every recursive encoder (msgpack, json) a manager hands it to."""


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a number field, given as ``Annotated[float, Range(gt=0, le=60, unit="s")]``.

    ``ge``/``gt`` bound it below (inclusive/exclusive), ``le`` above. A float
    field is finite unless its Range says ``finite=False`` (then it has no
    bounds: ``inf``, ``-inf`` and ``nan`` all pass). An int field stays within
    64 bits whatever its bounds. ``unit`` is shown by ``corral messages``.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    unit: str = ""
    finite: bool = True

    def __post_init__(self) -> None:
        if self.ge is not None and self.gt is not None:
            raise TypeError("a Range takes ge or gt, not both")
        bounds = [b for b in (self.ge, self.gt, self.le) if b is not None]
        if not self.finite and bounds:
            raise TypeError("a Range with finite=False takes no bounds")
        if not all(math.isfinite(b) for b in bounds):
            raise TypeError("Range bounds must be finite numbers")

    def describe(self) -> str:
        """``> 0, <= 86400 s``; ``inf and nan allowed`` for ``finite=False``."""
        if not self.finite:
            return "inf and nan allowed"
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le))
        parts = [f"{op} {_number(b)}" for op, b in bounds if b is not None]
        text = ", ".join(parts)
        return f"{text} {self.unit}" if self.unit and text else text

    def check(self, value: Any, path: str) -> Any:
        """``value`` if it is a number (int or float, not bool) in range; else InvalidMessage.

        For numbers that are not message fields: the timeouts of the API and the CLI.
        """
        if type(value) is float:
            return _float_check(self)(value, path)
        if type(value) is int:
            return _int_check(self)(value, path)
        raise InvalidMessage(f"expected a number, got {_type_name(value)}", path=path)


Ttl = Annotated[float, Range(gt=0, le=MAX_TTL, unit="s")]
"""A lifetime in seconds: more than 0, at most :data:`MAX_TTL` (ten years)."""

Duration = Annotated[float, Range(ge=0, le=MAX_TTL, unit="s")]
"""Seconds from 0 (which a field may give a meaning, such as "no end") to ten years."""

TimeLimit = Annotated[float, Range(gt=0, le=MAX_TIMEOUT, unit="s")]
"""A timeout or wait in seconds: more than 0, at most :data:`MAX_TIMEOUT` (one day)."""

Count = Annotated[int, Range(ge=0)]
"""A count or size: 0 or more (and within 64 bits, as every int)."""

Offset = Annotated[int, Range(ge=0, le=MAX_OFFSET)]
"""A position in a stream, or a version: 0 to 2**53 - 1."""

Cost = Annotated[int, Range(ge=0, le=MAX_COST)]
"""What one rate-limited call charges: 0 to :data:`MAX_COST`."""

CloseCode = Annotated[int, Range(ge=1000, le=4999)]
"""A WebSocket close code (RFC 6455: 1000-4999)."""

TIMEOUT = Range(ge=0, le=MAX_TIMEOUT, unit="s")
"""The bounds of a timeout given to the API (``System.ask``, ``Client.ask``, ``corral send``)."""


class _MessageMeta(msgspec.StructMeta):
    """Makes every message class keyword-only, as ``kw_only`` is not inherited."""

    def __new__(
        mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **options: Any
    ) -> Any:
        options.setdefault("kw_only", True)
        return super().__new__(mcls, name, bases, namespace, **options)


@typing.dataclass_transform(
    kw_only_default=True, frozen_default=True, field_specifiers=(msgspec.field,)
)
class Message(msgspec.Struct, metaclass=_MessageMeta, frozen=True, forbid_unknown_fields=True):
    """Base of every message. Subclass Request, Reply or Event, never this directly.

    Fields whose default is a new list or map take ``msgspec.field(default_factory=...)``.
    """

    type_name: ClassVar[str]
    wire_version: ClassVar[int]
    """The version this class reads and writes (``@message(name, version=N)``)."""
    internal: ClassVar[bool] = False
    """Sent by corral to itself, not a public wire type (``@message(name, internal=True)``)."""
    idempotent: ClassVar[bool] = False
    """Running it twice has the effect of running it once (``@message(name, idempotent=True)``):
    a request a dead daemon may have started is run again instead of refused."""
    kind: ClassVar[str] = "message"
    manager: ClassVar[str | None] = None
    fields_info: ClassVar[tuple[FieldInfo, ...]]
    open_values: ClassVar[bool]
    """True when a field holds ``Any`` values, whose nesting the codec must bound."""
    _from_wire: ClassVar[Callable[[dict[str, Any], str], Message]]
    _validate: ClassVar[Callable[[Message], None]]

    def route(self) -> str | None:
        """The manager that handles this message (its class's ``manager``)."""
        return self.manager

    def to_wire(self) -> dict[str, Any]:
        """The message's fields as plain msgpack-encodable values."""
        return {f.name: f.to_wire(getattr(self, f.name)) for f in self.fields_info}

    @classmethod
    def upgrade(cls, fields: dict[str, Any], from_version: int) -> dict[str, Any]:
        """Turn the fields of an older version into this version's; override when they differ.

        Fields added since ``from_version`` with a default need nothing here.
        """
        return fields


R = TypeVar("R", bound="Reply")


class Request(Message, Generic[R]):
    """A message that expects exactly one Reply (or an error)."""

    kind = "request"

    @classmethod
    def reply_type(cls) -> type[Reply] | None:
        """The Reply class named in ``Request[...]``, when it names one."""
        return _reply_type_of(cls)


class Reply(Message):
    """The answer to a Request."""

    kind = "reply"


class Event(Message):
    """A fire-and-forget message published on a topic."""

    kind = "event"


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One field of a message: its name, type, default and compiled checks."""

    name: str
    annotation: Any
    required: bool
    default: Any
    from_wire: Check = dataclasses.field(repr=False)
    check: Check = dataclasses.field(repr=False)
    to_wire: Callable[[Any], Any] = dataclasses.field(repr=False)

    def describe(self) -> str:
        return _describe(self.annotation)


class _Registry(dict[str, type[Message]]):
    """The message classes by wire name, and how many times a name was registered again
    by another class object (a module reloaded), which outdates what was made of the old."""

    replaced = 0


_REGISTRY = _Registry()

BUILT_IN_AREAS = {
    "auth": "corral.messages.auth",
    "cache": "corral.messages.cache",
    "pool": "corral.messages.pool",
    "ratelimit": "corral.messages.ratelimit",
    "session": "corral.messages.session",
    "state": "corral.messages.state",
    "stream": "corral.messages.stream",
    "transaction": "corral.messages.transaction",
    "ws": "corral.messages.websocket",
}
"""The modules of the built-in managers' messages, by the area of their wire names.

Each is imported on the first lookup of one of its names (or by :func:`registered`), so
that a process pays for the messages it uses only: ``lookup("cache.get")`` imports
``corral.messages.cache``."""


def registered() -> dict[str, type[Message]]:
    """Every registered message class by wire name (a copy), the built-in ones included."""
    for module in BUILT_IN_AREAS.values():
        importlib.import_module(module)
    return dict(_REGISTRY)


def lookup(type_name: str) -> type[Message] | None:
    """The message class registered under a wire name; None for an unknown name."""
    found = _REGISTRY.get(type_name)
    if found is None:
        module = BUILT_IN_AREAS.get(type_name.partition(".")[0])
        if module is not None and module not in sys.modules:
            importlib.import_module(module)
            found = _REGISTRY.get(type_name)
    return found


def validate(msg: Message) -> None:
    """Check a message built in process, field by field; raise InvalidMessage."""
    type(msg)._validate(msg)


M = TypeVar("M", bound=type[Message])


def message(
    name: str, *, version: int = 1, internal: bool = False, idempotent: bool = False
) -> Callable[[M], M]:
    """Register a message class under a wire name and version, and compile its checks.

    ``internal``: a message corral sends to itself, left out of ``corral messages`` and
    ``corral send``. ``idempotent``: a request that changes nothing, or nothing more when
    run again (a read): a daemon that takes it over from a dead one runs it again, where a
    request that is not idempotent and was already started is refused rather than applied
    twice (see :mod:`corral.remote`).
    """
    if not _WIRE_NAME.fullmatch(name):
        raise ValueError(f"wire name {name!r} must look like 'area.name' in snake case")
    if version < 1:
        raise ValueError("message versions start at 1")

    def register(cls: M) -> M:
        existing = _REGISTRY.get(name)
        if existing is not None and (existing.__module__, existing.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise ValueError(
                f"{name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
            )
        cls.type_name = name
        cls.wire_version = version
        cls.internal = internal
        cls.idempotent = idempotent
        _compile(cls)
        from corral.messages._typed import declare_wire_types  # noqa: PLC0415 - builds on this

        declare_wire_types(cls)
        if existing is not None and existing is not cls:
            _REGISTRY.replaced += 1
        _REGISTRY[name] = cls
        return cls

    return register


def _compile(cls: type[Message]) -> None:
    hints = _declared_types(cls)
    infos: list[FieldInfo] = []
    for field in msgspec.structs.fields(cls):
        if isinstance(field.default, dataclasses.Field):
            raise TypeError(
                f"{cls.__name__}.{field.name}: a message field takes msgspec.field(...), "
                "not dataclasses.field(...)"
            )
        annotation = hints[field.name]
        from_wire, check, to_wire = _compile_type(annotation)
        has_default = field.default is not msgspec.NODEFAULT
        has_factory = field.default_factory is not msgspec.NODEFAULT
        default: Any = field.default if has_default else field.default_factory
        infos.append(
            FieldInfo(
                name=field.name,
                annotation=annotation,
                required=not (has_default or has_factory),
                default=(default, has_factory),
                from_wire=from_wire,
                check=check,
                to_wire=to_wire,
            )
        )
    cls.fields_info = tuple(infos)
    cls.open_values = any(_mentions_any(f.annotation) for f in infos)
    _generate_methods(cls, infos)


def _declared_types(cls: type[Message]) -> dict[str, Any]:
    """The field types as the class and its bases declare them.

    Registering a class gives its own annotations the msgspec types it decodes them as
    (see :mod:`corral.messages._typed`): a field declared by a registered class keeps the
    type of that class's ``fields_info``.
    """
    hints = typing.get_type_hints(cls, include_extras=True)
    for name in hints:
        owner = next(k for k in cls.__mro__ if name in vars(k).get("__annotations__", {}))
        declared = vars(owner).get("fields_info", ())
        hints[name] = next((f.annotation for f in declared if f.name == name), hints[name])
    return hints


_FAST_TYPES = {str: str, bytes: bytes, bool: bool, int: int, float: float, type(None): type(None)}
_MISSING = object()


def _generate_methods(cls: type[Message], infos: list[FieldInfo]) -> None:
    """Write the class's from_wire, validate and to_wire as straight-line code.

    Plain field types are checked inline (``type(v) is str``); the compiled checks
    run only for containers, unions, enums, nested messages, and on failure.
    Decoding and validation are on every message's path, so this matters.
    """
    names = frozenset(f.name for f in infos)
    namespace: dict[str, Any] = {
        "cls": cls,
        "names": names,
        "MISSING": _MISSING,
        "unknown_field": _unknown_field,
        "missing_field": _missing_field,
    }
    decode = [
        "def from_wire(body, path):",
        "    if not names.issuperset(body):",
        "        unknown_field(cls, body, path)",
    ]
    check = ["def validate(msg):"]
    to_wire = ["def to_wire(self):", "    return {"]
    for i, f in enumerate(infos):
        namespace[f"conv_{i}"] = f.from_wire
        namespace[f"check_{i}"] = f.check
        namespace[f"wire_{i}"] = f.to_wire
        default, is_factory = f.default
        namespace[f"default_{i}"] = default
        fast = _fast_spec(f.annotation)
        if fast is not None:
            kind, span, optional = fast
            namespace[f"type_{i}"] = kind
            test = f"type(v) is not type_{i}"
            if span is not None:  # a number: its bounds inline too (nan fails them)
                namespace[f"lo_{i}"], namespace[f"hi_{i}"] = span.lo, span.hi
                test += f" or not lo_{i} {'<' if span.lo_open else '<='} v <= hi_{i}"
            if optional:  # ``T | None`` of a plain T
                test = f"v is not None and ({test})"
        decode.append(f"    v = body.get({f.name!r}, MISSING)")
        decode.append("    if v is MISSING:")
        if f.required:
            decode.append(f"        missing_field(path, {f.name!r})")
        elif is_factory:
            decode.append(f"        v = default_{i}()")
        else:
            decode.append(f"        v = default_{i}")
        if fast is not None:
            decode.append(f"    elif {test}:")
            check.append(f"    v = msg.{f.name}")
            check.append(f"    if {test}:")
            check.append(f"        check_{i}(v, {f.name!r})")
        else:
            decode.append("    else:")
            check.append(f"    check_{i}(msg.{f.name}, {f.name!r})")
        decode.append(f"        v = conv_{i}(v, path + {'.' + f.name!r})")
        decode.append(f"    v_{i} = v")
        identity = f.to_wire is _identity
        to_wire.append(
            f"        {f.name!r}: self.{f.name},"
            if identity
            else f"        {f.name!r}: wire_{i}(self.{f.name}),"
        )
    values = ", ".join(f"{f.name}=v_{i}" for i, f in enumerate(infos))
    decode.append(f"    return cls({values})")
    check.append("    return None")
    to_wire.append("    }")
    run_generated("\n".join(decode + check + to_wire), f"message {_dotted(cls)}", namespace)
    cls._from_wire = staticmethod(namespace["from_wire"])
    cls._validate = staticmethod(namespace["validate"])
    cls.to_wire = namespace["to_wire"]  # type: ignore[method-assign]


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _fast_spec(annotation: Any) -> tuple[type, _Span | None, bool] | None:
    """What to check inline for a field of a plain type T, or ``T | None``.

    The type, the bounds when it is a number, and whether None is allowed; None
    when the field is of another kind (containers, enums, messages...).
    """
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if len(args) != 2 or type(None) not in args:
            return None
        annotation = args[0] if args[1] is type(None) else args[1]
        optional = True
    rng = _NO_RANGE
    if typing.get_origin(annotation) is Annotated:
        rng = _range_of(annotation) or _NO_RANGE
        annotation = typing.get_args(annotation)[0]
    kind = _FAST_TYPES.get(annotation)
    if kind is None or (optional and kind is type(None)):
        return None
    return kind, _span(kind, rng) if kind in (int, float) else None, optional


def _unknown_field(cls: type[Message], body: dict[str, Any], path: str) -> None:
    names = {f.name for f in cls.fields_info}
    unknown = sorted(str(k) for k in body if k not in names)
    raise InvalidMessage(
        f"unknown field of {cls.type_name} (fields: {', '.join(sorted(names)) or 'none'})",
        path=f"{path}.{unknown[0]}",
    )


def _missing_field(path: str, name: str) -> None:
    raise InvalidMessage("missing required field", path=f"{path}.{name}")


def _reply_type_of(cls: type) -> type[Reply] | None:
    for klass in cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            if typing.get_origin(base) is Request:
                (arg,) = typing.get_args(base)
                if isinstance(arg, type) and issubclass(arg, Reply):
                    return arg
                module = sys.modules.get(klass.__module__)
                if isinstance(arg, typing.ForwardRef | str) and module is not None:
                    ref = arg.__forward_arg__ if isinstance(arg, typing.ForwardRef) else arg
                    resolved = vars(module).get(ref)
                    if isinstance(resolved, type) and issubclass(resolved, Reply):
                        return resolved
    return None


def _mentions_any(annotation: Any) -> bool:
    if annotation is Any:
        return True
    if isinstance(annotation, type) and issubclass(annotation, Message):
        return annotation.open_values
    return any(_mentions_any(a) for a in typing.get_args(annotation))


def _type_name(value: Any) -> str:
    return type(value).__name__


def _describe(annotation: Any) -> str:
    if annotation is type(None):
        return "None"
    if annotation is Any:
        return "any"
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base = _describe(typing.get_args(annotation)[0])
        rng = _range_of(annotation)
        shown = rng.describe() if rng is not None else ""
        return f"{base} ({shown})" if shown else base
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list[{_describe(typing.get_args(annotation)[0])}]"
    if origin is dict:
        return f"dict[str, {_describe(typing.get_args(annotation)[1])}]"
    if isinstance(annotation, type) and issubclass(annotation, Message):
        return annotation.type_name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def _identity(value: Any) -> Any:
    return value


_PLAIN = (str, bytes, bool, type(None))


def _scalar(expected: type) -> tuple[Check, Check, Callable[[Any], Any]]:
    label = "None" if expected is type(None) else expected.__name__

    def check(value: Any, path: str) -> Any:
        if type(value) is expected:
            return value
        raise InvalidMessage(f"expected {label}, got {_type_name(value)}", path=path)

    return check, check, _identity


_NO_RANGE = Range()
_FLOAT_MAX = sys.float_info.max


class _Span(typing.NamedTuple):
    """The bounds a number field is checked against: its Range within its type's."""

    lo: float
    lo_open: bool
    hi: float

    def holds(self, value: float) -> bool:
        # Written so that nan is never inside.
        return (self.lo < value if self.lo_open else self.lo <= value) and value <= self.hi


def _span(kind: type, rng: Range) -> _Span | None:
    """The effective bounds of an int or float field with ``rng``; None: unbounded."""
    if kind is float and not rng.finite:
        return None
    floor, ceiling = (INT64_MIN, INT64_MAX) if kind is int else (-_FLOAT_MAX, _FLOAT_MAX)
    if rng.gt is not None:
        lo, lo_open = max(rng.gt, floor), rng.gt >= floor
    else:
        lo, lo_open = floor if rng.ge is None else max(rng.ge, floor), False
    hi = ceiling if rng.le is None else min(rng.le, ceiling)
    return _Span(lo, lo_open, hi)


def _number(value: float) -> str:
    """A bound as people read it: 86400, not 86400.0 or 8.64e+04."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e18:
        return str(int(value))
    return repr(value)


def _out_of_range(kind: type, rng: Range, span: _Span, value: Any, path: str) -> InvalidMessage:
    """The error for a number of the right type outside its field's bounds.

    Its details carry ``bounds``, which also tells a union that this candidate took
    the value's type and refused its value.
    """
    declared = kind is int or span.lo != -_FLOAT_MAX or span.hi != _FLOAT_MAX
    if not declared:  # a float of no declared bounds: inf, -inf or nan
        return InvalidMessage(
            f"must be a finite number, got {value!r}", {"bounds": "finite"}, path=path
        )
    parts = []
    if kind is int or span.lo != -_FLOAT_MAX:
        parts.append(f"{'>' if span.lo_open else '>='} {_number(span.lo)}")
    if kind is int or span.hi != _FLOAT_MAX:
        parts.append(f"<= {_number(span.hi)}")
    bounds = " and ".join(parts) + (f" {rng.unit}" if rng.unit else "")
    return InvalidMessage(f"must be {bounds}, got {value!r:.40}", {"bounds": bounds}, path=path)


@functools.cache
def _int_check(rng: Range) -> Check:
    span = _span(int, rng)
    assert span is not None

    def check(value: Any, path: str) -> Any:
        if type(value) is not int:
            raise InvalidMessage(f"expected int, got {_type_name(value)}", path=path)
        if span.holds(value):
            return value
        raise _out_of_range(int, rng, span, value, path)

    return check


@functools.cache
def _float_check(rng: Range) -> Check:
    span = _span(float, rng)

    def check(value: Any, path: str) -> Any:
        kind = type(value)
        if kind is int:
            try:
                value = float(value)
            except OverflowError:  # only in process: msgpack ints fit in a float
                raise InvalidMessage(
                    "expected float, got an int too large", {"bounds": "finite"}, path=path
                ) from None
        elif kind is not float:
            raise InvalidMessage(f"expected float, got {_type_name(value)}", path=path)
        if span is None or span.holds(value):
            return value
        raise _out_of_range(float, rng, span, value, path)

    return check


def _bounded(kind: type, rng: Range) -> tuple[Check, Check, Callable[[Any], Any]]:
    check = _int_check(rng) if kind is int else _float_check(rng)
    return check, check, _identity


def _range_of(annotation: Any) -> Range | None:
    """The Range of ``Annotated[int | float, Range(...)]``; None when it has none."""
    ranges = [extra for extra in annotation.__metadata__ if isinstance(extra, Range)]
    if not ranges:
        return None
    base = typing.get_args(annotation)[0]
    if base not in (int, float) or len(ranges) > 1:
        raise TypeError(f"one Range bounds an int or a float field, not {annotation!r}")
    return ranges[0]


_ANY_LEAVES = frozenset((*_PLAIN, int, float))


def _check_any(value: Any, path: str) -> Any:
    """Check a msgpack value of any shape; walks it level by level without building paths."""
    level = [value]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_NESTING:
            raise InvalidMessage(f"nested deeper than {MAX_NESTING} levels", path=path)
        below: list[Any] = []
        extend = below.extend
        for item in level:
            kind = type(item)
            if kind in _ANY_LEAVES:
                continue
            if kind is dict:
                for k in item:
                    if type(k) is not str:
                        _any_error(value, path)
                extend(item.values())
            elif kind is list or kind is tuple:
                extend(item)
            else:
                _any_error(value, path)
        level = below
    return value


def _any_error(value: Any, path: str) -> typing.NoReturn:
    """Find what :func:`_check_any` rejected, and raise it with its path."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        kind = type(item)
        if kind in _PLAIN or kind is int or kind is float:
            continue
        if kind is list or kind is tuple:
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
        elif kind is dict:
            for k, v in item.items():
                if type(k) is not str:
                    raise InvalidMessage(f"map keys must be str, got {_type_name(k)}", path=where)
                stack.append((v, f"{where}.{k}"))
        else:
            raise InvalidMessage(f"expected a msgpack value, got {_type_name(item)}", path=where)
    raise InvalidMessage("expected a msgpack value", path=path)  # not reached


def _list(item: Any) -> tuple[Check, Check, Callable[[Any], Any]]:
    item_wire, item_check, item_to_wire = _compile_type(item)

    def make(convert: Check) -> Check:
        def check(value: Any, path: str) -> Any:
            if type(value) is not list:
                raise InvalidMessage(f"expected list, got {_type_name(value)}", path=path)
            return [convert(v, f"{path}[{i}]") for i, v in enumerate(value)]

        return check

    return make(item_wire), make(item_check), lambda v: [item_to_wire(x) for x in v]


def _dict(key: Any, value_type: Any) -> tuple[Check, Check, Callable[[Any], Any]]:
    if key is not str:
        raise TypeError("message maps must have str keys")
    value_wire, value_check, value_to_wire = _compile_type(value_type)

    def make(convert: Check) -> Check:
        def check(value: Any, path: str) -> Any:
            if type(value) is not dict:
                raise InvalidMessage(f"expected map, got {_type_name(value)}", path=path)
            out = {}
            for k, v in value.items():
                if type(k) is not str:
                    raise InvalidMessage(f"map keys must be str, got {_type_name(k)}", path=path)
                out[k] = convert(v, f"{path}.{k}")
            return out

        return check

    return (
        make(value_wire),
        make(value_check),
        lambda v: {k: value_to_wire(x) for k, x in v.items()},
    )


def _union(options: tuple[Any, ...]) -> tuple[Check, Check, Callable[[Any], Any]]:
    compiled = [_compile_type(o) for o in options]
    label = " | ".join(_describe(o) for o in options)
    wire_checks = [c[0] for c in compiled]
    py_checks = [c[1] for c in compiled]

    def make(checks: list[Check]) -> Check:
        def check(value: Any, path: str) -> Any:
            inner: InvalidMessage | None = None
            for candidate in checks:
                try:
                    return candidate(value, path)
                except InvalidMessage as exc:
                    # A candidate that took the value's shape and failed inside names the
                    # path; a number of the right type out of its bounds says so.
                    if inner is None and (exc.path != path or "bounds" in exc.details):
                        inner = exc
            if inner is not None:
                raise inner
            raise InvalidMessage(f"expected {label}, got {_type_name(value)}", path=path)

        return check

    if all(convert is _identity for (_, _, convert) in compiled):
        return make(wire_checks), make(py_checks), _identity

    def to_wire(value: Any) -> Any:
        for _, check, convert in compiled:
            try:
                check(value, "")
            except InvalidMessage:
                continue
            return convert(value)
        return value

    return make(wire_checks), make(py_checks), to_wire


def _literal(values: tuple[Any, ...]) -> tuple[Check, Check, Callable[[Any], Any]]:
    allowed = {(type(v), v) for v in values}
    label = ", ".join(repr(v) for v in values)

    def check(value: Any, path: str) -> Any:
        try:
            if (type(value), value) in allowed:
                return value
        except TypeError:  # unhashable
            pass
        raise InvalidMessage(f"expected one of {label}, got {value!r:.60}", path=path)

    return check, check, _identity


def _enum(cls: type[enum.Enum]) -> tuple[Check, Check, Callable[[Any], Any]]:
    by_value = {m.value: m for m in cls}
    label = ", ".join(repr(v) for v in by_value)

    def from_wire(value: Any, path: str) -> Any:
        try:
            member = by_value.get(value)
        except TypeError:
            member = None
        if member is None or type(member.value) is not type(value):
            raise InvalidMessage(f"expected one of {label}, got {value!r:.60}", path=path)
        return member

    def check(value: Any, path: str) -> Any:
        if isinstance(value, cls):
            return value
        raise InvalidMessage(f"expected {cls.__name__}, got {_type_name(value)}", path=path)

    return from_wire, check, lambda v: v.value


def _nested(cls: type[Message]) -> tuple[Check, Check, Callable[[Any], Any]]:
    def from_wire(value: Any, path: str) -> Any:
        if type(value) is not dict:
            raise InvalidMessage(
                f"expected {cls.type_name} map, got {_type_name(value)}", path=path
            )
        return cls._from_wire(value, path)

    def check(value: Any, path: str) -> Any:
        if type(value) is not cls:
            raise InvalidMessage(f"expected {cls.type_name}, got {_type_name(value)}", path=path)
        for f in cls.fields_info:
            f.check(getattr(value, f.name), f"{path}.{f.name}")
        return value

    return from_wire, check, lambda v: v.to_wire()


def _compile_type(annotation: Any) -> tuple[Check, Check, Callable[[Any], Any]]:
    if annotation is int or annotation is float:
        return _bounded(annotation, _NO_RANGE)
    if annotation in (str, bytes, bool) or annotation is None or annotation is type(None):
        return _scalar(type(None) if annotation is None else annotation)
    if annotation is Any:
        return _check_any, _check_any, _identity
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        rng = _range_of(annotation)
        return _compile_type(args[0]) if rng is None else _bounded(args[0], rng)
    if origin is list:
        return _list(args[0])
    if origin is dict:
        return _dict(*args)
    if origin in (typing.Union, types.UnionType):
        return _union(args)
    if origin is typing.Literal:
        return _literal(args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _enum(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Message):
        if not hasattr(annotation, "type_name"):
            raise TypeError(f"nested message {annotation.__name__} must be registered first")
        return _nested(annotation)
    raise TypeError(f"unsupported message field type: {annotation!r}")


@message("corral.error")
class ErrorReply(Reply):
    """An error answered instead of a Reply; raised in the caller as ``corral.errors``."""

    code: str
    message: str = ""
    details: dict[str, Any] = msgspec.field(default_factory=dict)

    @classmethod
    def of(cls, error: CorralError) -> ErrorReply:
        """The reply that carries ``error`` to the caller (where ``unwrap`` raises it again)."""
        return cls(code=error.code, message=error.message, details=error.details)


def unwrap(reply: Any) -> Any:
    """Return a reply, or raise the :mod:`corral.errors` error an ErrorReply carries."""
    if type(reply) is ErrorReply:
        raise error_class(reply.code)(reply.message, reply.details)
    return reply


def check_batch(messages: Sequence[Message]) -> None:
    """InvalidMessage unless ``messages`` is a list of 1 to :data:`MAX_BATCH` messages."""
    if not 0 < len(messages) <= MAX_BATCH:
        raise InvalidMessage(
            f"a batch holds 1 to {MAX_BATCH} requests, got {len(messages)}", path="messages"
        )


def settled(reply: Message) -> Reply | CorralError:
    """A reply as :meth:`ask_many` gives it: the reply, or the error an ErrorReply carries."""
    try:
        answer: Reply = unwrap(reply)
    except CorralError as exc:
        return exc
    return answer
