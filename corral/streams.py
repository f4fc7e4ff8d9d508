"""Durable subscriptions: every event after an offset, in order, then the live ones.

Events that must not be missed are appended to a capped Redis Stream in corral's
*durable stream* format, by whoever produces them (the state manager does it in
the same Lua script that applies a change):

- the stream key ``K`` holds one entry per event, with the id ``<offset>-0``
  (offsets count 1, 2, 3, ... without holes) and the fields ``topic`` (the
  event's topic), ``type`` and ``v`` (its message wire name and version),
  ``epoch`` (the life of the stream it was written in) and ``body`` (its fields
  as a msgpack map);
- the hash ``K:meta`` holds ``epoch``, a name for this life of the stream: when the
  stream is lost and starts again (offsets restart at 1), the epoch changes.
  Entries left in ``K`` while ``K:meta`` is gone belong to no live epoch: a
  reader never delivers them, and the producer's next write replaces them.

A :class:`DurableSubscription` reads the stream from ``from_offset`` and then
waits on it for new entries (XREAD BLOCK), so history and live events come
through one ordered path: no duplicates, no gap. When events cannot be delivered
(trimmed from the capped stream before being read, or the epoch changed) it
delivers a :class:`~corral.messages.stream.StreamGap` saying which, then goes on
with the first event still there (the Centrifugo model)::

    sub = DurableSubscription(url, stream="corral:{state}:events",
                              pattern="state.changed.User.*", from_offset=1200)
    for delivery in sub:                       # a corral.bus.Subscription: get(),
        if isinstance(delivery.message, StreamGap):   # iteration, async for, callback
            resync()
        else:
            handle(delivery.message)
    resume_at, epoch = sub.offset, sub.epoch   # where to resume next time

Deliveries wait for room in the subscription's queue rather than being dropped.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any, cast

import msgpack

from corral._redis import REDIS_ERRORS, connect, disconnect
from corral.bus import Bus, Delivery, Subscription, _wake, compile_glob
from corral.errors import InvalidMessage
from corral.messages.base import Message, lookup
from corral.messages.state import events_stream_key
from corral.messages.stream import GAP_TOPIC, StreamGap

__all__ = ["DurableSubscription", "meta_key"]

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT = 2.0
_FULL_QUEUE_POLL = 0.01
_RECONNECT_MAX = 2.0
_ORPHAN_POLL = 0.05


def meta_key(stream: str) -> str:
    """The hash that holds a durable stream's ``epoch`` (and its producer's ``offset``)."""
    return stream + ":meta"


class _StreamFeed(Bus):
    """The reader behind one DurableSubscription; a Bus only so that the subscription
    machinery (queue, callback thread, asyncio) serves it unchanged."""

    def publish(self, topic: str, message: Message, *, correlation: bytes | None = None) -> None:
        raise TypeError("a durable subscription is read-only: publish through the system")

    def _attach(self, sub: Subscription) -> None:
        pass

    def _detach(self, sub: Subscription) -> None:
        assert isinstance(sub, DurableSubscription)
        sub._stop()


class DurableSubscription(Subscription):
    """Events of ``stream`` after ``from_offset`` whose topic matches ``pattern``.

    ``epoch``: the epoch ``from_offset`` belongs to, if known; when the stream's
    epoch differs, a StreamGap (``epoch_changed``) comes first and delivery starts
    over from the new epoch's first event. ``offset`` and ``epoch`` are where the
    reader stands (pass them to resume later). Redis outages are waited out, with
    backoff, and ``healthy`` is False meanwhile.
    """

    def __init__(
        self,
        url: str,
        *,
        stream: str,
        pattern: str = "*",
        from_offset: int = 0,
        epoch: str | None = None,
        callback: Callable[[Delivery], None] | None = None,
        queue_size: int = 10_000,
        batch: int = 500,
        block_seconds: float = 1.0,
    ) -> None:
        if from_offset < 0:
            raise ValueError("from_offset must be >= 0")
        if batch < 1 or not block_seconds > 0:
            raise ValueError("batch must be >= 1 and block_seconds > 0")
        self.stream = stream
        self.offset = from_offset
        self.epoch = epoch
        self.healthy = False
        self._matches = compile_glob(pattern).match
        self._batch = batch
        self._block_ms = int(block_seconds * 1000)
        self._stopping = threading.Event()
        self._client = connect(
            url,
            setting="durable subscription url",
            retries=0,
            connect_timeout=_CONNECT_TIMEOUT,
            socket_timeout=block_seconds + 5.0,
        )
        feed = _StreamFeed(queue_size=queue_size)
        super().__init__(feed, pattern, queue_size=queue_size, callback=callback)
        self._reader = threading.Thread(
            target=self._run, name=f"corral-durable:{stream}", daemon=True
        )
        self._reader.start()

    def __repr__(self) -> str:
        return f"<DurableSubscription {self.stream} {self.pattern!r} at {self.offset}>"

    # -- delivery ---------------------------------------------------------------------

    def _stop(self) -> None:
        self._stopping.set()
        disconnect(self._client)  # wakes a blocked XREAD

    # -- the reader thread ------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.05
        synced = False
        while not self._stopping.is_set():
            try:
                if not synced:
                    synced = self._sync()
                    self.healthy = True
                    delay = 0.05
                    if not synced:  # entries of a lost epoch: wait for the next one
                        self._stopping.wait(_ORPHAN_POLL)
                        continue
                # The epoch is checked again whenever the stream stays quiet for a block.
                synced = self._read()
            except Exception as exc:
                synced = self.healthy = False
                if self._stopping.is_set():
                    break  # close() pulled the connection from under a blocked read
                if not isinstance(exc, REDIS_ERRORS):
                    raise
                log.warning("durable subscription %s: Redis unavailable (%s)", self.stream, exc)
                self._stopping.wait(random.uniform(delay / 2, delay))
                delay = min(delay * 2, _RECONNECT_MAX)
        self._client.close()

    def _sync(self) -> bool:
        """Check the stream's epoch and last offset against where the reader stands.

        False while the stream holds entries of a lost epoch (its meta hash is
        gone): those must not be read, since the next epoch reuses their offsets.
        """
        with self._client.pipeline(transaction=True) as pipe:
            pipe.hmget(meta_key(self.stream), ["epoch", "offset"])
            pipe.xlen(self.stream)
            (epoch, last), length = cast("tuple[list[bytes | None], int]", pipe.execute())
        if epoch is None:
            if self.epoch is not None:  # the stream was lost (Redis restarted empty, say)
                self._gap("epoch_changed", self.offset + 1, -1, "", previous=self.epoch)
                self.epoch = None
                self.offset = 0
            return length == 0  # nothing written yet in this life of the stream
        current = epoch.decode()
        if self.epoch is None:
            self.epoch = current
        elif current != self.epoch:
            self._gap("epoch_changed", self.offset + 1, -1, current, previous=self.epoch)
            self.epoch = current
            self.offset = 0
            return True
        last_offset = int(last or 0)
        # Ahead of the stream in its own epoch: those offsets were never written,
        # so the events that get them must not be skipped.
        self.offset = min(self.offset, last_offset)
        return True

    def _read(self) -> bool:
        """Read one batch (waiting up to a block for it).

        False when nothing came, or when an entry of another epoch did: the stream
        was lost and started again under the reader, which must sync first.
        """
        answer = cast(
            "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None",
            self._client.xread(
                {self.stream: f"{self.offset}-0"}, count=self._batch, block=self._block_ms
            ),
        )
        if not answer:
            return False
        batch: list[Delivery] = []
        for entry_id, fields in answer[0][1]:
            epoch = fields.get(b"epoch", b"").decode("utf-8", "replace")
            if self.epoch is None:
                self.epoch = epoch  # read only once no entry of a lost epoch is left
            elif epoch != self.epoch:
                self._deliver(batch)
                return False
            offset = int(entry_id.split(b"-", 1)[0])
            if offset > self.offset + 1:
                self._deliver(batch)
                batch = []
                self._gap("trimmed", self.offset + 1, offset - 1, self.epoch)
            self.offset = offset
            topic = fields[b"topic"].decode("utf-8", "replace")
            if self._matches(topic):
                message = self._decode(fields, offset)
                if message is not None:
                    batch.append(Delivery(topic, message))
        self._deliver(batch)
        return True

    def _deliver(self, deliveries: list[Delivery]) -> None:
        """Queue a batch under one lock, waiting for room (the reader is the only producer)."""
        while deliveries:
            with self._cond:
                while len(self._items) >= self._maxsize and not self._closed:
                    self._cond.wait(_FULL_QUEUE_POLL)
                if self._closed:
                    return
                room = self._maxsize - len(self._items)
                self._items.extend(deliveries[:room])
                self._cond.notify_all()
                waiters, self._async_waiters = self._async_waiters, []
            _wake(waiters)
            deliveries = deliveries[room:]

    def _decode(self, fields: dict[bytes, Any], offset: int) -> Message | None:
        try:
            name = fields[b"type"].decode()
            cls = lookup(name)
            if cls is None:
                raise InvalidMessage(f"unknown message type {name!r}", path="type")
            body = msgpack.unpackb(fields[b"body"], raw=False)
            if type(body) is not dict:
                raise InvalidMessage("expected a map", path="body")
            version = int(fields.get(b"v", b"1"))
            if version < cls.wire_version:
                body = cls.upgrade(body, version)
            # The codec's own per-field check and conversion of a message body.
            return cls._from_wire(body, "body")
        except (InvalidMessage, ValueError, KeyError, msgpack.UnpackException) as exc:
            self._bus._count("rejected")
            log.warning("durable subscription %s: entry %d rejected: %s", self.stream, offset, exc)
            return None

    def _gap(self, reason: str, first: int, last: int, epoch: str, *, previous: str = "") -> None:
        gap = StreamGap(
            stream=self.stream,
            reason="trimmed" if reason == "trimmed" else "epoch_changed",
            first_missing=first,
            last_missing=last,
            epoch=epoch,
            previous_epoch=previous,
        )
        self._deliver([Delivery(GAP_TOPIC, gap)])


def follow_state_changes(
    url: str,
    namespace: str,
    pattern: str,
    *,
    from_offset: int,
    epoch: str | None = None,
    callback: Callable[[Delivery], None] | None = None,
    queue_size: int = 10_000,
) -> DurableSubscription:
    """A durable subscription to the state-change stream of ``namespace``.

    What ``System.subscribe(pattern, from_offset=N)`` and the remote client return.
    """
    return DurableSubscription(
        url,
        stream=events_stream_key(namespace),
        pattern=pattern,
        from_offset=from_offset,
        epoch=epoch,
        callback=callback,
        queue_size=queue_size,
    )
