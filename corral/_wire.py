"""The wire protocol of remote requests: the Redis keys and the script both sides use.

A request for manager ``m`` is one entry (field ``m``: the encoded envelope) on the
Redis Stream :func:`stream_key`, read by the consumer group :data:`GROUP` of daemons,
so exactly one daemon takes it however many run. Each daemon keeps itself in the
sorted set :func:`alive_key` (score = the Redis time its heartbeat expires); a client
adds a request with :data:`SUBMIT_SCRIPT` only if some daemon is alive there — one Lua
call, so a request to no daemon fails at once instead of waiting for a timeout. The
keys of one manager share a hash tag, so each command touches one cluster slot.

The reply goes back on the caller's own topic (:func:`new_reply_topic`, the envelope's
reply topic), correlated by the request id::

    client.register_script(SUBMIT_SCRIPT)(
        keys=[stream_key("corral", "cache"), alive_key("corral", "cache")],
        args=[envelope, 100_000],
    )                                       # 1: queued, 0: no daemon serves cache

:mod:`corral.client` sends requests; :mod:`corral.remote` (the daemon's side) serves them.
"""

from __future__ import annotations

import uuid

__all__ = [
    "GROUP",
    "SUBMIT_SCRIPT",
    "alive_key",
    "lease_key",
    "new_reply_topic",
    "record_key",
    "stream_key",
]

GROUP = "daemons"
"""The consumer group of the daemons on every request stream."""

SUBMIT_SCRIPT = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
if redis.call('ZCARD', KEYS[2]) == 0 then
  return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[1])
return 1
"""
"""KEYS: stream, alive set. ARGV: envelope, stream cap. 1 = queued."""


def stream_key(namespace: str, manager: str) -> str:
    """The request stream of ``manager``."""
    return f"{namespace}:{{req:{manager}}}:stream"


def alive_key(namespace: str, manager: str) -> str:
    """The daemons serving ``manager``, scored by when their heartbeat expires (ms)."""
    return f"{namespace}:{{req:{manager}}}:alive"


def lease_key(namespace: str, manager: str) -> str:
    """The lease of a manager placed ``singleton``: the id of the daemon running it."""
    return f"{namespace}:{{req:{manager}}}:lease"


def record_key(namespace: str, manager: str, request_id: bytes) -> str:
    """Whether a request that is not idempotent has started or finished, and its reply."""
    return f"{namespace}:{{req:{manager}}}:ran:{request_id.hex()}"


def new_reply_topic() -> str:
    """A client's own reply topic: an exact topic no pattern subscriber is meant to see."""
    return f"reply.{uuid.uuid4().hex}"
