"""Bounded input: timeouts of the API, and (below) extreme field values for every request."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import pytest

import corral
from corral.errors import InvalidMessage
from corral.messages.cache import CacheGet
from corral.messages.system import Ping, Pong
from corral.system import System
from tests.redis_server import RedisServer

BAD_TIMEOUTS = [math.inf, -math.inf, math.nan, -1, -0.5, 86_400.5, 2**70, 1e308]


@pytest.fixture
def plain() -> Iterator[System]:
    with System() as system:
        yield system


# -- timeouts of the API ----------------------------------------------------------------


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS)
def test_system_refuses_a_timeout_it_cannot_wait(plain: System, timeout: float) -> None:
    with pytest.raises(InvalidMessage, match=r"^timeout: must be >= 0 and <= 86400 s, got "):
        plain.ask(Ping(), timeout=timeout)

    async def asked() -> Any:
        return await plain.ask_async(Ping(), timeout=timeout)

    with pytest.raises(InvalidMessage, match=r"^timeout: must be >= 0 and <= 86400 s"):
        asyncio.run(asked())
    with pytest.raises(InvalidMessage, match=r"^timeout: "):
        plain.health(timeout=timeout)
    with pytest.raises(InvalidMessage, match=r"^timeout: "):
        plain.dispatch(Ping(), None, timeout=timeout)
    assert plain.ask(Ping(payload=b"x"), timeout=86_400) == Pong(payload=b"x")
    assert plain.health().managers["system"].restarts == 0


def test_system_takes_a_whole_number_of_seconds_and_zero(plain: System) -> None:
    assert plain.ask(Ping(payload=b"i"), timeout=3) == Pong(payload=b"i")
    with pytest.raises(corral.errors.ManagerUnavailable):  # nothing serves the cache here
        plain.ask(CacheGet(key="k"), timeout=0)


def test_client_refuses_a_timeout_it_cannot_wait(redis_server: RedisServer) -> None:
    for timeout in (math.inf, math.nan, 0, -1):
        with pytest.raises(InvalidMessage, match=r"^ask_timeout: must be > 0 and <= 86400 s"):
            corral.connect(redis_server.url, ask_timeout=timeout)
    with corral.connect(redis_server.url, namespace="bounds") as client:
        for timeout in BAD_TIMEOUTS:
            with pytest.raises(InvalidMessage, match=r"^timeout: must be >= 0 and <= 86400 s"):
                client.ask(Ping(), timeout=timeout)

            async def asked(value: float = timeout) -> Any:
                return await client.ask_async(Ping(), timeout=value)

            with pytest.raises(InvalidMessage, match=r"^timeout: "):
                asyncio.run(asked())
        assert not client._pending  # nothing was sent, nothing waits
