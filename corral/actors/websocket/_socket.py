"""One WebSocket on an asyncio transport (RFC 6455, server side), taken over from aiohttp.

aiohttp serves the HTTP request; :func:`take_over` answers the upgrade itself and takes the
transport from aiohttp, which forgets the connection then. From there a socket costs one
:class:`WebSocket`: client frames are parsed here, and what the server sends is written
to the transport as it comes (framed by the caller, so that one frame can go to a whole
room). No permessage-deflate: a compression context costs each socket hundreds of KB::

    class Echo(WebSocket):
        __slots__ = ()

        def on_message(self) -> None:
            while (message := self.pop()) is not None:
                self.write(text_frame(message) if isinstance(message, str) else b"")

    async def handle(request: web.Request) -> web.StreamResponse:
        take_over(request, Echo(max_message_size=65536, close_timeout=1.0))
        return web.Response()  # aiohttp has no transport to write it to any more
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
from typing import cast

from aiohttp import web

__all__ = [
    "CLOSE_INVALID_DATA", "CLOSE_PROTOCOL_ERROR", "CLOSE_TOO_BIG", "WebSocket", "take_over",
    "text_frame",
]  # fmt: skip

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009

_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_OPEN, _CLOSING, _CLOSED = 0, 1, 2
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_INBOX_LIMIT = 64
"""Messages received and not yet taken before the socket stops reading from the client."""
_VALID_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011))

WRITE_HIGH_WATER = 64 * 1024
"""Bytes a socket's transport may hold unsent before :attr:`WebSocket.writing_paused`."""


def text_frame(text: str) -> bytes:
    """``text`` as one unmasked, uncompressed WebSocket text frame (RFC 6455 5.2)."""
    return _frame(0x81, text.encode())


def _frame(first: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        header = bytes((first, size))
    elif size < 65536:
        header = bytes((first, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, 127)) + size.to_bytes(8, "big")
    return header + payload


def _unmask(mask: bytes, payload: bytes) -> bytes:
    size = len(payload)
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(size, "little")


def _accept_key(request: web.Request) -> bytes:
    """The ``Sec-WebSocket-Accept`` of an upgrade request; an HTTP error when it is not one."""
    headers = request.headers
    if request.method != "GET":
        raise web.HTTPMethodNotAllowed(request.method, ["GET"])
    if headers.get("Upgrade", "").lower() != "websocket":
        raise web.HTTPBadRequest(text="not a WebSocket upgrade")
    if "upgrade" not in headers.get("Connection", "").lower():
        raise web.HTTPBadRequest(text="no Connection: upgrade header")
    if headers.get("Sec-WebSocket-Version") not in ("13", "8", "7"):
        raise web.HTTPBadRequest(text="unsupported WebSocket version")
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        valid = False
    if not valid:
        raise web.HTTPBadRequest(text="bad Sec-WebSocket-Key")
    return base64.b64encode(hashlib.sha1(key.encode() + _ACCEPT_GUID).digest())


def take_over(request: web.Request, socket: WebSocket) -> bool:
    """Answer ``request``'s upgrade and hand its transport to ``socket``.

    Raises the HTTP error aiohttp answers for a request that is no WebSocket upgrade;
    False when the client has gone already. aiohttp forgets the connection as if it had
    been lost (its transport taken away first, so that it closes nothing): the handler's
    response is then written nowhere, and aiohttp's request, handler task and parser go.
    """
    accept = _accept_key(request)
    transport = request.transport
    if transport is None or transport.is_closing():
        return False
    transport.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    aiohttp_protocol = request.protocol
    aiohttp_protocol.transport = None
    aiohttp_protocol.connection_lost(None)
    transport.set_protocol(socket)
    socket.connection_made(transport)
    return True


class WebSocket(asyncio.Protocol):
    """The server side of one WebSocket: subclasses take the messages (:meth:`pop`) when
    told by :meth:`on_message`, and write frames with :meth:`write` unless
    :attr:`writing_paused` (:meth:`on_writable` says when that ends).

    Frames the protocol forbids close the socket (1002; 1007 for text that is not UTF-8,
    1009 for a message over ``max_message_size``). :meth:`close` sends a close frame, and
    cuts the connection if the client has not closed it ``close_timeout`` seconds later.
    """

    __slots__ = (
        "_buffer",
        "_close_timeout",
        "_cut",
        "_fragment_opcode",
        "_fragments",
        "_inbox",
        "_max_message_size",
        "_reading_paused",
        "_skip",
        "_state",
        "transport",
        "writing_paused",
    )

    def __init__(self, *, max_message_size: int, close_timeout: float) -> None:
        self._max_message_size = max_message_size
        self._close_timeout = close_timeout
        self.transport: asyncio.Transport | None = None
        self.writing_paused = False
        self._state = _OPEN
        self._buffer: bytes = b""
        self._skip = 0
        self._fragments: bytearray | None = None
        self._fragment_opcode = _TEXT
        self._inbox: collections.deque[str | bytes] | None = None
        self._reading_paused = False
        self._cut: asyncio.TimerHandle | None = None

    # -- for subclasses -------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """Neither side has begun to close, and the transport takes what is written."""
        return self._writable() is not None

    def _writable(self) -> asyncio.Transport | None:
        transport = self.transport
        if self._state != _OPEN or transport is None or transport.is_closing():
            return None
        return transport

    def on_message(self) -> None:
        """A message was received: :meth:`pop` takes it."""

    def on_writable(self) -> None:
        """The transport has sent enough of what it held: :meth:`write` again."""

    def on_lost(self) -> None:
        """The connection has gone (closed by either side, or cut)."""

    def pop(self) -> str | bytes | None:
        """The next message received (text as str), or None when none waits."""
        inbox = self._inbox
        if not inbox:
            return None
        message = inbox.popleft()
        if not inbox:
            self._inbox = None
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
        return message

    def write(self, frame: bytes) -> None:
        """Send ``frame`` (framed already) while the socket is open."""
        transport = self._writable()
        if transport is not None:
            transport.write(frame)

    def close(self, code: int, reason: str, *, wait: bool = True) -> None:
        """Send a close frame (once); the client's closes the connection, or with
        ``wait=False`` the connection closes as soon as the frame is out."""
        self._send_close(code.to_bytes(2, "big") + reason.encode()[:123])
        if not wait and self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _CLOSED
        self.transport = None
        self._inbox = self._fragments = None
        self._buffer = b""
        if self._cut is not None:
            self._cut.cancel()
            self._cut = None
        self.on_lost()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._state == _OPEN:
            self.on_writable()

    def data_received(self, data: bytes) -> None:
        if self._buffer:
            data = self._buffer + data
        size, pos = len(data), 0
        while self._state != _CLOSED:
            if self._skip:
                skipped = min(self._skip, size - pos)
                self._skip -= skipped
                pos += skipped
            if size - pos < 2:
                break
            first, second = data[pos], data[pos + 1]
            opcode, length = first & 0x0F, second & 0x7F
            head = 6 if second & 0x80 else 2
            if length == 126:
                head += 2
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            elif length == 127:
                head += 8
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            if size - pos < head:
                break
            refusal = self._refusal(first, second, length)
            if refusal is not None or (self._state != _OPEN and opcode != _CLOSE):
                if refusal is not None:
                    self.close(*refusal)
                self._skip, pos = length, pos + head  # closing: only a close frame matters
                continue
            end = pos + head + length
            if end > size:
                break
            payload = _unmask(data[pos + head - 4 : pos + head], data[pos + head : end])
            pos = end
            self._frame(first & 0x80, opcode, payload)
        self._buffer = data[pos:] if pos < size and self._state != _CLOSED else b""
        if self._inbox is not None:
            if len(self._inbox) >= _INBOX_LIMIT and self.transport is not None:
                self._reading_paused = True
                self.transport.pause_reading()
            self.on_message()

    # -- frames in ------------------------------------------------------------------------

    def _refusal(self, first: int, second: int, length: int) -> tuple[int, str] | None:
        """Why a frame with this header closes the socket; None when it may be read."""
        opcode = first & 0x0F
        if first & 0x70 or not second & 0x80:
            return CLOSE_PROTOCOL_ERROR, "reserved bits set, or an unmasked frame"
        if opcode >= _CLOSE:
            if opcode > _PONG or not first & 0x80 or length > 125:
                return CLOSE_PROTOCOL_ERROR, "bad control frame"
            return None
        if opcode > _BINARY or (opcode == _CONTINUATION) != (self._fragments is not None):
            return CLOSE_PROTOCOL_ERROR, "unexpected frame"
        if length + len(self._fragments or b"") > self._max_message_size:
            return CLOSE_TOO_BIG, f"message over {self._max_message_size} bytes"
        return None

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode == _CLOSE:
            self._closed_by_client(payload)
        elif opcode == _PING:
            self.write(_frame(0x8A, payload))
        elif opcode == _PONG:
            pass
        elif opcode != _CONTINUATION and fin:
            self._received(opcode, payload)
        elif opcode != _CONTINUATION:
            self._fragments, self._fragment_opcode = bytearray(payload), opcode
        else:
            assert self._fragments is not None
            self._fragments += payload
            if fin:
                message, self._fragments = bytes(self._fragments), None
                self._received(self._fragment_opcode, message)

    def _received(self, opcode: int, payload: bytes) -> None:
        message: str | bytes = payload
        if opcode == _TEXT:
            try:
                message = payload.decode()
            except UnicodeDecodeError:
                self.close(CLOSE_INVALID_DATA, "text that is not UTF-8")
                return
        if self._inbox is None:
            self._inbox = collections.deque()
        self._inbox.append(message)

    def _closed_by_client(self, payload: bytes) -> None:
        if self._state == _OPEN:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 0
            if len(payload) == 1 or (code and not _valid_close_code(code)):
                self.close(CLOSE_PROTOCOL_ERROR, "bad close frame")
            else:
                self._send_close(payload[:2])  # the client's code echoed back
        if self.transport is not None:
            self.transport.close()

    def _send_close(self, payload: bytes) -> None:
        transport = self._writable()
        if transport is None:
            return
        self._state = _CLOSING
        self._inbox = self._fragments = None
        transport.write(_frame(0x88, payload))
        self._cut = asyncio.get_running_loop().call_later(self._close_timeout, transport.abort)


def _valid_close_code(code: int) -> bool:
    return code in _VALID_CLOSE_CODES or 3000 <= code < 5000
