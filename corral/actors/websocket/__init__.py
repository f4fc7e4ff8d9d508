"""The ``websocket`` manager: WebSocket rooms fanned out across every daemon on one Redis.

Configure it, and the daemon serves ``/ws`` on its port::

    [managers.websocket]
    depends_on = ["auth"]

Browsers speak the JSON protocol of docs/websocket-protocol.md; embedding
services send :mod:`corral.messages.websocket` messages (``WsEmitToRoom`` ...).
Rooms are closed to clients unless ``room_policies`` open them (by default only
each user's ``user:{sub}``) or a subscription token names them; ``WsJoinRoom``
from the service is never refused.
"""

from corral.actors.websocket._manager import WebSocketManager
from corral.actors.websocket._options import WebSocketOptions

__all__ = ["WebSocketManager", "WebSocketOptions"]
