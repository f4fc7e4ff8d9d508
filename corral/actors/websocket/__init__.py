"""The ``websocket`` manager: WebSocket rooms fanned out across every daemon on one Redis.

Configure it, and the daemon serves ``/ws`` on its port::

    [managers.websocket]
    depends_on = ["auth"]

Browsers speak the JSON protocol of docs/websocket-protocol.md; embedding
services send :mod:`corral.messages.websocket` messages (``EmitToRoom`` ...).
Rooms are closed to clients unless ``room_policies`` open them (by default only
each user's ``user:{sub}``) or a subscription token names them; ``JoinRoom``
from the service is never refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral import _redis
from corral.actors.websocket.gateway import Gateway
from corral.actors.websocket.manager import WebSocketManager, WebSocketOptions
from corral.config import parse_options
from corral.errors import ConfigError

if TYPE_CHECKING:
    from corral.daemon import Daemon

__all__ = ["Gateway", "WebSocketManager", "WebSocketOptions", "mount"]


def mount(daemon: Daemon) -> Gateway | None:
    """Serve ``/ws`` on the daemon's app when the ``websocket`` manager is configured.

    Call it before the daemon starts its system: the manager finds its gateway
    when it starts.
    """
    config = daemon.config
    section = config.managers.get("websocket")
    if section is None or not section.enabled:
        return None
    options: WebSocketOptions = parse_options(
        WebSocketOptions, section.options, manager="websocket"
    )
    redis_url = ""
    if options.backend != "memory":
        redis_url = options.redis_url or (config.bus.url if config.bus.backend == "redis" else "")
    if redis_url and not _redis.ASYNC_SHARDED_PUBSUB:
        raise ConfigError(
            "managers.websocket: rooms fan out across daemons by asyncio sharded pub/sub, "
            "which needs redis-py 8.0 or newer: pip install 'corral[websocket]' "
            '(or set backend = "memory" for a single daemon)'
        )
    gateway = Gateway(
        daemon.system,
        options,
        redis_url=redis_url,
        namespace=config.bus.namespace,
        tick_interval=options.tick_interval,
        signing_keys=daemon.system.codec.keys,
        replay_window=daemon.system.codec.replay_window,
        metrics=daemon.system.supervisor.metrics()["websocket"],
    )
    daemon.app.router.add_get("/ws", gateway.handle)
    daemon.app.on_startup.append(gateway.started)
    daemon.app.on_shutdown.append(gateway.shutdown)
    daemon.app.on_cleanup.append(gateway.closed)
    return gateway
