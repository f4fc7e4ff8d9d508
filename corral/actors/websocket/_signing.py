"""HMAC-SHA256 on the rooms' and nodes' Redis channels, so a client without the key injects nothing.

With the codec's keys configured (``codec.signing_keys``), every payload on
``<ns>:ws.room.<room>`` and ``<ns>:ws.node.<node>`` is ``MAC (32 bytes) + kind (1 byte)
+ body``, the MAC taken over ``channel + NUL + kind + signed part``, so a payload
signed for one room or node is refused on any other:

- kind ``f`` (a full frame: presence events, orders to a node): the signed part is the body;
- kind ``m`` (a room message): the manager signs the frame head (room, event, data) before
  the emit script runs; the script appends ``<offset>,"epoch":"<epoch>"}``, which no one
  holding the key sees, so the receiver checks that tail's exact shape instead of a MAC.

The first key signs; any key verifies (key rotation, as the codec does). Without keys
payloads are the bare body, as before::

    signer = ChannelSigner([b"secret"])
    payload = signer.seal("corral:ws.node.ab12cd34", '{"op":"disconnect",...}')
    signer.open("corral:ws.node.ab12cd34", payload)      # the body, or None if forged
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Sequence

__all__ = ["FULL", "MESSAGE", "ChannelSigner"]

log = logging.getLogger("corral.websocket")

FULL = b"f"
MESSAGE = b"m"
_MAC_SIZE = 32
_OFFSET = b',"offset":'
_TAIL = re.compile(rb'[0-9]{1,19},"epoch":"[0-9a-f]{1,32}"\}')
_LOG_EVERY = 10.0  # seconds between two warnings about refused payloads


class ChannelSigner:
    """Signs what this node publishes and checks what it receives; counts what it refused."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        self._macs = tuple(hmac.new(key, digestmod=hashlib.sha256) for key in keys)
        self.refused = 0
        self._logged_refused = 0
        self._logged_at = 0.0

    @property
    def signing(self) -> bool:
        return bool(self._macs)

    def _mac(self, mac: hmac.HMAC, channel: str, kind: bytes, signed: bytes) -> bytes:
        mac = mac.copy()
        mac.update(channel.encode() + b"\0" + kind + signed)
        return mac.digest()

    def seal(self, channel: str, body: str) -> bytes:
        """A whole payload for ``channel``: signed when there are keys, else the bare body."""
        data = body.encode()
        if not self._macs:
            return data
        return self._mac(self._macs[0], channel, FULL, data) + FULL + data

    def message_prefix(self, channel: str, head: str) -> bytes:
        """What goes before a room message whose ``head`` the emit script completes."""
        if not self._macs:
            return b""
        return self._mac(self._macs[0], channel, MESSAGE, head.encode()) + MESSAGE

    def open(self, channel: str, payload: bytes) -> str | None:
        """The body of a genuine payload; None (counted, logged now and then) otherwise."""
        body, why = self._check(channel, payload)
        if why is None:
            try:
                return body.decode()
            except UnicodeDecodeError:
                why = "not UTF-8"
        self._refuse(channel, why)
        return None

    def _check(self, channel: str, payload: bytes) -> tuple[bytes, str | None]:
        """The body, and why it must be dropped (None: it must not)."""
        if not self._macs:
            return payload, None
        mac, rest = payload[:_MAC_SIZE], payload[_MAC_SIZE:]
        kind, body = rest[:1], rest[1:]
        signed = body
        if kind == MESSAGE:
            cut = body.rfind(_OFFSET) + len(_OFFSET)
            if cut < len(_OFFSET) or not _TAIL.fullmatch(body, cut):
                return body, "a message frame without its offset and epoch"
            signed = body[:cut]
        elif kind != FULL:
            return body, "unsigned"
        for key in self._macs:
            if hmac.compare_digest(self._mac(key, channel, kind, signed), mac):
                return body, None
        return body, "a bad signature"

    def _refuse(self, channel: str, why: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            log.warning(
                "websocket: dropped a payload on %s (%s); %d dropped since the last warning",
                channel,
                why,
                self.refused - self._logged_refused,
            )
            self._logged_at, self._logged_refused = now, self.refused
