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

msgspec writes the envelopes, and reads the ones laid out as corral writes them: for
each message class, one msgspec call decodes and checks a whole envelope, its body as a
struct typed from the class's fields (:mod:`corral.messages._typed`), and straight-line
code makes the message of it. What it refuses, and any other layout, goes to the
reference path: ``msgpack.unpackb`` and the class's own checks, which take any layout
and name what is wrong. Both paths accept the same input and build the same messages
(``tests/test_codec_fuzz.py`` holds them to it).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, NamedTuple

import msgpack
import msgspec

from corral.errors import InvalidMessage
from corral.messages._typed import REFUSED, body_type
from corral.messages.base import _REGISTRY, Message, lookup
from corral.messages.signing import DEFAULT_REPLAY_WINDOW, ReplayGuard, Signer

_packb = msgpack.packb
_unpackb = msgpack.unpackb
_new_envelope = tuple.__new__
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


class _Ids:
    """Unique 16-byte ids: 8 random bytes per process, then a counter (cheaper than urandom)."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.counter = itertools.count(int.from_bytes(os.urandom(8), "big") << 64)

    def next(self) -> bytes:
        return next(self.counter).to_bytes(16, "big")


new_id = _Ids().next


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


class _Incoming(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, gc=False):
    """An envelope as ``decode`` takes it on its fast path, its body left undecoded.

    Each message class gets a subclass of its own whose body is that class's struct
    (see :class:`_Plan`), so that one msgspec call decodes a whole message.
    """

    t: str
    v: int
    id: Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
    c: bytes | None = None
    r: str | None = None
    ts: int = 0
    d: int = 0
    b: msgspec.Raw
    s: bytes | None = None


class _Signed(_Incoming, kw_only=True, forbid_unknown_fields=True, gc=False):
    """A signed envelope as ``encode`` writes it: every key but "d" present, so that its map
    header tells whether a key came twice (see ``decode``)."""

    c: bytes | None
    r: str | None
    ts: int
    s: bytes


_SIGNED_KEYS = len(msgspec.structs.fields(_Signed)) - 1
"""How many keys a signed envelope without "d" has."""


class _Plan(NamedTuple):
    """How ``decode`` takes the messages of one class in one pass."""

    type_name: str
    version: int
    cls: type[Message]
    decode: Callable[[bytes], Any]
    """Decodes a whole envelope of this type and version, its body as the class's struct."""
    decode_signed: Callable[[bytes], Any]
    """The same for a signed envelope."""
    convert: Callable[[Any], Message]

    def key(self) -> bytes | None:
        """How the envelopes ``encode`` writes for this class begin, after their map header:
        ``"t"`` and the type name as msgpack fixstrs; None for a name too long for one."""
        name = self.type_name.encode()
        return _T_FIRST + _BYTE[0xA0 | len(name)] + name if len(name) < 32 else None


def _plan_of(cls: type[Message], max_depth: int) -> _Plan | None:
    """The plan for ``cls`` under a codec's nesting limit, made once."""
    key = (cls, max_depth if cls.open_values else None)
    if key not in _PLANS:
        _PLANS[key] = _make_plan(cls, max_depth)
    return _PLANS[key]


_PLANS: dict[tuple[type[Message], int | None], _Plan | None] = {}


def _make_plan(cls: type[Message], max_depth: int) -> _Plan | None:
    body = body_type(cls, max_depth)
    if body is None:
        return None
    fields = [("t", Literal[cls.type_name]), ("v", Literal[cls.wire_version]), ("b", body.struct)]
    name = f"{body.struct.__name__}Envelope"
    unsigned, signed = (
        msgspec.msgpack.Decoder(msgspec.defstruct(name, fields, bases=(base,))).decode
        for base in (_Incoming, _Signed)
    )
    return _Plan(cls.type_name, cls.wire_version, cls, unsigned, signed, body.convert)


_encode_envelope = msgspec.msgpack.Encoder().encode
_decode_envelope = msgspec.msgpack.Decoder(_Incoming).decode
_T_FIRST = b"\xa1t"
"""The first key of the envelopes ``encode`` writes."""


class Envelope(NamedTuple):
    """A decoded message with its envelope: id, correlation id, reply topic, timestamp,
    and a request's deadline (unix ms; 0: none)."""

    message: Message
    id: bytes
    correlation: bytes | None = None
    reply_to: str | None = None
    ts: int = 0
    version: int = 1
    deadline: int = 0


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
        # By what follows "t" in an envelope (see _Plan.key): the plans of classes
        # holding Any values depend on the limit.
        self._plans: dict[bytes, _Plan] = {}

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
            id or new_id(),
            correlation,
            reply_to,
            time.time_ns() // 1_000_000 if clock is None else int(clock() * 1000),
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
            data = _BYTE[data[0] + 1] + data[1:] + _SIGNATURE_ENTRY + signature
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
        # The fast path: msgspec decodes the layout encode() writes, by the message's class.
        plan = self._plans.get(data[1 : data[3] - 0x9C]) if len(data) > 3 else None
        if plan is None:
            plan = self._plan(data)
        if plan is not None:
            type_name, version, cls, decode, decode_signed, convert = plan
            signing = self.signer.signing
            try:
                if signing:
                    incoming: _Incoming = decode_signed(data)
                    if not self._signed_as_encoded(data, incoming.d, channel):
                        return self._decode_checked(data, channel, guard)
                else:
                    incoming = decode(data)
                message = convert(incoming.b)
            except REFUSED:
                pass
            else:
                if _REGISTRY.get(type_name) is cls:
                    if guard is not None and signing:
                        guard.check(incoming.id, incoming.ts, valid_until=incoming.d)
                    return _new_envelope(
                        Envelope,
                        (
                            message,
                            incoming.id,
                            incoming.c,
                            incoming.r,
                            incoming.ts,
                            version,
                            incoming.d,
                        ),
                    )
        # Anything else, and anything refused: msgpack and the message's own checks.
        return self._decode_checked(data, channel, guard)

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

    def _plan(self, data: bytes) -> _Plan | None:
        """The plan for the class ``data`` names, made on its first message."""
        try:
            type_name = _decode_envelope(data).t
        except REFUSED:
            return None
        cls = _lookup(type_name)
        if cls is None:
            return None
        plan = _plan_of(cls, self.max_depth)
        if plan is not None and (key := plan.key()) is not None:
            self._plans[key] = plan
        return plan

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
        return _new_envelope(
            Envelope, (message, msg_id, correlation, reply_to, ts, version, deadline)
        )

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
