"""What the daemons of a namespace tell each other's dashboards, through Redis.

Every daemon on a Redis bus writes, every couple of seconds:

- its status document and its samples (:mod:`corral.dashboard._series`) in the hash
  ``<ns>:{dashboard}:daemon:<daemon id>`` (fields ``status`` and ``series``, JSON),
  which expires :data:`STATUS_TTL` seconds after its last refresh;
- its new events, to the stream of their kind ``<ns>:{dashboard}:events:<kind>``
  (field ``e``, JSON), capped at :data:`~corral.dashboard._events.EVENTS_KEPT` entries.

Which daemons are alive comes from their heartbeats, the sorted set
``<ns>:{req:supervisor}:alive`` that every daemon renews (:mod:`corral.remote`). Every
key above shares the hash tag ``{dashboard}``, so a write is one pipeline to one cluster
slot::

    shared = SharedView("redis://127.0.0.1:6379/0", "corral", "d1")
    await shared.publish({"id": "d1", ...}, series=None, events=[])
    ids = await shared.daemon_ids()
    documents = await shared.documents(ids, "status")
    found, cursor = await shared.events(Cursor())
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any, Literal, cast

from corral._redis import AsyncRedis, connect_async, time_ms
from corral._wire import alive_key
from corral.dashboard._events import EVENT_KINDS, EVENTS_KEPT, Cursor

__all__ = ["EVENTS_TTL", "STATUS_TTL", "SharedView", "events_key", "status_key"]

log = logging.getLogger(__name__)

STATUS_TTL = 10.0
"""Seconds a daemon's status document outlives its last refresh."""

EVENTS_TTL = 86_400.0
"""Seconds a kind's event stream outlives its last event."""

LARGEST_DOCUMENT = 1 << 20
"""Bytes: a document read from Redis that is larger is skipped."""

Field = Literal["status", "series"]


def status_key(namespace: str, daemon_id: str) -> str:
    """The hash holding a daemon's status document and samples."""
    return f"{namespace}:{{dashboard}}:daemon:{daemon_id}"


def events_key(namespace: str, kind: str) -> str:
    """The capped stream of one kind of events, from every daemon of the namespace."""
    return f"{namespace}:{{dashboard}}:events:{kind}"


class SharedView:
    """One daemon's side of the namespace's dashboard documents (asyncio, on its HTTP loop)."""

    def __init__(
        self, url: str, namespace: str, daemon_id: str, *, kept: int = EVENTS_KEPT
    ) -> None:
        self.namespace = namespace
        self.daemon_id = daemon_id
        self.kept = kept
        self.client: AsyncRedis = connect_async(url, setting="bus.url")

    async def publish(
        self,
        status: dict[str, Any] | None,
        series: dict[str, Any] | None,
        events: Iterable[dict[str, Any]],
    ) -> None:
        """Append this daemon's new events; write its status and its samples when given."""
        key = status_key(self.namespace, self.daemon_id)
        pipe = self.client.pipeline(transaction=False)
        if status is not None:
            pipe.hset(key, "status", json.dumps(status, default=str))
        if series is not None:
            pipe.hset(key, "series", json.dumps(series))
        if status is not None or series is not None:
            pipe.pexpire(key, int(STATUS_TTL * 1000))
        streams = set()
        for event in events:
            stream = events_key(self.namespace, event["kind"])
            streams.add(stream)
            pipe.xadd(stream, {"e": json.dumps(event, default=str)}, maxlen=self.kept,
                      approximate=False)  # fmt: skip
        for stream in streams:
            pipe.pexpire(stream, int(EVENTS_TTL * 1000))
        await pipe.execute()

    async def forget(self) -> None:
        """Remove this daemon's status at once (when it stops), rather than when it expires."""
        await self.client.delete(status_key(self.namespace, self.daemon_id))

    async def daemon_ids(self) -> list[str]:
        """The daemons whose heartbeat is current, by Redis's clock."""
        now_ms = time_ms(await self.client.time())
        members = await self.client.zrangebyscore(
            alive_key(self.namespace, "supervisor"), now_ms, "+inf"
        )
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def documents(self, daemon_ids: Iterable[str], field: Field) -> dict[str, dict[str, Any]]:
        """The ``status`` or ``series`` document of each daemon that has one."""
        ids = list(daemon_ids)
        if not ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for daemon_id in ids:
            pipe.hget(status_key(self.namespace, daemon_id), field)
        found = {}
        for daemon_id, raw in zip(ids, await pipe.execute(), strict=True):
            document = _json_object(raw)
            if document is not None:
                found[daemon_id] = document
        return found

    async def events(self, cursor: Cursor) -> tuple[list[dict[str, Any]], Cursor]:
        """The events after ``cursor`` (the last :attr:`kept` of a kind not read yet),
        oldest first, and the cursor after them."""
        found: list[dict[str, Any]] = []
        after = Cursor(cursor)
        for kind in EVENT_KINDS:
            key = events_key(self.namespace, kind)
            if kind in cursor:
                read = await self.client.xrange(key, f"({cursor[kind]}", "+", count=self.kept)
            else:
                read = await self.client.xrevrange(key, count=self.kept)
            entries = cast(list[tuple[bytes, dict[bytes, bytes]]], read)
            if kind not in cursor:
                entries.reverse()  # read newest first: the last ones, oldest first
            for entry_id, fields in entries:
                position = entry_id.decode()
                after[kind] = position
                event = _json_object(fields.get(b"e"))
                if event is not None and isinstance(event.get("ts"), int | float):
                    event["id"] = f"{kind}:{position}"
                    event["kind"] = kind
                    found.append(event)
        found.sort(key=lambda event: float(event["ts"]))
        return found, after

    async def close(self) -> None:
        await self.client.aclose()


def _json_object(raw: bytes | None) -> dict[str, Any] | None:
    """The JSON object in ``raw``, or None when it is missing, too large or not one."""
    if raw is None or len(raw) > LARGEST_DOCUMENT:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        log.debug("skipped a dashboard document that is not JSON: %r", raw[:80])
        return None
    return value if isinstance(value, dict) else None
