"""Typed messages and their wire codec.

``corral.messages`` imports nothing of corral but :mod:`corral.errors`.
"""

# The built-in managers' messages, so that every process knows their wire names.
from corral.messages import (  # noqa: F401
    auth,
    cache,
    pool,
    ratelimit,
    state,
    stream,
    transaction,
    websocket,
)
from corral.messages.base import (
    ErrorReply,
    Event,
    Message,
    Reply,
    Request,
    lookup,
    message,
    registered,
    validate,
)
from corral.messages.codec import Codec, Envelope
from corral.messages.system import (
    ChildStatus,
    Health,
    HealthChanged,
    HealthCheck,
    Ping,
    Pong,
    SupervisorChildChanged,
    SystemHealth,
    SystemHealthCheck,
)

__all__ = [
    "ChildStatus",
    "Codec",
    "Envelope",
    "ErrorReply",
    "Event",
    "Health",
    "HealthChanged",
    "HealthCheck",
    "Message",
    "Ping",
    "Pong",
    "Reply",
    "Request",
    "SupervisorChildChanged",
    "SystemHealth",
    "SystemHealthCheck",
    "lookup",
    "message",
    "registered",
    "validate",
]
