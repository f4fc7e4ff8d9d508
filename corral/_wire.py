"""The wire protocol of remote requests: the Redis keys and the script both sides use.

A request for manager ``m`` is one entry (field ``m``: the encoded envelope) on the
Redis Stream :func:`stream_key`, read by the consumer group :data:`GROUP` of daemons,
so exactly one daemon takes it however many run. Each daemon keeps itself in the
sorted set :func:`alive_key` (score = the Redis time its heartbeat expires); a client
adds a request with :data:`SUBMIT_SCRIPT` only if some daemon is alive there — one Lua
call, so a request to no daemon fails at once instead of waiting for a timeout. The
keys of one manager share a hash tag, so each command touches one cluster slot.

The envelope's reply topic ``r`` says where the reply goes, correlated by the request
id: on the caller's own topic (:func:`new_reply_topic`) by pub/sub; or, when it starts
with :data:`REPLY_LIST` (``[list]reply.<hex>``), pushed to the request's own list
(:func:`reply_list_key`, in the slot of its stream), which the caller waits on with
``BLPOP`` in the same round trip as the submit script::

    submit = client.register_script(SUBMIT_SCRIPT)
    submit(
        keys=[stream_key("corral", "cache"), alive_key("corral", "cache")],
        args=[envelope, 100_000],
    )                                       # 1: queued, 0: no daemon serves cache

    reply_list = reply_list_key("corral", "cache", request_id)
    pipe = client.pipeline(transaction=False)
    pipe.evalsha(
        submit.sha, 3, stream_key("corral", "cache"), alive_key("corral", "cache"),
        reply_list, envelope, 100_000, REPLY_LIST_TTL_MS,
    )                                       # 0 also pushes an empty item to reply_list
    pipe.blpop(reply_list, timeout)         # the reply, or b"" when no daemon serves

:mod:`corral.client` sends requests; :mod:`corral.remote` (the daemon's side) serves them.
"""

from __future__ import annotations

import uuid

__all__ = [
    "GROUP",
    "REPLY_LIST",
    "REPLY_LIST_TTL_MS",
    "SUBMIT_SCRIPT",
    "alive_key",
    "lease_key",
    "new_reply_topic",
    "record_key",
    "reply_list_key",
    "stream_key",
]

GROUP = "daemons"
"""The consumer group of the daemons on every request stream."""

SUBMIT_SCRIPT = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
if redis.call('ZCARD', KEYS[2]) == 0 then
  if KEYS[3] then
    redis.call('RPUSH', KEYS[3], '')
    redis.call('PEXPIRE', KEYS[3], ARGV[3])
  end
  return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[1])
return 1
"""
"""KEYS: stream, alive set[, reply list]. ARGV: envelope, stream cap[, reply list TTL (ms)].
1 = queued; 0 = no daemon (and an empty item on the reply list, so that a ``BLPOP``
sent with the script returns at once)."""

REPLY_LIST = "[list]"
"""The start of a reply topic asking for the reply on the request's own list. No topic
can start with it (topics hold no ``[``); the rest names the caller, for the logs."""

REPLY_LIST_TTL_MS = 60_000
"""How long an item stays on a reply list that nobody takes (its caller gave up)."""


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


def reply_list_key(namespace: str, manager: str, request_id: bytes) -> str:
    """The list a request's reply is pushed to, when its reply topic asks for one."""
    return f"{namespace}:{{req:{manager}}}:reply:{request_id.hex()}"


def new_reply_topic() -> str:
    """A client's own reply topic: an exact topic no pattern subscriber is meant to see."""
    return f"reply.{uuid.uuid4().hex}"
