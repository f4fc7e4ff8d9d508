"""Test managers that count their effects in Redis, for the multi-daemon tests.

``Effects`` (placement any) records every request it runs: how many times each token
ran and when it started, so that a test counts effects rather than replies.
``Tally`` (placement singleton) keeps a counter in memory and records, at start and at
every request, any other live process running an instance at the same time.
"""

from __future__ import annotations

import os
import time
from typing import Any

from corral._redis import connect
from corral.manager import Manager, handles
from corral.messages.base import Reply, Request, message


@message("test.effect")
class Effect(Request["EffectDone"]):
    """Run once: count ``token``, note when it started, then take ``seconds``."""

    manager = "effects"
    token: str
    seconds: float = 0.0


@message("test.effect_done")
class EffectDone(Reply):
    token: str
    pid: int


def _client(url: str) -> Any:
    return connect(url)


def effect_counts(url: str, namespace: str) -> dict[str, int]:
    raw: dict[bytes, bytes] = _client(url).hgetall(f"{namespace}:test:effects")
    return {k.decode(): int(v) for k, v in raw.items()}


def effect_starts(url: str, namespace: str) -> dict[str, float]:
    raw: dict[bytes, bytes] = _client(url).hgetall(f"{namespace}:test:started")
    return {k.decode(): float(v) for k, v in raw.items()}


class Effects(Manager):
    name = "effects"

    def on_start(self) -> None:
        self.redis = _client(self.corral_context.redis_url)
        self.prefix = f"{self.corral_context.namespace}:test"

    def on_stop(self) -> None:
        self.redis.close()

    @handles(Effect)
    def effect(self, msg: Effect) -> EffectDone:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(f"{self.prefix}:effects", msg.token, 1)
        pipe.hset(f"{self.prefix}:started", msg.token, repr(time.time()))
        pipe.execute()
        time.sleep(msg.seconds)
        return EffectDone(token=msg.token, pid=os.getpid())


@message("test.tally_add")
class TallyAdd(Request["Tallied"]):
    manager = "tally"
    amount: int = 1


@message("test.tallied")
class Tallied(Reply):
    total: int
    pid: int


def overlaps(url: str, namespace: str) -> list[str]:
    """Every time a Tally instance saw another live one: "<pid> saw <pids>"."""
    raw: list[bytes] = _client(url).lrange(f"{namespace}:test:overlaps", 0, -1)
    return [item.decode() for item in raw]


def tally_starts(url: str, namespace: str) -> list[int]:
    """The pid of every Tally start, in order."""
    raw: list[bytes] = _client(url).lrange(f"{namespace}:test:tally_starts", 0, -1)
    return [int(item) for item in raw]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # a zombie has died
    except OSError:
        return False


class Tally(Manager):
    name = "tally"
    placement = "singleton"

    def on_start(self) -> None:
        self.redis = _client(self.corral_context.redis_url)
        self.prefix = f"{self.corral_context.namespace}:test"
        self.total = 0
        self.redis.sadd(f"{self.prefix}:tally_live", os.getpid())
        self.redis.rpush(f"{self.prefix}:tally_starts", os.getpid())
        self._check_alone()

    def on_stop(self) -> None:
        self.redis.srem(f"{self.prefix}:tally_live", os.getpid())
        self.redis.close()

    def _check_alone(self) -> None:
        members: Any = self.redis.smembers(f"{self.prefix}:tally_live")
        others = sorted(int(pid) for pid in members if int(pid) != os.getpid() and _alive(int(pid)))
        if others:
            self.redis.rpush(f"{self.prefix}:overlaps", f"{os.getpid()} saw {others}")

    @handles(TallyAdd)
    def add(self, msg: TallyAdd) -> Tallied:
        self._check_alone()
        self.total += msg.amount
        return Tallied(total=self.total, pid=os.getpid())
