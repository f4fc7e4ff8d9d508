"""Publishing and following events: what System and Client share."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from corral.bus import Bus, Delivery, Subscription
from corral.messages.base import Event, validate

if TYPE_CHECKING:
    from corral.messages.codec import Codec


class EventsMixin:
    """``publish`` and ``subscribe`` over ``self.bus``; durable replay from Redis."""

    bus: Bus
    codec: Codec
    validate: bool

    def _durable_source(self) -> tuple[str, str]:
        """The Redis URL and namespace of the durable state-change stream."""
        raise NotImplementedError

    def publish(self, topic: str, event: Event) -> None:
        """Publish ``event`` on ``topic`` (validated first, unless validation is off)."""
        if self.validate:
            validate(event)
        self.bus.publish(topic, event)

    def subscribe(
        self,
        pattern: str,
        *,
        callback: Callable[[Delivery], None] | None = None,
        queue_size: int | None = None,
        from_offset: int | str | None = None,
        epoch: str | None = None,
    ) -> Subscription:
        """Follow events whose topic matches ``pattern`` (Redis glob rules).

        With ``from_offset``, follow the durable state-change streams instead (one per
        partition of the states, in Redis): every ``state.changed.*`` event after that
        position, in order within a partition, then live ones; a ``StreamGap`` event
        says plainly when events were trimmed away or a stream's epoch changed.
        ``from_offset=0`` starts from everything kept; to resume, pass the ``position``
        of an earlier subscription (a printable cursor). An int offset with ``epoch``
        works when the states have one partition.
        """
        if from_offset is None:
            return self.bus.subscribe(pattern, callback=callback, queue_size=queue_size)
        from corral.streams import follow_state_changes  # noqa: PLC0415 - loads the state messages

        url, namespace = self._durable_source()
        return follow_state_changes(
            url,
            namespace,
            pattern,
            from_offset=from_offset,
            epoch=epoch,
            callback=callback,
            queue_size=queue_size or self.bus.queue_size,
            signing_keys=self.codec.keys,
        )
