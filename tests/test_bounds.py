"""Bounded input: timeouts of the API, and (below) extreme field values for every request."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import math
import reprlib
import types
import typing
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import pytest
import redis

import corral
from corral.actors import BUILTIN
from corral.client import Client
from corral.config import BusSection, Config, DaemonSection, ManagerSection, SystemSection
from corral.daemon import Daemon
from corral.errors import (
    BackendUnavailable,
    Conflict,
    InvalidMessage,
    ManagerUnavailable,
    RequestError,
    Timeout,
)
from corral.messages import Message, registered
from corral.messages.auth import AuthApiKeyCreate, AuthIssue, AuthRefresh
from corral.messages.base import MAX_TIMEOUT, MAX_TTL
from corral.messages.cache import CacheGet, CacheGetOrLease, CacheSet, CacheSetMany
from corral.messages.pool import HttpRequest
from corral.messages.ratelimit import RatelimitBan, RatelimitCheck
from corral.messages.state import StateRegister
from corral.messages.system import HealthCheck, Ping, Pong, Reconfigure
from corral.messages.transaction import TransactionBegin, TransactionSavepoint
from corral.messages.websocket import WsAttach, WsJoinRoom
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


# -- every request, every field, extreme values -----------------------------------------

MIB = "x" * (1 << 20)


def deep(levels: int) -> Any:
    """Lists and maps nested ``levels`` deep."""
    value: Any = "leaf"
    for level in range(levels):
        value = [value] if level % 2 else {"d": value}
    return value


FLOATS: list[Any] = [math.inf, -math.inf, math.nan, 1e308, -1e308, -1.0, 0.0, 5e-324, 2**64]
INTS: list[Any] = [2**63, 2**64, -(2**63) - 1, 99999999999999999999999, 2**63 - 1, -(2**63), -1, 0]
STRS: list[Any] = ["", MIB, "*?[\x00]\r\n", "ключ 🙂"]
ANYS: list[Any] = [
    None, math.inf, math.nan, -1e308, 2**64, -(2**63) - 1, MIB, MIB.encode(),
    deep(40), deep(3000), {"": MIB}, [[]] * 100_000,
]  # fmt: skip

REQUESTS = sorted(
    (
        c
        for c in registered().values()
        if c.kind == "request" and c.__module__.startswith("corral.")
    ),
    key=lambda cls: cls.type_name,
)


def _strip(annotation: Any) -> Any:
    return (
        typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
    )


def extremes(annotation: Any) -> list[Any]:
    """Values of this type at (and past) every edge: what a hostile caller would send."""
    annotation = _strip(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is float:
        return FLOATS
    if annotation is int:
        return INTS
    if annotation is str:
        return STRS
    if annotation is bytes:
        return [b"", MIB.encode()]
    if annotation is bool:
        return [True, False]
    if annotation is type(None):
        return [None]
    if annotation is Any:
        return ANYS
    if origin is list:
        return [[], *([item] for item in extremes(args[0]))]
    if origin is dict:
        return [{}, {MIB: baseline(args[1])}, *({"": item} for item in extremes(args[1]))]
    if origin in (typing.Union, types.UnionType):
        return [value for option in args for value in extremes(option)]
    if origin is Literal:
        return list(args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return list(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Message):
        return [annotation(**body) for _, body in variants(annotation)]
    raise AssertionError(f"no extremes for {annotation!r}")


# Values of required fields that the managers accept, so that each extreme reaches past the
# first check. ``transaction_id`` and ``token`` are filled in per case.
GOOD: dict[str, Any] = {
    "key": "k", "keys": ["k"], "values": {"k": 1}, "value": 1, "pattern": "k*", "tags": ["t"],
    "level": "ip", "identifier": "1.2.3.4", "subject": "user:1", "jti": "j", "owner": "o",
    "key_id": "0" * 16, "service": "api", "method": "call", "state_id": "s1",
    "state_type": "User", "transition": "update", "savepoint": "sp", "room": "r",
    "connection_id": "c1", "event": "e", "user": "u", "target": "cache", "lease": "",
    "expires_at": 4_000_000_000.0,
}  # fmt: skip


def baseline(annotation: Any, name: str = "") -> Any:
    if name in GOOD:
        return GOOD[name]
    annotation = _strip(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    simple = {str: "x", bytes: b"", bool: False, int: 1, float: 1.0, type(None): None}
    if annotation in simple:
        return simple[annotation]
    if annotation is Any:
        return 1
    if origin is list:
        return []
    if origin is dict:
        return {}
    if origin in (typing.Union, types.UnionType, Literal):
        return baseline(args[0])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return next(iter(annotation))
    if isinstance(annotation, type) and issubclass(annotation, Message):
        fields = {f.name: baseline(f.annotation, f.name) for f in annotation.fields_info}
        return annotation(**fields)
    raise AssertionError(f"no baseline for {annotation!r}")


def variants(cls: type[Message]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The fields of ``cls`` (required ones good): as they are, then with one field at a time
    set to an extreme."""
    good = {f.name: baseline(f.annotation, f.name) for f in cls.fields_info if f.required}
    yield "good values", dict(good)
    for f in cls.fields_info:
        for value in extremes(f.annotation):
            yield f"{f.name}={_short(value)}", {**good, f.name: value}


def _short(value: Any) -> str:
    """A case's value, short (and without recursing into a deep value)."""
    if isinstance(value, Message):
        fields = ", ".join(f"{f.name}={_short(getattr(value, f.name))}" for f in value.fields_info)
        return f"{value.type_name}({fields})"
    return reprlib.repr(value)


ALL_MANAGERS = {name: ManagerSection() for name in BUILTIN}
ALL_MANAGERS["pool"] = ManagerSection(
    options={"services": {"api": {"base_urls": ["http://127.0.0.1:9"], "retry_attempts": 1}}}
)
ALL_MANAGERS["websocket"] = ManagerSection(options={"client_publish": True})
ALL_MANAGERS["ratelimit"] = ManagerSection(
    options={"rules": {"ip": {"level": "ip", "limit": "1000/minute"}}, "ban_after": 3}
)


@pytest.fixture(scope="module")
def everything() -> Iterator[System]:
    """Every built-in manager, on memory backends."""
    with System(Config().replace(managers=ALL_MANAGERS)) as system:
        yield system


_fresh = itertools.count()


def _prepare(
    system: System | Client, cls: type[Message], fields: dict[str, Any], inside: System
) -> None:
    """Put in place what the good values name: a state, a transaction, a connection, a token.
    ``inside`` is the system itself, for what corral only sends itself (a connection)."""
    if cls is StateRegister and fields["state_id"] == "s1":  # a state of its own: no Conflict
        fields["state_id"] = f"new-{next(_fresh)}"
    elif cls.manager in ("state", "transaction"):
        with contextlib.suppress(Conflict):
            system.ask(StateRegister(state_id="s1", state_type="User"))
    if "transaction_id" in fields and fields["transaction_id"] == "x":
        transaction = system.ask(TransactionBegin()).transaction_id
        system.ask(TransactionSavepoint(transaction_id=transaction, savepoint="sp"))
        fields["transaction_id"] = transaction
    if cls is CacheGetOrLease and fields["key"] == "k":  # a key of its own: no wait for a lease
        fields["key"] = f"lease-{next(_fresh)}"
    if cls.manager == "websocket":
        inside.ask(WsAttach(connection_id="c1", user="u", expires_at=4_000_000_000.0))
        system.ask(WsJoinRoom(room="r", connection_id="c1"))
    if "token" in fields and fields["token"] == "x":
        tokens = system.ask(AuthIssue(subject="user:1"))
        fields["token"] = tokens.refresh_token if cls is AuthRefresh else tokens.access_token


def _outcome(system: System | Client, message: Any) -> tuple[str, str]:
    """``ok``, or the code and text of the documented error the request was refused with."""
    try:
        system.ask(message, timeout=10)
    except (InvalidMessage, RequestError, BackendUnavailable, Timeout, ManagerUnavailable) as exc:
        return exc.code, exc.message
    return "ok", ""


@pytest.mark.parametrize("cls", REQUESTS, ids=lambda cls: cls.type_name)
def test_extreme_values_never_crash_a_manager(everything: System, cls: type[Message]) -> None:
    seen: dict[str, int] = {}
    for case, fields in variants(cls):
        _prepare(everything, cls, fields, everything)
        code, text = _outcome(everything, cls(**fields))
        seen[code] = seen.get(code, 0) + 1
        note = f"{cls.type_name} {case}: {code} {text[:200]}"
        if code == "manager_unavailable":  # only for a health check of no such manager
            assert cls in (HealthCheck, Reconfigure) and text.startswith("no manager named"), note
        restarts = {n: c.restarts for n, c in everything.health().managers.items() if c.restarts}
        assert not restarts, f"{note} restarted {restarts}"
    assert seen, cls.type_name


@pytest.fixture(scope="module")
def daemon_and_client(_shared_redis_server: RedisServer) -> Iterator[tuple[Daemon, Client]]:
    """A daemon with every built-in manager on Redis, and a client that does not validate:
    the daemon's own checks are all that stand between the input and the managers."""
    url = _shared_redis_server.url.rsplit("/", 1)[0] + "/7"  # apart from per-test flushes
    config = Config().replace(
        managers=ALL_MANAGERS,
        bus=BusSection(backend="redis", url=url, namespace="bounds"),
        daemon=DaemonSection(port=0),
    )
    with (
        Daemon(config) as daemon,
        corral.connect(url, namespace="bounds", validate_messages=False) as client,
    ):
        yield daemon, client


@pytest.mark.parametrize("cls", REQUESTS, ids=lambda cls: cls.type_name)
def test_extreme_values_through_a_daemon_never_crash_a_manager(
    daemon_and_client: tuple[Daemon, Client], cls: type[Message]
) -> None:
    daemon, client = daemon_and_client
    seen: dict[str, int] = {}
    for case, fields in variants(cls):
        _prepare(client, cls, fields, daemon.system)
        try:
            message = cls(**fields)
            client.codec.encode(message)
        except (InvalidMessage, ValueError, TypeError, OverflowError):
            continue  # msgpack cannot carry it: no daemon ever sees it
        code, text = _outcome(client, message)
        seen[code] = seen.get(code, 0) + 1
        note = f"{cls.type_name} {case}: {code} {text[:200]}"
        assert code != "manager_unavailable" or (  # a health check of no such manager
            cls in (HealthCheck, Reconfigure)
            and text.startswith(("no manager named", "no corral daemon"))
        ), note
        restarts = {n: c.restarts for n, c in daemon.system.health().managers.items() if c.restarts}
        assert not restarts, f"{note} restarted {restarts}"
    assert daemon.system.dead_letters() == []
    assert seen, cls.type_name


# -- the crashes reported, one by one -----------------------------------------------------

REPORTED: list[tuple[Any, str]] = [
    (RatelimitBan(level="ip", identifier="1.2.3.4", duration=math.inf), "duration"),
    (RatelimitBan(level="ip", identifier="1.2.3.4", duration=1e999), "duration"),
    (AuthApiKeyCreate(owner="o", ttl=math.inf), "ttl"),
    (CacheSet(key="k", value=1, ttl=math.inf), "ttl"),
    (CacheSetMany(values={"k": 1}, ttl=1e308), "ttl"),
    (CacheGetOrLease(key="lease", lease_ttl=math.inf), "lease_ttl"),
    (TransactionBegin(idle_timeout=math.inf), "idle_timeout"),
    (HttpRequest(service="api", timeout=math.nan), "timeout"),
]


@pytest.mark.parametrize("validate", [True, False], ids=["validated", "validation-off"])
def test_the_reported_crashes_are_refused(validate: bool) -> None:
    """By the schema; and by the managers themselves when ``system.validate = false``."""
    config = Config().replace(managers=ALL_MANAGERS, system=SystemSection(validate=validate))
    with System(config) as system:
        for request, path in REPORTED:
            with pytest.raises(InvalidMessage) as refused:
                system.ask(request)
            assert refused.value.path == path, request
        refused_cost = RatelimitCheck(ip="1.2.3.4", cost=99999999999999999999999)
        if validate:
            with pytest.raises(InvalidMessage, match=r"^cost: must be >= 0 and <= 1000000000"):
                system.ask(refused_cost)
        assert system.ask(CacheGetOrLease(key="lease", lease_ttl=MAX_TIMEOUT)).lease
        assert {n: c.restarts for n, c in system.health().managers.items()} == dict.fromkeys(
            system.supervisor.names, 0
        )


def test_the_longest_lifetimes_fit_in_redis(redis_server: RedisServer) -> None:
    url = redis_server.url
    managers = {
        "cache": ManagerSection(
            options={"backends": {"main": {"type": "redis", "url": url}}, "default_backend": "main"}
        ),
        "ratelimit": ManagerSection(options={"backend": "redis", "redis_url": url}),
        "auth": ManagerSection(options={"backend": "redis", "redis_url": url}),
    }
    raw = redis.Redis.from_url(url, decode_responses=True)
    with System(Config().replace(managers=managers)) as system:
        for request, path in REPORTED[:6]:
            with pytest.raises(InvalidMessage) as refused:
                system.ask(request)
            assert refused.value.path == path, request
        assert raw.dbsize() == 0  # nothing reached Redis
        system.ask(CacheSetMany(values={"far": 1, "farther": 2}, ttl=MAX_TTL))
        system.ask(CacheSet(key="tiny", value=1, ttl=5e-324))
        system.ask(RatelimitBan(level="ip", identifier="1.2.3.4", duration=MAX_TTL))
        system.ask(AuthApiKeyCreate(owner="o", ttl=MAX_TTL))
        assert system.ask(CacheGetOrLease(key="lease", lease_ttl=MAX_TIMEOUT)).lease
        lifetimes = {key: raw.pttl(key) for key in raw.scan_iter("*")}
        longest = [key for key, ms in lifetimes.items() if ms > (MAX_TTL - 60) * 1000]
        assert all(ms <= MAX_TTL * 1000 for ms in lifetimes.values()), lifetimes
        assert sum("cache:main:{far" in key for key in longest) == 2, lifetimes  # both cache keys
        assert any("ban" in key for key in longest), lifetimes
        assert any("api_key" in key for key in longest), lifetimes
        assert {n: c.restarts for n, c in system.health().managers.items()} == dict.fromkeys(
            system.supervisor.names, 0
        )
    raw.close()
