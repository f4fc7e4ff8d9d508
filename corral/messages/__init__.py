"""Typed messages and their wire codec.

``corral.messages`` imports nothing of corral but :mod:`corral.errors`. The built-in
managers' messages (``corral.messages.cache``, ...) load when first imported or looked
up by wire name (see :data:`~corral.messages.base.BUILT_IN_AREAS`).
"""

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
