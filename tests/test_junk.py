"""Junk from outside: refused, counted by kind, logged a few times, never fatal."""

from __future__ import annotations

import os
import random
import re
import time
import uuid
from pathlib import Path

import httpx
import msgpack
import redis

import corral
from corral._wire import GROUP, stream_key
from corral.messages.system import Ping
from tests.daemons import DaemonGroup, redis_daemons_config
from tests.redis_server import RedisServer
from tests.support import Work, wait_until

MANAGERS = '[managers.worker]\nclass_path = "tests.support:Worker"\n[managers.cache]\n'
PER_STREAM = 5_000


def _junk(index: int) -> dict[str, bytes | int | str]:
    """One junk request entry of eight kinds."""
    kind = index % 8
    if kind == 0:
        return {"m": os.urandom(random.randint(0, 64)), "d": 0}
    if kind == 1:
        return {"x": b"no message field"}
    if kind == 2:  # a deadline that is not a number
        envelope = {"t": "system.ping", "v": 1, "id": os.urandom(16), "d": "soon", "b": {}}
        return {"m": msgpack.packb(envelope)}
    if kind == 3:  # a deadline past anything a client may ask for
        envelope = {"t": "system.ping", "v": 1, "id": os.urandom(16), "d": 2**63, "b": {}}
        return {"m": msgpack.packb(envelope)}
    if kind == 4:
        return {"m": msgpack.packb([1, 2, 3]), "d": 0}
    if kind == 5:
        return {"m": msgpack.packb({"t": "no.such_type", "v": 1, "id": b"0" * 16, "b": {}}), "d": 0}
    if kind == 6:  # a sound envelope, a bad field, a reply topic nobody reads
        body = {"t": "test.work", "v": 1, "id": os.urandom(16), "r": "reply.void",
                "b": {"seconds": "long"}}  # fmt: skip
        return {"m": msgpack.packb(body), "d": 0}
    return {"m": b"\xc1" * 10, "d": -1}


def test_junk_in_every_request_stream_leaves_nothing_pending_and_few_log_lines(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    namespace = f"junk{uuid.uuid4().hex[:8]}"
    config = redis_daemons_config(redis_server.url, namespace, MANAGERS)
    raw = redis.Redis.from_url(redis_server.url)
    managers = ["system", "worker", "cache", "supervisor"]
    with DaemonGroup(tmp_path, config, count=1) as group:
        started = time.monotonic()
        for manager in managers:
            pipe = raw.pipeline(transaction=False)
            for index in range(PER_STREAM):
                pipe.xadd(stream_key(namespace, manager), _junk(index))  # type: ignore[arg-type]
            pipe.execute()

        def drained() -> bool:
            return all(raw.xlen(stream_key(namespace, m)) == 0 for m in managers)

        wait_until(drained, timeout=120, interval=0.2)
        elapsed = time.monotonic() - started
        for manager in managers:
            pending: dict[str, int] = raw.xpending(stream_key(namespace, manager), GROUP)
            assert pending["pending"] == 0
        with corral.connect(redis_server.url, namespace=namespace) as remote:
            assert remote.ask(Ping(payload=b"still here")).payload == b"still here"
            assert remote.ask(Work()).name == "worker"
        log = group[0].log
        assert "Traceback" not in log
        junk_lines = [line for line in log.splitlines() if "rejected remote input" in line]
        kinds = {re.search(r"\((\w+)\)", line).group(1) for line in junk_lines}  # type: ignore[union-attr]
        # At most one line per kind per 10 s interval, and a last one per kind.
        assert len(junk_lines) <= len(kinds) * (2 + elapsed / 10), junk_lines
        metrics = httpx.get(f"{group[0].http_url}/metrics", timeout=10).text
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("corral_rejected_total{") and 'source="remote"' in line
        )
        assert counted == len(managers) * PER_STREAM  # every entry, each counted once
        assert group[0].process.poll() is None


CHANNEL_MANAGERS = (
    '[managers.cache]\n[managers.auth]\nsigning_key = "junk-test-signing-secret-of-32-bytes"\n'
    '[managers.websocket]\ndepends_on = ["auth"]\n'
)


def _channel_junk(index: int) -> bytes:
    kind = index % 4
    if kind == 0:
        return os.urandom(random.randint(0, 64))
    if kind == 1:
        return bytes(msgpack.packb({"t": "no.such_type", "v": 1, "id": os.urandom(16), "b": {}}))
    if kind == 2:
        body = {"t": "cache.invalidated", "v": 1, "id": os.urandom(16), "b": []}
        return bytes(msgpack.packb(body))
    return b"\x00" * 100


def test_junk_on_every_channel_a_daemon_listens_to_is_counted_not_shouted(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    namespace = f"junk{uuid.uuid4().hex[:8]}"
    config = redis_daemons_config(redis_server.url, namespace, CHANNEL_MANAGERS)
    raw = redis.Redis.from_url(redis_server.url)
    with DaemonGroup(tmp_path, config, count=1) as group:
        plain: list[bytes] = raw.pubsub_channels(f"{namespace}:*")  # type: ignore[assignment]
        sharded: list[bytes] = raw.execute_command(  # type: ignore[no-untyped-call]
            "PUBSUB", "SHARDCHANNELS", f"{namespace}:*"
        )
        # The daemon's own reply channel aside, what it reads from outside.
        listened = [(c, "publish") for c in plain] + [(c, "spublish") for c in sharded]
        assert len(listened) >= 2, listened  # cache invalidations, websocket node orders ...
        started = time.monotonic()
        for channel, command in listened:
            pipe = raw.pipeline(transaction=False)
            for index in range(PER_STREAM):
                pipe.execute_command(  # type: ignore[no-untyped-call]
                    command.upper(), channel, _channel_junk(index)
                )
            pipe.execute()
        with corral.connect(redis_server.url, namespace=namespace) as remote:
            assert remote.ask(Ping(payload=b"still here")).payload == b"still here"
        metrics_url = f"{group[0].http_url}/metrics"

        def counted() -> float:
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in httpx.get(metrics_url, timeout=10).text.splitlines()
                if line.startswith("corral_rejected_total{")
            )

        wait_until(lambda: counted() >= len(listened) * PER_STREAM, timeout=60, interval=0.2)
        elapsed = time.monotonic() - started
        log = group[0].log
        assert "Traceback" not in log
        junk_lines = [line for line in log.splitlines() if "rejected " in line]
        kinds = {re.search(r"rejected (\w+) input \((\w+)\)", line).groups() for line in junk_lines}  # type: ignore[union-attr]
        assert len(junk_lines) <= len(kinds) * (2 + elapsed / 10), junk_lines
        assert group[0].process.poll() is None
