"""Cache locks: fencing tokens, release only by the holder, expiry of a dead holder's lock,
waiting without polling (woken by a release on another system), extend, and the
``lock`` helper; on memory, standalone Redis and a Redis Cluster."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from corral.actors.cache import CacheManager
from corral.config import Config, ManagerSection, SystemSection
from corral.errors import Conflict, InvalidMessage
from corral.ext.cache import lock
from corral.messages.base import Request
from corral.messages.cache import (
    CacheClear,
    CacheExtend,
    CacheLock,
    CacheLocked,
    CacheUnlock,
)
from corral.system import System
from tests.support import wait_until


def cache_system(backend: dict[str, Any]) -> System:
    options = {"backends": {"main": backend}}
    config = Config().replace(managers={"cache": ManagerSection(options=options)})
    return System(config, managers=[CacheManager]).start()


@pytest.fixture(params=["memory", "redis_server", "redis_cluster"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {"type": "memory"}
    topology: Any = request.getfixturevalue(request.param)
    return {"type": "redis", "url": topology.url}


@pytest.fixture
def system(backend: dict[str, Any]) -> Iterator[System]:
    with cache_system(backend) as system:
        yield system


def lock_waiters(system: System) -> int:
    health = system.health().managers["cache"].health
    assert health is not None
    waiters: int = health.metrics["lock_waiters"]
    return waiters


def test_fencing_tokens_grow_and_only_the_holder_releases(system: System) -> None:
    first = system.ask(CacheLock(name="job", ttl=30))
    assert (first.acquired, first.token) == (True, 1)
    assert system.ask(CacheLock(name="job", ttl=30)) == CacheLocked(name="job", acquired=False)
    assert system.ask(CacheUnlock(name="job", token=first.token + 1)).released is False
    assert system.ask(CacheExtend(name="job", token=first.token + 1, ttl=30)).extended is False
    assert system.ask(CacheUnlock(name="job", token=first.token)).released is True
    assert system.ask(CacheUnlock(name="job", token=first.token)).released is False
    second = system.ask(CacheLock(name="job", ttl=30))
    assert (second.acquired, second.token) == (True, 2)
    system.ask(CacheClear())  # values go; the fence does not restart
    system.ask(CacheUnlock(name="job", token=second.token))
    assert system.ask(CacheLock(name="job", ttl=30)).token == 3
    assert system.ask(CacheLock(name="other", ttl=30)).token == 1


def test_a_dead_holders_lock_expires_and_a_waiter_gets_it(system: System) -> None:
    dead = system.ask(CacheLock(name="job", ttl=0.2))  # its holder never comes back
    waited = system.ask(CacheLock(name="job", ttl=30, wait=10), timeout=15)
    assert (waited.acquired, waited.token) == (True, dead.token + 1)
    assert system.ask(CacheExtend(name="job", token=dead.token, ttl=30)).extended is False
    assert system.ask(CacheUnlock(name="job", token=dead.token)).released is False


def test_extend_keeps_the_lock(system: System) -> None:
    held = system.ask(CacheLock(name="job", ttl=0.5))
    assert system.ask(CacheExtend(name="job", token=held.token, ttl=60)).extended is True
    # Well past the first TTL the lock is still held: a waiter's wait runs out.
    late = system.ask(CacheLock(name="job", ttl=30, wait=1.0), timeout=5)
    assert late.acquired is False


def in_thread(system: System, request: CacheLock) -> Callable[[], CacheLocked]:
    answers: list[CacheLocked] = []
    thread = threading.Thread(target=lambda: answers.append(system.ask(request, timeout=30)))
    thread.start()
    wait_until(lambda: lock_waiters(system) == 1)

    def answer() -> CacheLocked:
        thread.join(30)
        (reply,) = answers
        return reply

    return answer


@pytest.mark.parametrize("topology", ["redis_server", "redis_cluster"])
def test_a_release_on_another_system_wakes_the_waiter(
    topology: str, request: pytest.FixtureRequest
) -> None:
    backend = {"type": "redis", "url": request.getfixturevalue(topology).url}
    with cache_system(backend) as one, cache_system(backend) as two:
        held = one.ask(CacheLock(name="job", ttl=60))
        # The lock lasts a minute and the wait 20 s: only the release can answer it.
        answer = in_thread(two, CacheLock(name="job", ttl=30, wait=20))
        assert one.ask(CacheUnlock(name="job", token=held.token)).released
        reply = answer()
        assert (reply.acquired, reply.token) == (True, held.token + 1)
        assert lock_waiters(two) == 0


def test_waiters_take_the_lock_in_turn(system: System) -> None:
    held = system.ask(CacheLock(name="job", ttl=60))
    first = in_thread(system, CacheLock(name="job", ttl=60, wait=20))
    assert system.ask(CacheLock(name="job", ttl=60)).acquired is False  # no wait: at once
    system.ask(CacheUnlock(name="job", token=held.token))
    assert first().token == held.token + 1


BAD_REQUESTS: tuple[Request[Any], ...] = (
    CacheLock(name="", ttl=1),
    CacheLock(name="job", ttl=0),
    CacheLock(name="job", ttl=24 * 3600 + 1),
    CacheLock(name="job", ttl=1, wait=-1),
    CacheLock(name="job", ttl=1, wait=float("nan")),
    CacheExtend(name="job", token=1, ttl=0),
    CacheUnlock(name="job", token=-1),
)


def test_bad_lock_requests_are_refused(system: System) -> None:
    for bad in BAD_REQUESTS:
        with pytest.raises(InvalidMessage):
            system.ask(bad)


def test_the_manager_refuses_bad_lock_requests_that_were_not_validated() -> None:
    config = Config().replace(
        system=SystemSection(validate=False), managers={"cache": ManagerSection()}
    )
    with System(config, managers=[CacheManager]) as system:
        for bad in BAD_REQUESTS:
            if isinstance(bad, CacheUnlock):  # a token no lock has: nothing to release
                assert system.ask(bad).released is False
                continue
            with pytest.raises(InvalidMessage):
                system.ask(bad)


def test_the_lock_helper(system: System) -> None:
    with lock(system, "job", ttl=30) as held:
        assert held.token == 1
        with pytest.raises(Conflict, match="'job' is held"), lock(system, "job", ttl=30):
            pass
        assert held.extend(30) is True
    with lock(system, "job", ttl=30) as again:  # released at the end of the block
        assert again.token == 2
