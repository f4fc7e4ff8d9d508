"""Durable subscriptions: every event after an offset, in order, then the live ones.

Events that must not be missed are appended to a capped Redis Stream in corral's
*durable stream* format, by whoever produces them (the state manager does it in
the same Lua script that applies a change):

- the stream key ``K`` holds one entry per event, with the id ``<offset>-0``
  (offsets count 1, 2, 3, ... without holes) and the fields ``topic`` (the
  event's topic), ``type`` and ``v`` (its message wire name and version),
  ``epoch`` (the life of the stream it was written in) and ``body`` (its fields
  as a msgpack map);
- with signing keys, an entry also has the field ``s``: the HMAC-SHA256 of its
  stream key, offset (decimal), ``epoch``, ``topic``, ``type``, ``v`` and ``body``
  (see :func:`signed_parts`). A reader given the keys skips and counts an entry
  without a valid one, so an entry copied to another offset or stream is refused too;
- the hash ``K:meta`` holds ``epoch``, a name for this life of the stream: when the
  stream is lost and starts again (offsets restart at 1), the epoch changes.
  Entries left in ``K`` while ``K:meta`` is gone belong to no live epoch: a
  reader never delivers them, and the producer's next write replaces them. An
  entry at or past the producer's next offset was not written by it: the producer
  starts a new epoch rather than stop.

A :class:`DurableSubscription` reads the stream from ``from_offset`` and then
waits on it for new entries (XREAD BLOCK), so history and live events come
through one ordered path: no duplicates, no gap. When events cannot be delivered
(trimmed from the capped stream before being read, or the epoch changed) it
delivers a :class:`~corral.messages.stream.StreamGap` saying which, then goes on
with the first event still there (the Centrifugo model). An offset past the
stream's end is a gap too (``offset_out_of_range``, as Kafka's OffsetOutOfRange):
the stream was reset under a reader that gave no epoch, or lost its latest
entries; it never makes the reader skip the events that next take those offsets::

    sub = DurableSubscription(url, stream=events_stream_key("corral", partition=3),
                              pattern="state.changed.User.*", from_offset=1200)
    for delivery in sub:                       # a corral.bus.Subscription: get(),
        if isinstance(delivery.message, StreamGap):   # iteration, async for, callback
            resync()
        else:
            handle(delivery.message)
    resume_at, epoch = sub.offset, sub.epoch   # where to resume next time

Deliveries wait for room in the subscription's queue rather than being dropped.

The state manager spreads the states of a namespace over partitions
(:func:`partition_of`) and writes the changes of each to its own stream
(:func:`events_stream_key`), whose hash tag every key of the partition shares
(:func:`partition_prefix`); it records the number of partitions at
:func:`partitions_key`, which :func:`follow_state_changes` reads.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import msgpack

from corral._backoff import Backoff
from corral._junk import REJECTED, junk_kind
from corral._redis import REDIS_ERRORS, connect, disconnect, topology
from corral.bus import Bus, Delivery, Subscription, compile_glob
from corral.errors import InvalidMessage
from corral.messages.base import Message, lookup
from corral.messages.signing import Signer
from corral.messages.state import DEFAULT_PARTITIONS
from corral.messages.stream import GAP_TOPIC, GapReason, StreamGap

__all__ = [
    "DurableSubscription",
    "events_stream_key",
    "follow_state_changes",
    "meta_key",
    "partition_of",
    "partition_prefix",
    "partitions_key",
    "signed_parts",
]

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT = 2.0
_RECONNECT = Backoff(initial=0.05, cap=2.0)
_ORPHAN_POLL = 0.05


_SIGNED_FIELDS = (b"epoch", b"topic", b"type", b"v", b"body")


def meta_key(stream: str) -> str:
    """The hash that holds a durable stream's ``epoch`` (and its producer's ``offset``)."""
    return stream + ":meta"


def signed_parts(stream: str, offset: int, fields: Mapping[bytes, bytes]) -> tuple[bytes, ...]:
    """What the signature ``s`` of the entry at ``offset`` of ``stream`` covers.

    ::

        signature = signer.sign(*signed_parts("corral:{state:0}:events", 7, fields))
    """
    return (stream.encode(), str(offset).encode(), *(fields.get(f, b"") for f in _SIGNED_FIELDS))


# -- the state changes' streams: one per partition of a namespace's states ------------


def partition_of(state_id: str, partitions: int) -> int:
    """The partition a state lives in: by the hash of its Redis hash tag (the text
    between the first ``{`` and the next ``}``, when not empty), else of its whole id,
    so states that share a tag share a partition (and may change in one commit)."""
    if partitions <= 1:
        return 0
    start = state_id.find("{")
    if start >= 0:
        end = state_id.find("}", start + 1)
        if end > start + 1:
            state_id = state_id[start + 1 : end]
    return zlib.crc32(state_id.encode()) % partitions


def partition_prefix(namespace: str, partition: int) -> str:
    """The start of every Redis key of one partition: one hash tag, so one cluster slot."""
    return f"{namespace}:{{state:{partition}}}:"


def events_stream_key(namespace: str = "corral", partition: int = 0) -> str:
    """The Redis Stream that holds every state change of one partition of a namespace,
    by offset (what a durable subscription to ``state.changed.*`` reads)."""
    return partition_prefix(namespace, partition) + "events"


def partitions_key(namespace: str = "corral") -> str:
    """Where the state manager records how many partitions its namespace has."""
    return f"{namespace}:state:partitions"


class _StreamFeed(Bus):
    """The reader behind one DurableSubscription; a Bus only so that the subscription
    machinery (queue, callback dispatcher, asyncio) serves it unchanged."""

    def __init__(self, *, queue_size: int) -> None:
        super().__init__(queue_size=queue_size, callback_threads=1)

    def publish(self, topic: str, message: Message, *, correlation: bytes | None = None) -> None:
        raise TypeError("a durable subscription is read-only: publish through the system")

    def reject(self) -> None:
        """Count an entry skipped (undecodable, or not signed with one of the keys)."""
        self._count("rejected")

    def _attach(self, sub: Subscription) -> None:
        pass

    def _detach(self, sub: Subscription) -> None:
        assert isinstance(sub, DurableSubscription)
        sub._stop()


class _Cursor:
    """Where a reader stands in one stream: the last offset delivered, in ``epoch``, and
    the last offset of a forged entry skipped after it (read past, delivered never)."""

    __slots__ = ("epoch", "forged", "offset")

    def __init__(self, offset: int, epoch: str | None) -> None:
        self.offset = offset
        self.epoch = epoch
        self.forged = 0

    @property
    def read_from(self) -> int:
        return max(self.offset, self.forged)

    def restart(self, offset: int) -> None:
        """Stand at ``offset`` of a stream that changed under the reader."""
        self.offset = offset
        self.forged = 0


class DurableSubscription(Subscription):
    """Events of ``stream`` (or of every one of ``streams``) after ``from_offset`` whose
    topic matches ``pattern``.

    ``epoch``: the epoch ``from_offset`` belongs to, if known; when the stream's epoch
    differs, a StreamGap (``epoch_changed``) comes first and delivery starts over from
    the new epoch's first event. When ``from_offset`` is past the end of the stream, a
    StreamGap (``offset_out_of_range``) comes first, then every event the reader cannot
    have seen: with ``epoch``, those after the end; without, the whole epoch (the stream
    may have been reset since the offset was taken). ``offset`` and ``epoch`` are where
    the reader stands in a single stream (pass them to resume later); ``position`` is
    where it stands in all of them, a printable cursor that ``from_offset`` takes back.
    Events of one stream come in order; events of different streams in the order they
    are read. Redis outages are waited out, with backoff, and ``healthy`` is False
    meanwhile. With ``signing_keys``, an entry without a valid signature is skipped
    and counted (``rejected``).
    """

    def __init__(
        self,
        url: str,
        *,
        stream: str | None = None,
        streams: Sequence[str] = (),
        pattern: str = "*",
        from_offset: int | str = 0,
        epoch: str | None = None,
        callback: Callable[[Delivery], None] | None = None,
        queue_size: int = 10_000,
        batch: int = 500,
        block_seconds: float = 1.0,
        signing_keys: Sequence[bytes] = (),
    ) -> None:
        self.streams = [stream] if stream is not None else list(streams)
        self._signer = Signer(signing_keys)
        if not self.streams or (stream is not None and streams):
            raise ValueError("give one stream, or streams")
        self._cursors = _cursors(self.streams, from_offset, epoch)
        if batch < 1 or not block_seconds > 0:
            raise ValueError("batch must be >= 1 and block_seconds > 0")
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
        self._feed = _StreamFeed(queue_size=queue_size)
        super().__init__(self._feed, pattern, queue_size=queue_size, callback=callback)
        # One XREAD may only name streams of one cluster slot: a reader per stream there.
        if topology(self._client) == "cluster":
            groups = [[name] for name in self.streams]
        else:
            groups = [self.streams]
        self._readers = [
            threading.Thread(
                target=self._run, args=(group,), name=f"corral-durable:{group[0]}", daemon=True
            )
            for group in groups
        ]
        self._running_lock = threading.Lock()
        self._running = len(self._readers)  # the last reader out closes the client
        for reader in self._readers:
            reader.start()

    def __repr__(self) -> str:
        return f"<DurableSubscription {','.join(self.streams)} {self.pattern!r} at {self.position}>"

    @property
    def stream(self) -> str:
        return self.streams[0]

    @property
    def rejected(self) -> int:
        """Entries skipped: undecodable, or (with keys) not signed with one of them."""
        return self._feed.stats()["rejected"]

    @property
    def offset(self) -> int:
        """The last offset delivered (of the first stream, when there are several)."""
        return self._cursors[self.streams[0]].offset

    @property
    def epoch(self) -> str | None:
        return self._cursors[self.streams[0]].epoch

    @property
    def position(self) -> str:
        """Where the reader stands in every stream: ``offset:epoch`` per stream, in the
        order of ``streams``, joined by commas (``12:3fa2c1,0:,40:9b0e77``)."""
        return ",".join(
            f"{cursor.offset}:{cursor.epoch or ''}"
            for cursor in (self._cursors[name] for name in self.streams)
        )

    # -- delivery ---------------------------------------------------------------------

    def close(self) -> None:
        super().close()
        self._feed.close()  # ends its callback thread

    def _stop(self) -> None:
        self._stopping.set()
        disconnect(self._client)  # wakes a blocked XREAD

    # -- the reader threads -----------------------------------------------------------

    def _run(self, group: list[str]) -> None:
        failures = 0
        unsynced = set(group)
        while not self._stopping.is_set():
            try:
                if unsynced:
                    waiting = [name for name in sorted(unsynced) if not self._sync(name)]
                    self.healthy = True
                    failures = 0
                    unsynced = set(waiting)
                    if unsynced == set(group):  # entries of lost epochs: wait for new ones
                        self._stopping.wait(_ORPHAN_POLL)
                        continue
                readable = [name for name in group if name not in unsynced]
                # An epoch is checked again whenever its stream stays quiet for a block.
                unsynced |= self._read(readable)
                if unsynced:
                    continue
            except Exception as exc:
                unsynced = set(group)
                self.healthy = False
                if self._stopping.is_set():
                    break  # close() pulled the connection from under a blocked read
                if not isinstance(exc, REDIS_ERRORS):
                    raise
                log.warning("durable subscription %s: Redis unavailable (%s)", group[0], exc)
                failures += 1
                self._stopping.wait(_RECONNECT.delay(failures))
        with self._running_lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self._client.close()

    def _sync(self, stream: str) -> bool:
        """Check a stream's epoch and last offset against where the reader stands.

        False while the stream holds entries of a lost epoch (its meta hash is
        gone): those must not be read, since the next epoch reuses their offsets.
        """
        cursor = self._cursors[stream]
        with self._client.pipeline(transaction=True) as pipe:
            pipe.hmget(meta_key(stream), ["epoch", "offset"])
            pipe.xlen(stream)
            (epoch, last), length = cast("tuple[list[bytes | None], int]", pipe.execute())
        end = int(last or 0)
        if epoch is None:
            if cursor.epoch is not None:  # the stream was lost (Redis restarted empty, say)
                self._gap(stream, "epoch_changed", cursor.offset + 1, -1, "",
                          previous=cursor.epoch)  # fmt: skip
                cursor.epoch = None
                cursor.restart(0)
            elif cursor.offset > 0:  # resumed without epoch, and the stream has no life yet
                self._gap(stream, "offset_out_of_range", cursor.offset + 1, -1, "")
                cursor.restart(0)
            return length == 0  # nothing written yet in this life of the stream
        current = epoch.decode()
        if cursor.epoch is None:
            cursor.epoch = current
            if cursor.offset > end:  # an offset of a lost life of the stream, most likely
                self._gap(stream, "offset_out_of_range", cursor.offset + 1, -1, current)
                cursor.restart(0)
        elif current != cursor.epoch:
            self._gap(stream, "epoch_changed", cursor.offset + 1, -1, current,
                      previous=cursor.epoch)  # fmt: skip
            cursor.epoch = current
            cursor.restart(0)
        elif cursor.offset > end:
            # Ahead of the stream in its own epoch (it lost its latest entries, to a
            # failover say): the events that next get those offsets must not be skipped.
            self._gap(stream, "offset_out_of_range", cursor.offset + 1, -1, current,
                      previous=current)  # fmt: skip
            cursor.restart(end)
        return True

    def _read(self, streams: list[str]) -> set[str]:
        """Read one batch of ``streams`` (waiting up to a block for it); the streams to
        sync again: all of them when nothing came (their epochs are checked while it is
        quiet), and any whose entries turned out to be of another epoch (the stream
        was lost and started again under the reader)."""
        answer = cast(
            "list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None",
            self._client.xread(
                {name: f"{self._cursors[name].read_from}-0" for name in streams},
                count=self._batch,
                block=self._block_ms,
            ),
        )
        if not answer:
            return set(streams)
        resync: set[str] = set()
        for key, entries in answer:
            stream = key.decode()
            if not self._read_entries(stream, entries):
                resync.add(stream)
        return resync

    def _read_entries(self, stream: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> bool:
        cursor = self._cursors[stream]
        batch: list[Delivery] = []
        for entry_id, fields in entries:
            offset = int(entry_id.split(b"-", 1)[0])
            if self._signer.signing and not self._genuine(stream, offset, fields):
                cursor.forged = offset
                continue
            epoch = fields.get(b"epoch", b"").decode("utf-8", "replace")
            if cursor.epoch is None:
                cursor.epoch = epoch  # read only once no entry of a lost epoch is left
            elif epoch != cursor.epoch:
                self.put(batch)
                return False
            if offset > cursor.offset + 1:
                self.put(batch)
                batch = []
                self._gap(stream, "trimmed", cursor.offset + 1, offset - 1, cursor.epoch)
            cursor.offset = offset
            topic = fields[b"topic"].decode("utf-8", "replace")
            if self._matches(topic):
                message = self._decode(stream, fields, offset)
                if message is not None:
                    batch.append(Delivery(topic, message))
        self.put(batch)
        return True

    def _genuine(self, stream: str, offset: int, fields: dict[bytes, bytes]) -> bool:
        """Whether an entry is signed with one of the keys, for its stream and offset."""
        signature = fields.get(b"s", b"")
        if self._signer.verify(signature, *signed_parts(stream, offset, fields)):
            return True
        self._feed.reject()
        why = "a bad signature" if signature else "no signature"
        REJECTED.reject("durable", "bad_signature", f"{stream} entry {offset}: {why}", log)
        return False

    def _decode(self, stream: str, fields: dict[bytes, Any], offset: int) -> Message | None:
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
            self._feed.reject()
            kind = junk_kind(exc) if isinstance(exc, InvalidMessage) else "undecodable"
            REJECTED.reject("durable", kind, f"{stream} entry {offset}: {exc}", log)
            return None

    def _gap(
        self,
        stream: str,
        reason: GapReason,
        first: int,
        last: int,
        epoch: str,
        *,
        previous: str = "",
    ) -> None:
        gap = StreamGap(
            stream=stream,
            reason=reason,
            first_missing=first,
            last_missing=last,
            epoch=epoch,
            previous_epoch=previous,
        )
        self.put([Delivery(GAP_TOPIC, gap)])


def _cursors(streams: list[str], from_offset: int | str, epoch: str | None) -> dict[str, _Cursor]:
    """Where to start in each stream: an offset (in ``epoch``) for a single stream, 0
    for all of them, or a ``position`` cursor."""
    if isinstance(from_offset, str):
        if epoch is not None:
            raise ValueError("a position names its epochs: give no epoch with it")
        parts = from_offset.split(",")
        if len(parts) != len(streams):
            raise ValueError(
                f"position {from_offset!r} has {len(parts)} entries, for {len(streams)} streams"
            )
        cursors = {}
        for name, part in zip(streams, parts, strict=True):
            offset, sep, cursor_epoch = part.partition(":")
            if not sep or not offset.isdigit():
                raise ValueError(f"position entry {part!r} is not offset:epoch")
            cursors[name] = _Cursor(int(offset), cursor_epoch or None)
        return cursors
    if isinstance(from_offset, bool) or from_offset < 0:
        raise ValueError("from_offset must be >= 0")
    if len(streams) > 1 and (from_offset or epoch is not None):
        raise ValueError(
            "the events are in several streams: resume from a subscription's position "
            "(a cursor string), or give from_offset=0 for everything kept"
        )
    return {name: _Cursor(from_offset, epoch) for name in streams}


def follow_state_changes(
    url: str,
    namespace: str,
    pattern: str,
    *,
    from_offset: int | str,
    epoch: str | None = None,
    callback: Callable[[Delivery], None] | None = None,
    queue_size: int = 10_000,
    signing_keys: Sequence[bytes] = (),
) -> DurableSubscription:
    """A durable subscription to the state-change streams of ``namespace``: one per
    partition, as many as the state manager recorded in Redis (the default until one
    has).

    What ``System.subscribe(pattern, from_offset=…)`` and the remote client return.
    """
    with connect(url, setting="durable subscription url", retries=1) as client:
        recorded = client.get(partitions_key(namespace))
    partitions = int(recorded) if recorded is not None else DEFAULT_PARTITIONS
    return DurableSubscription(
        url,
        streams=[events_stream_key(namespace, p) for p in range(partitions)],
        pattern=pattern,
        from_offset=from_offset,
        epoch=epoch,
        callback=callback,
        queue_size=queue_size,
        signing_keys=signing_keys,
    )
