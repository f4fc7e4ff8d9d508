"""The transaction manager's options: where open transactions live, and their limits.

::

    [managers.transaction]
    backend = "auto"         # "redis" when the system has Redis (redis_url or a Redis bus)
    idle_timeout = 30.0      # seconds without a request before a rollback
    max_writes = 1000        # buffered writes per transaction
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from corral.config import REDIS_URL, Section
from corral.messages.base import MAX_TIMEOUT

__all__ = ["TransactionOptions"]


@dataclass(frozen=True, kw_only=True)
class TransactionOptions(Section):
    """``[managers.transaction]``.

    ``backend = "auto"`` keeps open transactions in Redis when the system has one
    (``redis_url``, or the bus's URL), so that any daemon serves any request of a
    transaction; else in this process's memory. ``sweep_interval`` is how often the
    memory store rolls back idle transactions (Redis expires them by itself).
    """

    backend: Literal["auto", "memory", "redis"] = "auto"
    redis_url: str = field(default="", metadata=REDIS_URL)
    idle_timeout: float = field(default=30.0, metadata={"gt": 0, "le": MAX_TIMEOUT})
    max_writes: int = field(default=1_000, metadata={"ge": 1})
    sweep_interval: float = field(default=1.0, metadata={"gt": 0})
