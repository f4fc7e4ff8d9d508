"""HMAC-SHA256 on the rooms' and nodes' Redis channels, so a client without the key injects nothing.

With the codec's keys configured (``codec.signing_keys``), every payload on
``<ns>:ws.room.<room>`` and ``<ns>:ws.node.<node>`` is ``MAC (32 bytes) + kind (1 byte)
+ ts (8 bytes: unix ms, big-endian) + id (16 bytes) + body``, the MAC that of a
:class:`~corral.messages.signing.Signer` over the channel and ``kind + ts + id + signed
part``, so a payload signed for one room or node is refused on any other:

- kind ``f`` (a full frame: presence events, orders to a node): the signed part is the body;
- kind ``m`` (a room message): the manager signs the frame head (room, event, data) before
  the emit script runs; the script appends ``<offset>,"epoch":"<epoch>"}``, which no one
  holding the key sees, so the receiver checks that tail's exact shape instead of a MAC.

A payload read from a channel must also be fresh: its ``ts`` within the replay window
of this node's clock, and its ``id`` not taken before within it. One read back from a
room's history may be old, but an id read twice in one history is a replay. The first
key signs; any key verifies (key rotation, as the codec does). Without keys payloads are
the bare body, as before::

    signer = ChannelSigner([b"secret"])
    payload = signer.seal("corral:ws.node.ab12cd34", '{"op":"disconnect",...}')
    signer.open("corral:ws.node.ab12cd34", payload)      # the body, or None if forged
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence

from corral._junk import REJECTED
from corral.errors import InvalidMessage
from corral.messages.codec import new_id
from corral.messages.signing import DEFAULT_REPLAY_WINDOW, ReplayGuard, Signer

__all__ = ["FULL", "MESSAGE", "ChannelSigner"]

log = logging.getLogger("corral.websocket")

FULL = b"f"
MESSAGE = b"m"
_MAC_SIZE = 32
_STAMP_SIZE = 8 + 16  # ts, id
_HEAD_SIZE = _MAC_SIZE + 1 + _STAMP_SIZE
_OFFSET = b',"offset":'
_TAIL = re.compile(rb'[0-9]{1,19},"epoch":"[0-9a-f]{1,32}"\}')


class ChannelSigner:
    """Signs what this node publishes and checks what it receives; calls ``on_refused``
    for each payload it refuses.

    ``replay_window``: seconds a payload read from a channel stays acceptable.
    """

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        replay_window: float = DEFAULT_REPLAY_WINDOW,
        on_refused: Callable[[], None] = lambda: None,
    ) -> None:
        self.signer = Signer(keys)
        self.replays = ReplayGuard(replay_window)
        self.on_refused = on_refused

    @property
    def signing(self) -> bool:
        return self.signer.signing

    def _prefix(self, channel: str, kind: bytes, signed: bytes) -> bytes:
        stamp = int(time.time() * 1000).to_bytes(8, "big") + new_id()
        return self.signer.sign(channel.encode(), kind + stamp + signed) + kind + stamp

    def seal(self, channel: str, body: str) -> bytes:
        """A whole payload for ``channel``: signed when there are keys, else the bare body."""
        data = body.encode()
        if not self.signing:
            return data
        return self._prefix(channel, FULL, data) + data

    def message_prefix(self, channel: str, head: str) -> bytes:
        """What goes before a room message whose ``head`` the emit script completes."""
        if not self.signing:
            return b""
        return self._prefix(channel, MESSAGE, head.encode())

    def open(self, channel: str, payload: bytes, *, seen: set[bytes] | None = None) -> str | None:
        """The body of a genuine payload; None (counted, logged now and then) otherwise.

        ``seen``: the ids read so far from a room's history, when reading one (its
        payloads may be old); without it the payload was read from a channel just now.
        """
        body, why = self._check(channel, payload, seen)
        if why is None:
            try:
                return body.decode()
            except UnicodeDecodeError:
                why = "not UTF-8"
        self._refuse(channel, why)
        return None

    def _check(
        self, channel: str, payload: bytes, seen: set[bytes] | None
    ) -> tuple[bytes, str | None]:
        """The body, and why it must be dropped (None: it must not)."""
        if not self.signing:
            return payload, None
        mac, kind = payload[:_MAC_SIZE], payload[_MAC_SIZE : _MAC_SIZE + 1]
        stamp, body = payload[_MAC_SIZE + 1 : _HEAD_SIZE], payload[_HEAD_SIZE:]
        signed = body
        if kind == MESSAGE:
            cut = body.rfind(_OFFSET) + len(_OFFSET)
            if cut < len(_OFFSET) or not _TAIL.fullmatch(body, cut):
                return body, "a message frame without its offset and epoch"
            signed = body[:cut]
        elif kind != FULL:
            return body, "unsigned"
        if not self.signer.verify(mac, channel.encode(), kind + stamp + signed):
            return body, "a bad signature"
        message_id = stamp[8:]
        if seen is not None:
            if message_id in seen:
                return body, "replayed (an id read twice in one history)"
            seen.add(message_id)
            return body, None
        try:
            self.replays.check(message_id, int.from_bytes(stamp[:8], "big"))
        except InvalidMessage as exc:
            return body, f"replayed ({exc.message})"
        return body, None

    def _refuse(self, channel: str, why: str) -> None:
        self.on_refused()
        REJECTED.reject("websocket", _kind_of(why), f"payload on {channel}: {why}", log)


def _kind_of(why: str) -> str:
    """The counted kind of a refused payload, from the reason given for it."""
    for start, kind in (
        ("not UTF-8", "not_utf8"),
        ("unsigned", "unsigned"),
        ("a bad signature", "bad_signature"),
        ("replayed", "replayed"),
    ):
        if why.startswith(start):
            return kind
    return "bad_frame"
