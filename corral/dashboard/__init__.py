"""The operator's dashboard: ``GET /`` (one self-contained page) and ``GET /events`` (SSE).

The page polls ``/health`` once a second for every manager's status, restarts,
mailbox depth and message rate, and follows ``/events``, a server-sent-events
stream of the system's lifecycle events (``supervisor.child.*``,
``health.changed``, ``state.changed.*``, ``cache.invalidated``). It loads
nothing from elsewhere, so it works on an offline machine::

    from corral import dashboard
    dashboard.mount(daemon)         # done by the Daemon itself
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from corral.bus import Delivery

if TYPE_CHECKING:
    from corral.daemon import Daemon

__all__ = ["EVENT_PATTERNS", "EventStream", "mount", "page"]

EVENT_PATTERNS = ("supervisor.child.*", "health.changed", "state.changed.*", "cache.invalidated")
"""The topics the dashboard streams (patterns are subscribed only while a page is open)."""


@cache
def page() -> bytes:
    """The dashboard's HTML (styles and script inline)."""
    return resources.files(__name__).joinpath("index.html").read_bytes()


def event_document(delivery: Delivery) -> dict[str, Any]:
    """One bus event as the page shows it: topic, type, fields, time."""
    event = delivery.message
    return {
        "topic": delivery.topic,
        "type": event.type_name,
        "fields": event.to_wire(),
        "ts": time.time(),
    }


class EventStream:
    """``GET /events``: each open page gets its own bounded queue fed by bus subscriptions."""

    def __init__(self, daemon: Daemon, *, queue_size: int = 256, keepalive: float = 15.0) -> None:
        self.daemon = daemon
        self.queue_size = queue_size
        self.keepalive = keepalive
        self.stopping = False
        self.open: set[asyncio.Queue[Delivery | None]] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delivery | None] = asyncio.Queue(self.queue_size)

        def offer(delivery: Delivery) -> None:
            with contextlib.suppress(asyncio.QueueFull):  # a stalled page loses events
                queue.put_nowait(delivery)

        def on_delivery(delivery: Delivery) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(offer, delivery)

        subscriptions = [
            self.daemon.system.subscribe(pattern, callback=on_delivery)
            for pattern in EVENT_PATTERNS
        ]
        self.open.add(queue)
        try:
            await response.write(b": connected\n\n")
            while not self.stopping:
                try:
                    delivery = await asyncio.wait_for(queue.get(), self.keepalive)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if delivery is None:
                    break
                text = json.dumps(event_document(delivery), default=repr)
                await response.write(f"data: {text}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.open.discard(queue)
            for subscription in subscriptions:
                subscription.close()
        return response

    async def shutdown(self, _app: web.Application) -> None:
        self.stopping = True
        for queue in self.open:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)


async def _index(_request: web.Request) -> web.Response:
    return web.Response(body=page(), content_type="text/html", charset="utf-8")


def mount(daemon: Daemon) -> EventStream:
    """Serve ``/`` and ``/events`` on the daemon's app."""
    stream = EventStream(daemon)
    daemon.app.router.add_get("/", _index)
    daemon.app.router.add_get("/events", stream.handle)
    daemon.app.on_shutdown.append(stream.shutdown)
    return stream
