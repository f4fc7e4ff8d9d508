"""The msgpack envelope: encode, decode, validate and sign.

One msgpack map per message, with compact keys::

    {"t": "cache.get", "v": 1, "id": <16 bytes>, "c": <correlation id or nil>,
     "r": <reply topic or nil>, "ts": <unix ms>, "d": <deadline, unix ms; requests only>,
     "b": {<fields>}, "s": <HMAC-SHA256>}

:meth:`Codec.decode` checks everything before a manager sees the message: size,
nesting depth, envelope shape, known type and version, every field's type and,
when keys are configured, the signature and (given a :class:`ReplayGuard`) the
replay window. Any failure is :class:`InvalidMessage` naming the field path, and
nothing else::

    codec = Codec(keys=[b"secret"])
    data = codec.encode(CacheGet(key="a"), channel="corral:{req:cache}:stream")
    guard = codec.replay_guard()
    envelope = codec.decode(data, channel="corral:{req:cache}:stream", guard=guard)
    assert envelope.message == CacheGet(key="a")

The signature covers the envelope's bytes without its ``"s"`` entry, preceded by the
channel (or stream) it was written to when one is given (see
:class:`~corral.messages.signing.Signer` and docs/wire.md): a message signed for one
channel is refused on any other.

msgspec writes the envelopes, and reads them: messages are msgspec structs, and for each
message class the codec makes an :class:`Envelope` type whose body is that class, its
fields typed so that msgspec checks them in C (:mod:`corral.messages._typed`); one
msgspec decoder takes the envelopes of every class the codec has seen, told apart by
their "t", in one call. What it refuses goes to the reference path: ``msgpack.unpackb``
and the class's own checks, which take any layout and name what is wrong. Both paths
accept the same input and build the same messages (``tests/test_codec_fuzz.py`` holds
them to it).
"""

from __future__ import annotations

import functools
import itertools
import operator
import os
import threading
import time
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, NamedTuple

import msgpack
import msgspec

from corral.errors import InvalidMessage
from corral.messages._typed import REFUSED, body_check
from corral.messages.base import _REGISTRY, Message, lookup
from corral.messages.signing import DEFAULT_REPLAY_WINDOW, ReplayGuard, Signer

_packb = msgpack.packb
_unpackb = msgpack.unpackb
_lookup = lookup

__all__ = ["DEFAULT_MAX_DEPTH", "DEFAULT_MAX_SIZE", "Codec", "Envelope", "new_id"]

DEFAULT_MAX_SIZE = 1 << 20
DEFAULT_MAX_DEPTH = 32

_ENVELOPE_KEYS = frozenset({"t", "v", "id", "c", "r", "ts", "d", "b", "s"})

# ``encode`` packs a 7- or 8-entry envelope (header: fixmap 0x87 or 0x88) and appends
# "s" and a 32-byte bin8 signature, which gives the map one entry longer that packing
# it with "s" last would give.
_FIXMAP = 0x80
_BYTE = tuple(bytes((i,)) for i in range(256))
_SIGNATURE_ENTRY = b"\xa1s\xc4\x20"
_SIGNATURE_TAIL = len(_SIGNATURE_ENTRY) + 32


def new_id() -> bytes:
    """A unique 16-byte id: 8 random bytes per process, then a counter (cheaper than urandom)."""
    return next(_ids).to_bytes(16, "big")


def _new_ids() -> None:
    global _ids
    _ids = itertools.count(int.from_bytes(os.urandom(8), "big") << 64)


_ids: itertools.count[int]
_new_ids()
os.register_at_fork(after_in_child=_new_ids)


class _Outgoing(msgspec.Struct, omit_defaults=True, gc=False):
    """The envelope as ``encode`` writes it: these keys in this order, "d" only when set."""

    t: str
    v: int
    id: bytes
    c: bytes | None
    r: str | None
    ts: int
    b: Any
    d: int = 0


class Envelope(msgspec.Struct, frozen=True, gc=False):
    """A decoded message with its envelope: id, correlation id, reply topic, timestamp,
    the version it was written in, and a request's deadline (unix ms; 0: none).

    ``decode`` gives an envelope of a subclass made for the message's class (see
    :class:`_Plan`), which msgspec decodes in one call; envelopes compare by these fields.
    """

    message: Message = msgspec.field(name="b")
    id: bytes
    correlation: bytes | None = msgspec.field(default=None, name="c")
    reply_to: str | None = msgspec.field(default=None, name="r")
    ts: int = 0
    version: int = msgspec.field(default=1, name="v")
    deadline: int = msgspec.field(default=0, name="d")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Envelope):
            return NotImplemented
        return self._fields() == other._fields()

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        fields = zip(_FIELDS, self._fields(), strict=True)
        shown = ", ".join(f"{name}={value!r}" for name, value in fields)
        return f"Envelope({shown})"

    def _fields(self) -> tuple[Any, ...]:
        return (
            self.message,
            self.id,
            self.correlation,
            self.reply_to,
            self.ts,
            self.version,
            self.deadline,
        )


_FIELDS = ("message", "id", "correlation", "reply_to", "ts", "version", "deadline")

_SIGNED_KEYS = 8
"""How many keys a signed envelope without "d" has: t, v, id, c, r, ts, b and s."""


class _Plan(NamedTuple):
    """The envelope types ``decode`` takes the messages of one class as, in one msgspec call:
    tagged by "t", their body the message class, every key checked."""

    unsigned: type[Envelope]
    signed: type[Envelope]
    """A signed envelope as ``encode`` writes it: every key but "d" present, so that its map
    header tells whether a key came twice (see ``decode``)."""


def _plan_of(cls: type[Message], max_depth: int) -> _Plan | None:
    """The plan for ``cls`` under a codec's nesting limit, made once."""
    key = (cls, max_depth if cls.open_values else None)
    if key not in _PLANS:
        _PLANS[key] = _make_plan(cls, max_depth)
    return _PLANS[key]


_PLANS: dict[tuple[type[Message], int | None], _Plan | None] = {}

_ID = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]


def _make_plan(cls: type[Message], max_depth: int) -> _Plan | None:
    body = body_check(cls, max_depth)
    if body is None:
        return None
    fields: list[tuple[str, Any, Any]] = [
        ("message", cls, msgspec.field(name="b")),
        ("version", Literal[cls.wire_version], msgspec.field(name="v")),
        ("id", _ID, msgspec.NODEFAULT),
    ]
    signed_fields: list[tuple[str, Any, Any]] = [
        ("correlation", bytes | None, msgspec.field(name="c")),
        ("reply_to", str | None, msgspec.field(name="r")),
        ("ts", int, msgspec.NODEFAULT),
        ("signature", bytes, msgspec.field(name="s")),
    ]
    optional_signature = ("signature", bytes | None, msgspec.field(default=None, name="s"))
    unsigned, signed = (
        typing.cast(
            type[Envelope],
            msgspec.defstruct(
                f"{cls.__name__}Envelope",
                [(n, t) if d is msgspec.NODEFAULT else (n, t, d) for n, t, d in fields + extra],
                bases=(Envelope,),
                namespace=_checking(body.check),
                kw_only=True,
                forbid_unknown_fields=True,
                tag_field="t",
                tag=cls.type_name,
                frozen=True,
                gc=False,
            ),
        )
        for extra in ([optional_signature], signed_fields)
    )
    return _Plan(unsigned, signed)


def _checking(check: Callable[[Message], Message] | None) -> dict[str, Any]:
    """The namespace of an envelope type whose message msgspec decodes, then ``check`` checks
    (msgspec runs ``__post_init__`` on what it decodes)."""
    if check is None:
        return {}

    def __post_init__(self: Envelope) -> None:
        check(self.message)

    return {"__post_init__": __post_init__}


class _Header(msgspec.Struct, gc=False):
    """What ``decode`` reads of an envelope whose class it has no plan for yet."""

    t: str


_encode_envelope = msgspec.msgpack.Encoder().encode
_time_ns = time.time_ns
_decode_header = msgspec.msgpack.Decoder(_Header).decode


def _decoder_of(envelopes: list[type[Envelope]]) -> Callable[[bytes], Envelope]:
    """One msgspec decoder of all ``envelopes``, told apart by their "t"."""
    return msgspec.msgpack.Decoder(functools.reduce(operator.or_, envelopes)).decode


def _no_plans(data: bytes) -> Envelope:
    """A codec's decoder before it has any plan."""
    raise msgspec.ValidationError("no message class planned yet")


def _fail(path: str, problem: str) -> InvalidMessage:
    return InvalidMessage(problem, path=path)


def _channel_bytes(channel: str | bytes) -> bytes:
    return channel.encode() if isinstance(channel, str) else channel


class Codec:
    """Encodes messages to envelopes and decodes (and validates) them back.

    ``keys``: HMAC keys. The first signs; any of them verifies, so keys can be
    rotated. With keys set, an unsigned or badly signed message is rejected.
    ``replay_window``: seconds the guards of :meth:`replay_guard` accept a signed
    timestamp for (``codec.replay_window``). ``clock``: the time (unix seconds) that
    envelopes are stamped with and guards judge them by; None: the machine's.
    """

    def __init__(
        self,
        *,
        keys: Sequence[bytes] = (),
        max_size: int = DEFAULT_MAX_SIZE,
        max_depth: int = DEFAULT_MAX_DEPTH,
        replay_window: float = DEFAULT_REPLAY_WINDOW,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.signer = Signer(keys)
        self._planning = threading.Lock()
        self.max_size = max_size
        self.max_depth = max_depth
        self.replay_window = replay_window
        self.clock = clock

    @property
    def max_depth(self) -> int:
        """How deep a message may nest (the envelope is level 1, its body level 2)."""
        return self._max_depth

    @max_depth.setter
    def max_depth(self, max_depth: int) -> None:
        self._max_depth = max_depth
        # The plans of classes holding Any values depend on the limit.
        self._forget_plans()

    def _forget_plans(self) -> None:
        with self._planning:
            self._plans: dict[str, _Plan | None] = {}
            """By type name, each class's plan, made on its first message (None: it has none)."""
            self._decode_unsigned: Callable[[bytes], Envelope] = _no_plans
            self._decode_signed: Callable[[bytes], Envelope] = _no_plans
            self._replaced = _REGISTRY.replaced

    @property
    def keys(self) -> tuple[bytes, ...]:
        return self.signer.keys

    @keys.setter
    def keys(self, keys: Sequence[bytes]) -> None:
        self.signer.keys = keys

    @property
    def signing(self) -> bool:
        return self.signer.signing

    def replay_guard(self, *, remember: bool = True) -> ReplayGuard:
        """A guard for one receiver's :meth:`decode` calls, over this codec's window."""
        return ReplayGuard(self.replay_window, remember=remember, clock=self.clock)

    def encode(
        self,
        message: Message,
        *,
        id: bytes | None = None,
        correlation: bytes | None = None,
        reply_to: str | None = None,
        deadline: int = 0,
        channel: str | bytes | None = None,
    ) -> bytes:
        """The envelope of ``message``, signed (for ``channel``, when given) if there are keys.

        ``deadline`` (unix ms, 0: none): a request's, inside the signature.
        """
        clock = self.clock
        envelope = _Outgoing(
            message.type_name,
            message.wire_version,
            id or next(_ids).to_bytes(16, "big"),
            correlation,
            reply_to,
            _time_ns() // 1_000_000 if clock is None else int(clock() * 1000),
            message,
            deadline,
        )
        try:
            data = _encode_envelope(envelope)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # not validated
            raise _fail("", f"cannot encode {message.type_name}: {exc}") from None
        signer = self.signer
        if signer.signing:
            if channel is None:
                signature = signer.sign(data)
            else:
                signature = signer.sign(_channel_bytes(channel), data)
            data = b"".join((_BYTE[data[0] + 1], data[1:], _SIGNATURE_ENTRY, signature))
        if len(data) > self.max_size:
            raise _fail("", f"message is {len(data)} bytes, over the {self.max_size}-byte limit")
        return data

    def decode(
        self,
        data: bytes | bytearray | memoryview,
        *,
        channel: str | bytes | None = None,
        guard: ReplayGuard | None = None,
    ) -> Envelope:
        """The checked envelope of ``data`` (see the module docstring).

        With keys, the signature must be that for ``channel`` (the channel or stream the
        message was read from; None: one signed for no channel), and ``guard`` (when
        given) must take the message's timestamp and id, a request's deadline extending
        its window.
        """
        if type(data) is not bytes:
            if not isinstance(data, bytearray | memoryview):
                raise _fail("", f"expected bytes, got {type(data).__name__}")
            data = bytes(data)
        if len(data) > self.max_size:
            raise _fail("", f"message is {len(data)} bytes, over the {self.max_size}-byte limit")
        # The fast path: msgspec decodes and checks the whole envelope, by the message's class.
        signing = self.signer.signing
        try:
            envelope = (self._decode_signed if signing else self._decode_unsigned)(data)
        except REFUSED:
            if self._plan(data):
                return self.decode(data, channel=channel, guard=guard)
            return self._decode_checked(data, channel, guard)
        if _REGISTRY.replaced != self._replaced:  # a class planned may be outdated
            self._forget_plans()
            return self.decode(data, channel=channel, guard=guard)
        if signing:
            if not self._signed_as_encoded(data, envelope.deadline, channel):
                return self._decode_checked(data, channel, guard)
            if guard is not None:
                guard.check(envelope.id, envelope.ts, valid_until=envelope.deadline)
        return envelope

    def _signed_as_encoded(self, data: bytes, deadline: int, channel: str | bytes | None) -> bool:
        """Whether a signed envelope is laid out as encode() writes it, no key twice (its map
        header counts the keys it has, "d" only with a deadline), "s" last, and signed right
        for ``channel``: the bytes before "s", under a header one smaller."""
        if data[0] != _FIXMAP | (_SIGNED_KEYS + (deadline != 0)):
            return False
        if data[-_SIGNATURE_TAIL:-32] != _SIGNATURE_ENTRY:
            return False
        unsigned = _BYTE[data[0] - 1] + data[1:-_SIGNATURE_TAIL]
        if channel is None:
            return self.signer.verify(data[-32:], unsigned)
        return self.signer.verify(data[-32:], _channel_bytes(channel), unsigned)

    def _plan(self, data: bytes) -> bool:
        """Plan for the class ``data`` names, on its first message; whether there is a new plan.

        The codec decodes every planned class with one msgspec decoder, which tells the
        envelope types apart by their "t".
        """
        try:
            type_name = _decode_header(data).t
        except REFUSED:
            return False
        cls = _lookup(type_name)
        if cls is None:
            return False
        with self._planning:
            if type_name in self._plans:
                return False
            plan = self._plans[type_name] = _plan_of(cls, self.max_depth)
            if plan is None:
                return False
            plans = [p for p in self._plans.values() if p is not None]
            self._decode_unsigned = _decoder_of([p.unsigned for p in plans])
            self._decode_signed = _decoder_of([p.signed for p in plans])
        return True

    def _decode_checked(
        self, data: bytes, channel: str | bytes | None, guard: ReplayGuard | None
    ) -> Envelope:
        """``decode`` by msgpack and each message's own checks, which say what is wrong."""
        try:
            raw = _unpackb(data, raw=False, strict_map_key=True, timestamp=0)
        except Exception as exc:  # msgpack raises a handful of unrelated types
            raise _fail("", f"not a msgpack message ({type(exc).__name__}: {exc})") from None
        if type(raw) is not dict:
            raise _fail("", f"expected an envelope map, got {type(raw).__name__}")
        if not _ENVELOPE_KEYS.issuperset(raw):
            unknown = sorted(str(k) for k in raw if k not in _ENVELOPE_KEYS)
            raise _fail(unknown[0], "unknown envelope key")
        signing = self.signer.signing
        if signing:
            self._verify(raw, data, None if channel is None else _channel_bytes(channel))
        get = raw.get
        type_name, version, msg_id, body = get("t"), get("v"), get("id"), get("b")
        correlation, reply_to, ts, deadline = get("c"), get("r"), get("ts", 0), get("d", 0)
        if type(type_name) is not str:
            raise _fail("t", f"expected str, got {type(type_name).__name__}")
        cls = _lookup(type_name)
        if cls is None:
            raise _fail("t", f"unknown message type {type_name!r:.80}")
        if type(version) is not int or version < 1:
            raise _fail("v", f"expected a version >= 1, got {version!r:.40}")
        if version > cls.wire_version:
            raise _fail(
                "v", f"{type_name} version {version} is newer than this reader's {cls.wire_version}"
            )
        if type(msg_id) is not bytes or len(msg_id) != 16:
            raise _fail("id", "expected 16 bytes")
        if correlation is not None and type(correlation) is not bytes:
            raise _fail("c", f"expected bytes or nil, got {type(correlation).__name__}")
        if reply_to is not None and type(reply_to) is not str:
            raise _fail("r", f"expected str or nil, got {type(reply_to).__name__}")
        if type(ts) is not int:
            raise _fail("ts", f"expected int, got {type(ts).__name__}")
        if type(deadline) is not int:
            raise _fail("d", f"expected int, got {type(deadline).__name__}")
        if guard is not None and signing:
            guard.check(msg_id, ts, valid_until=deadline)
        try:
            if type(body) is not dict:
                raise _fail("b", f"expected map, got {type(body).__name__}")
            if cls.open_values:
                # Typed fields bound the depth themselves; only ``Any`` values can nest freely.
                self._check_depth(body)
            if version < cls.wire_version:
                body = cls.upgrade(body, version)
            message = cls._from_wire(body, "b")
        except InvalidMessage as exc:
            # A sound (and, with keys, verified) envelope around a bad message: whoever
            # answers requests can tell the sender why.
            exc.request_id, exc.reply_to = msg_id, reply_to  # type: ignore[attr-defined]
            raise
        return Envelope(message, msg_id, correlation, reply_to, ts, version, deadline)

    def _check_depth(self, body: dict[str, Any]) -> None:
        limit = self.max_depth
        level: list[Any] = [body]
        depth = 2  # the envelope is level 1
        while level:
            if depth > limit:
                raise _fail("b", f"nesting deeper than {limit} levels")
            below: list[Any] = []
            extend = below.extend
            for item in level:
                if type(item) is dict:
                    extend(item.values())
                elif type(item) is list:
                    extend(item)
            level = below
            depth += 1

    def _verify(self, raw: dict[str, Any], data: bytes, channel: bytes | None) -> None:
        signature = raw.pop("s", None)
        if signature is None:
            raise _fail("s", "signature missing (this receiver requires signed messages)")
        if type(signature) is not bytes:
            raise _fail("s", "expected bytes")
        bound = () if channel is None else (channel,)
        if data[0] == _FIXMAP | (len(raw) + 1) and data[-_SIGNATURE_TAIL:-32] == _SIGNATURE_ENTRY:
            # As encode() writes it: the signed bytes are the message without its tail,
            # under the header of a map one entry shorter.
            unsigned = _BYTE[data[0] - 1] + data[1:-_SIGNATURE_TAIL]
            if self.signer.verify(signature, *bound, unsigned):
                return
        # Any other layout (another encoder): the map without "s", packed again (msgpack
        # packs back whatever it unpacked, however deep).
        unsigned = _packb(raw, use_bin_type=True)
        if not self.signer.verify(signature, *bound, unsigned):
            raise _fail("s", "signature does not match")
