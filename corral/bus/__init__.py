"""The event bus: topics, glob subscriptions, and two implementations.

:class:`MemoryBus` is the embedded default and hands message objects over within
one process. :class:`RedisBus` carries them across processes over Redis pub/sub:
topic ``t`` is the channel ``<namespace>:t``, an exact topic is a SUBSCRIBE and
only a pattern (``*``, ``?``, ``[...]``) is a PSUBSCRIBE. Patterns follow Redis
glob rules in both buses (:func:`compile_glob`)::

    bus = MemoryBus()                      # or RedisBus("redis://localhost:6379/0")
    with bus.subscribe("supervisor.child.*") as sub:
        event = SupervisorChildChanged(child="cache", change="failed")
        bus.publish("supervisor.child.failed", event)
        delivery = sub.get(timeout=1.0)    # Delivery(topic, message), or None on timeout

    bus.subscribe("health.changed", callback=print)   # on a thread the bus shares

    async for delivery in bus.subscribe("health.changed"):   # asyncio, without blocking the loop
        ...

Delivery is at most once. Every subscription has a bounded queue: when it is full
the delivery is dropped and counted (``Subscription.dropped``, ``Bus.stats()``).
Callback subscriptions share a few threads (``callback_threads``, 4 by default, 16
at most): each one's callbacks run one at a time and in order.
"""

from corral.bus._bus import Bus
from corral.bus._glob import compile_glob, is_pattern
from corral.bus._memory import MemoryBus
from corral.bus._redis import RedisBus
from corral.bus._subscription import (
    DEFAULT_CALLBACK_THREADS,
    MAX_CALLBACK_THREADS,
    Delivery,
    Subscription,
)

__all__ = [
    "DEFAULT_CALLBACK_THREADS",
    "MAX_CALLBACK_THREADS",
    "Bus",
    "Delivery",
    "MemoryBus",
    "RedisBus",
    "Subscription",
    "compile_glob",
    "is_pattern",
]
