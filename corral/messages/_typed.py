"""The msgspec types of a message's fields, so that msgspec decodes and checks it in C.

A message class is a ``msgspec.Struct`` (unknown fields forbidden). When it is
registered, :func:`declare_wire_types` gives each field it declares, in its
annotations, a msgspec type that accepts exactly the values the class's generated
``_from_wire`` accepts, or fewer: numbers carry their
:class:`~corral.messages.base.Range` as ``msgspec.Meta`` bounds (and the 64-bit and
finite limits every number has), enums and literals their values, nested messages
their classes. msgspec then decodes a body straight into the message; what it cannot
say in C (``Any`` values: plain msgpack values, str map keys, nesting under the codec's
limit) is checked on the decoded message by straight-line code written for its class,
which :func:`body_check` gives::

    body = body_check(CacheGet, max_depth=32)
    message = msgspec.msgpack.decode(b"\\x81\\xa3key\\xa1k", type=CacheGet)
    assert body.check is None                   # CacheGet holds no Any values

Where msgspec or those checks refuse a body (raising one of :data:`REFUSED`), the codec
decodes it again with msgpack and the class's own checks, which say what is wrong, with
its path. A class whose fields msgspec cannot type that way (an enum of str and int
values, a union of two messages, a float tried before an int...) has no body check.
"""

from __future__ import annotations

import enum
import functools
import math
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, NamedTuple

import msgspec

from corral.messages._generated import run_generated
from corral.messages.base import (
    _NO_RANGE,
    MAX_NESTING,
    Message,
    Range,
    _range_of,
    _span,
)

__all__ = ["REFUSED", "BodyCheck", "body_check", "declare_wire_types"]

Check = Callable[[Any], Any]
"""Returns a decoded value as it is, or raises :data:`REFUSED`."""

_BODY_DEPTH = 2
"""The envelope is level 1 of the codec's nesting limit, the body level 2."""

_ANY_LEAVES = frozenset((str, bytes, bool, int, float, type(None)))


class _Refused(Exception):
    """A decoded value that a check below refuses: the reference decoder says why."""


REFUSED = (msgspec.MsgspecError, ValueError, TypeError, RecursionError, _Refused)
"""What msgspec and the checks here raise for input they refuse (invalid UTF-8 is a
ValueError, a map key that is a map a TypeError before msgspec 0.19, input nested past
the interpreter's limit a RecursionError)."""


class _Unsupported(Exception):
    """A type msgspec cannot check exactly as the message's own checks do."""


class _Node(NamedTuple):
    """One field type as msgspec decodes it, and the check of its decoded value."""

    type: Any
    check: Check | None
    """None: what msgspec decodes needs no more checks."""


class BodyCheck(NamedTuple):
    """What remains to check of a message that msgspec decoded (see the module docstring)."""

    check: Callable[[Message], Message] | None
    """Returns the message, or raises one of :data:`REFUSED` for a value msgspec took and a
    check here refuses; None: nothing remains to check."""


def body_check(cls: type[Message], max_depth: int) -> BodyCheck | None:
    """How the codec decodes ``cls``, or None when msgspec cannot check it exactly.

    ``max_depth``: the codec's nesting limit, which bounds classes holding ``Any`` values.
    """
    key = (cls, max_depth if cls.open_values else None)
    try:
        return _BODY_CHECKS[key]
    except KeyError:
        pass
    try:
        node = _message_node(cls, _BODY_DEPTH, key[1])
        msgspec.msgpack.Decoder(node.type)  # msgspec refuses some types only here
    except (_Unsupported, TypeError):
        found = None
    else:
        found = BodyCheck(node.check)
    _BODY_CHECKS[key] = found
    return found


_BODY_CHECKS: dict[tuple[type[Message], int | None], BodyCheck | None] = {}


def _node(annotation: Any, depth: int, limit: int | None) -> _Node:
    """The node of a value at ``depth`` (the body's fields are at 3)."""
    if limit is not None and depth > limit:
        raise _Unsupported("deeper than the nesting limit")
    if annotation is int or annotation is float:
        return _number(annotation, _NO_RANGE)
    if annotation in (str, bytes, bool):
        return _Node(annotation, None)
    if annotation is None or annotation is type(None):
        return _Node(type(None), None)
    if annotation is Any:
        if limit is None:
            raise _Unsupported("an Any value outside a class marked open_values")
        return _Node(Any, _any_check(min(limit - depth + 1, MAX_NESTING)))
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        rng = _range_of(annotation)
        return _node(args[0], depth, limit) if rng is None else _number(args[0], rng)
    if origin is list:
        item = _node(args[0], depth + 1, limit)
        return _Node(_list_of(item.type), _each(item.check) if item.check else None)
    if origin is dict:
        value = _node(args[1], depth + 1, limit)
        check = _each_value(value.check) if value.check else None
        return _Node(_map_of(value.type), check)
    if origin in (typing.Union, types.UnionType):
        return _union([_node(option, depth, limit) for option in args], args)
    if origin is typing.Literal:
        return _Node(annotation, None)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _Node(annotation, None)
    if isinstance(annotation, type) and issubclass(annotation, Message):
        # Without a nesting limit, a class's checks are the same at every depth.
        return _message_node(annotation, _BODY_DEPTH if limit is None else depth, limit)
    raise _Unsupported(f"no msgspec type for {annotation!r}")


def _list_of(item: Any) -> Any:
    return list[item]


def _map_of(value: Any) -> Any:
    return dict[str, value]


def _number(kind: type, rng: Range) -> _Node:
    span = _span(kind, rng)
    if span is None:  # a float that may be inf or nan
        return _Node(float, None)
    if kind is int:
        low = math.floor(span.lo) + 1 if span.lo_open else math.ceil(span.lo)
        meta = msgspec.Meta(ge=low, le=math.floor(span.hi))
    elif span.lo_open:
        meta = msgspec.Meta(gt=span.lo, le=span.hi)
    else:
        meta = msgspec.Meta(ge=span.lo, le=span.hi)
    return _Node(Annotated[kind, meta], None)


def _union(options: list[_Node], annotations: tuple[Any, ...]) -> _Node:
    # msgspec picks an option by the wire type, where the reference tries them in order:
    # a float option before an int one would take an int as a float there.
    seen_float = False
    for annotation in annotations:
        base = _base(annotation)
        if base is float:
            seen_float = True
        elif seen_float and _takes_ints(base):
            raise _Unsupported("a float option before an int option")
    checks: dict[type, Check] = {}
    for option in options:
        if option.type is Any:
            raise _Unsupported("Any in a union")  # no type tells when to check a value
        if option.check is not None:
            checks[_decoded_type(option.type)] = option.check
    union = functools.reduce(lambda a, b: a | b, [o.type for o in options])
    if not checks:
        return _Node(union, None)

    def check(value: Any) -> Any:
        step = checks.get(type(value))
        return value if step is None else step(value)

    return _Node(union, check)


def _base(annotation: Any) -> Any:
    """What a number field is underneath its Range."""
    if typing.get_origin(annotation) is Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def _takes_ints(annotation: Any) -> bool:
    if annotation is int:
        return True
    if typing.get_origin(annotation) is typing.Literal:
        return any(type(v) is int for v in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return any(type(m.value) is int for m in annotation)
    return False


def _decoded_type(msgspec_type: Any) -> type:
    """The Python type msgspec decodes a value of ``msgspec_type`` as (for unions)."""
    origin = typing.get_origin(msgspec_type)
    if origin is Annotated:
        return _decoded_type(typing.get_args(msgspec_type)[0])
    if origin is not None:
        return typing.cast(type, origin)  # list, dict
    return typing.cast(type, msgspec_type)  # a message class


def _each(check: Check) -> Check:
    def each(items: list[Any]) -> list[Any]:
        for item in items:
            check(item)
        return items

    return each


def _each_value(check: Check) -> Check:
    def each_value(items: dict[str, Any]) -> dict[str, Any]:
        for value in items.values():
            check(value)
        return items

    return each_value


def _any_check(levels: int) -> Check:
    """A check that a value is plain msgpack (str map keys) nested at most ``levels`` deep."""
    if levels < 1:
        raise _Unsupported("no room for a value")

    def check(value: Any) -> Any:
        if not _plain_within([value], levels):
            raise _Refused
        return value

    return check


def _plain_within(level: list[Any], levels: int) -> bool:
    """Whether every item below is a msgpack value with str keys, ``levels`` deep at most.

    Walks level by level, as the reference decoder counts nesting.
    """
    leaves = _ANY_LEAVES
    join = "".join
    depth = 1
    while level:
        if depth > levels:
            return False
        below: list[Any] = []
        extend = below.extend
        for item in level:
            kind = type(item)
            if kind is dict:
                try:
                    join(item)  # every key a str, checked in C
                except TypeError:
                    return False
                extend(item.values())
            elif kind is list:
                extend(item)
            elif kind not in leaves:
                return False
        level = below
        depth += 1
    return True


def _message_node(cls: type[Message], depth: int, limit: int | None) -> _Node:
    """``cls`` with its map at ``depth``, and the check of its ``Any`` values, if any."""
    key = (cls, depth, limit)
    node = _NODES.get(key)
    if node is None:
        node = _NODES[key] = _make_message_node(cls, depth, limit)
    return node


_NODES: dict[tuple[type[Message], int, int | None], _Node] = {}


def _make_message_node(cls: type[Message], depth: int, limit: int | None) -> _Node:
    nodes = [_node(info.annotation, depth + 1, limit) for info in cls.fields_info]
    namespace: dict[str, Any] = {}
    lines = ["def check(message):"]
    for info in cls.fields_info:
        _check_declared(cls, info.name)
    for i, (info, node) in enumerate(zip(cls.fields_info, nodes, strict=True)):
        if node.check is None:
            continue
        default, is_factory = info.default
        if not info.required:
            try:
                node.check(default() if is_factory else default)
            except REFUSED:
                raise _Unsupported("a default that the check refuses") from None
        namespace[f"check_{i}"] = node.check
        lines.append(f"    check_{i}(message.{info.name})")
    lines.append("    return message")
    if len(lines) == 2:
        return _Node(cls, None)
    run_generated("\n".join(lines), f"checks of {cls.__module__}.{cls.__qualname__}", namespace)
    return _Node(cls, namespace["check"])


def _check_declared(cls: type[Message], name: str) -> None:
    """Unsupported unless a registered class (which :func:`declare_wire_types` gave its
    msgspec type) declares field ``name`` of ``cls``."""
    owner = next(k for k in cls.__mro__ if name in vars(k).get("__annotations__", {}))
    if "fields_info" not in vars(owner):
        raise _Unsupported(f"{name} is declared by {owner.__qualname__}, not a registered message")


def declare_wire_types(cls: type[Message]) -> None:
    """Give each field that ``cls`` declares the msgspec type it decodes as, in its
    annotations, where msgspec reads it (when a decoder of the class is first made).

    Done when the class is registered, so that msgspec never sees a message class
    without its bounds. A field msgspec cannot check exactly keeps its declared type,
    and the codec decodes its class by the reference path only.
    """
    annotations = vars(cls).get("__annotations__", {})
    for info in cls.fields_info:
        if info.name in annotations:
            try:
                node = _node(info.annotation, _BODY_DEPTH + 1, _UNBOUNDED)
            except _Unsupported:
                continue
            annotations[info.name] = node.type


_UNBOUNDED = 1 << 30
"""A nesting limit no message reaches: the types do not depend on the limit, only checks."""
