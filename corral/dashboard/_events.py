"""The events a daemon publishes, kept for the dashboard: per kind, the newest first out.

The daemon's bus calls :meth:`RecentEvents.record` with every message it publishes
(:meth:`corral.bus.Bus.on_publish`), so each event is known to come from this daemon.
Those of the topics in :data:`EVENT_KINDS` are kept, up to :data:`EVENTS_KEPT` per kind:
a flood of state changes pushes out older state changes, never a restart::

    events = RecentEvents("d1")
    bus.on_publish(events.record)
    found, cursor = events.since(Cursor())        # the last ones of each kind
    found, cursor = events.since(cursor)          # those published since

On Redis the dashboard also copies them to the namespace's streams
(:mod:`corral.dashboard._shared`), so that every daemon's page shows every daemon's.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections import deque
from typing import Any

from corral.bus import compile_glob
from corral.messages.base import Message

__all__ = [
    "EVENTS_KEPT",
    "EVENT_KINDS",
    "Cursor",
    "RecentEvents",
    "event_document",
    "event_kind",
]

EVENT_KINDS: dict[str, tuple[str, ...]] = {
    "supervisor": ("supervisor.child.*", "supervisor.dead_letter"),
    "health": ("health.changed",),
    "state": ("state.changed.*",),
}
"""The topics the dashboard shows, by kind; each kind is kept and capped on its own."""

EVENTS_KEPT = 100
"""Events kept per kind, and shown per kind when a page opens."""

LONGEST_TEXT = 300
"""Characters of a text field shown; the rest is cut."""

_KIND_OF_FIRST_WORD = {kind: kind for kind in EVENT_KINDS}
_MATCHERS = {
    kind: [compile_glob(pattern) for pattern in patterns] for kind, patterns in EVENT_KINDS.items()
}
_POSITION = re.compile(r"^\d{1,20}(-\d{1,20})?$")


def event_kind(topic: str) -> str | None:
    """The kind of the events on ``topic``, or None when the dashboard does not show it.

    >>> event_kind("supervisor.child.failed"), event_kind("ws.room.lobby")
    ('supervisor', None)
    """
    kind = _KIND_OF_FIRST_WORD.get(topic.partition(".")[0])
    if kind is not None and any(regex.match(topic) for regex in _MATCHERS[kind]):
        return kind
    return None


def event_document(
    daemon_id: str, topic: str, message: Message, published: float
) -> dict[str, Any]:
    """An event as the page shows it: its daemon, kind, topic, type, fields and time.

    Long text fields are cut to :data:`LONGEST_TEXT` characters; ``id`` is set by the
    store that keeps it.
    """
    return {
        "id": "",
        "daemon": daemon_id,
        "kind": event_kind(topic),
        "topic": topic,
        "type": message.type_name,
        "fields": {key: _shortened(value) for key, value in message.to_wire().items()},
        "ts": round(published, 3),
    }


def _shortened(value: Any) -> Any:
    if isinstance(value, str) and len(value) > LONGEST_TEXT:
        return value[:LONGEST_TEXT] + "…"
    if isinstance(value, bytes):
        return _shortened(repr(value))
    if isinstance(value, list):
        return [_shortened(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _shortened(item) for key, item in value.items()}
    return value


class Cursor(dict[str, str]):
    """Where a page stands in each kind's events: the position of the last one it got.

    It travels as text, ``kind:position,...`` (a position is a number, or a Redis stream
    id); a kind missing from it has not been read yet::

        Cursor.parse("supervisor:12,state:1700000000000-3")
    """

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """The cursor ``text`` holds; ValueError when it is not one."""
        cursor = cls()
        for item in filter(None, text.split(",")):
            kind, _, position = item.partition(":")
            if kind not in EVENT_KINDS or not _POSITION.match(position):
                raise ValueError(f"not a position in the events: {item[:60]!r}")
            cursor[kind] = position
        return cursor

    def __str__(self) -> str:
        return ",".join(f"{kind}:{position}" for kind, position in sorted(self.items()))


class RecentEvents:
    """This daemon's latest events of each kind (:data:`EVENTS_KEPT` of each), in memory.

    :meth:`record` runs on the publishing thread: it only appends the message to a
    bounded queue; documents are built when read.
    """

    def __init__(self, daemon_id: str, *, kept: int = EVENTS_KEPT) -> None:
        self.daemon_id = daemon_id
        self.kept = kept
        self._lock = threading.Lock()
        # Numbered from the start time in µs: a page's cursor from before a restart of the
        # daemon does not hide the events after it.
        self._numbers = itertools.count(time.time_ns() // 1000)
        self._events: dict[str, deque[tuple[int, float, str, Message]]] = {
            kind: deque(maxlen=kept) for kind in EVENT_KINDS
        }

    def record(self, topic: str, message: Message) -> None:
        """Keep ``message``, published on ``topic`` now, if the dashboard shows its kind."""
        kind = event_kind(topic)
        if kind is None:
            return
        with self._lock:
            self._events[kind].append((next(self._numbers), time.time(), topic, message))

    def since(self, cursor: Cursor) -> tuple[list[dict[str, Any]], Cursor]:
        """The events after ``cursor`` (the last :attr:`kept` of a kind not read yet),
        oldest first, and the cursor after them."""
        with self._lock:
            kept = {kind: list(events) for kind, events in self._events.items()}
        found: list[dict[str, Any]] = []
        after = Cursor(cursor)
        for kind, events in kept.items():
            last = int(cursor.get(kind, "0").partition("-")[0])
            for number, published, topic, message in events:
                if number > last:
                    document = event_document(self.daemon_id, topic, message, published)
                    document["id"] = f"{kind}:{number}"
                    found.append(document)
                    after[kind] = str(number)
        found.sort(key=lambda document: document["ts"])
        return found, after
