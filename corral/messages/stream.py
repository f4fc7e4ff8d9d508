"""Messages of durable event streams: the notice that a subscriber missed events.

A durable subscription (:mod:`corral.streams`) that cannot deliver every event
after the offset it was asked to resume from says so with a ``StreamGap``
delivery instead of staying silent::

    for delivery in subscription:
        if isinstance(delivery.message, StreamGap):
            reload_everything()        # events first_missing..last_missing are gone
"""

from __future__ import annotations

from typing import Annotated, Literal

from corral.messages.base import MAX_OFFSET, Event, Offset, Range, message

__all__ = ["GAP_TOPIC", "GapReason", "StreamGap"]

GAP_TOPIC = "stream.gap"
"""The topic a :class:`StreamGap` is delivered under."""

GapReason = Literal["trimmed", "epoch_changed", "offset_out_of_range"]


@message("stream.gap")
class StreamGap(Event):
    """Events ``first_missing``..``last_missing`` of ``stream`` cannot be delivered.

    ``reason``: ``trimmed`` (the capped stream dropped them before they were read),
    ``epoch_changed`` (the stream was lost and started again, e.g. Redis came
    back without its data: offsets restart, and ``last_missing`` is unknown, -1)
    or ``offset_out_of_range`` (the reader resumed past the stream's end: the stream
    was reset and the reader gave no epoch, or the stream lost its latest entries;
    ``first_missing`` is the offset after the reader's, ``last_missing`` -1).
    Delivery goes on after the notice with the first event the reader cannot have
    seen: for ``offset_out_of_range`` in a known epoch, the next one written.
    """

    stream: str
    reason: GapReason
    first_missing: Offset
    last_missing: Annotated[int, Range(ge=-1, le=MAX_OFFSET)]
    epoch: str
    previous_epoch: str = ""
