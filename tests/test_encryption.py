"""Field encryption of state data: nothing readable at rest in Redis, look-ups by search
token, key rotation, and what a wrong configuration says."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from cryptography.fernet import Fernet

import corral
from corral.config import BusSection, Config, DaemonSection, ManagerSection
from corral.daemon import Daemon
from corral.encryption import PREFIX, FieldCipher
from corral.errors import ConfigError, Conflict, InvalidMessage
from corral.messages.state import (
    StateChanged,
    StateCommit,
    StateDelete,
    StateFind,
    StateGet,
    StateGetHistory,
    StateReencrypt,
    StateRegister,
    StateUpdate,
    StateWrite,
)
from corral.system import System
from tests.redis_server import RedisServer
from tests.test_state import make_system

FIRST_KEY, SECOND_KEY = Fernet.generate_key().decode(), Fernet.generate_key().decode()
SECRETS = (b"ada@example.com", b"123-45-6789", b"grace@example.com")


def options(*keys: str) -> dict[str, Any]:
    return {
        "encryption_keys": list(keys or (FIRST_KEY,)),
        "encrypted_fields": {"User": ["email", "ssn"]},
        "searchable_fields": {"User": ["email"]},
        "search_key": "a search key of its own",
    }


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def system(backend: str, redis_server: RedisServer) -> Iterator[System]:
    started = make_system(backend, redis_server.url, **options())
    yield started
    started.stop()


@contextmanager
def running(url: str, *keys: str) -> Iterator[System]:
    started = make_system("redis", url, **options(*keys))
    try:
        yield started
    finally:
        started.stop()


def dump(url: str, *, skip: bytes = b"\x00") -> bytes:
    """Every byte Redis holds (hashes, lists, streams, strings, sets), but in the keys
    whose name holds ``skip``."""
    held = []
    with redis.Redis.from_url(url) as raw:
        for key in raw.scan_iter(count=1000):
            if skip in key:
                continue
            kind = raw.type(key)
            if kind == b"hash":
                held += [k + v for k, v in raw.hgetall(key).items()]
            elif kind == b"list":
                held += raw.lrange(key, 0, -1)
            elif kind == b"stream":
                held += [repr(entry).encode() for entry in raw.xrange(key)]
            elif kind == b"string":
                held.append(raw.get(key) or b"")
            elif kind == b"zset":
                held += raw.zrange(key, 0, -1)
    return b"\n".join(held)


def test_encrypted_fields_read_back_and_are_found_without_plaintext_at_rest(
    system: System, backend: str, redis_server: RedisServer
) -> None:
    with system.subscribe("state.changed.User.*") as changes:
        data = {"email": "ada@example.com", "ssn": "123-45-6789", "plan": "pro"}
        created = system.ask(StateRegister(state_id="u1", state_type="User", data=data))
        assert created.data == data
        assert system.ask(StateGet(state_id="u1")).data == data
        event = changes.get(timeout=5)
    assert event is not None and isinstance(event.message, StateChanged)
    assert event.message.new is not None
    assert event.message.new["email"].startswith(PREFIX)  # events carry what is stored
    assert event.message.new["plan"] == "pro"

    def found(email: str) -> list[str]:
        answer = system.ask(StateFind(state_type="User", field="email", value=email))
        return [state.state_id for state in answer.states]

    assert found("ada@example.com") == ["u1"]
    assert (
        system.ask(StateFind(state_type="User", field="email", value="ada@example.com"))
        .states[0]
        .data
        == data
    )
    assert found("nobody@example.com") == []
    system.ask(StateUpdate(state_id="u1", data={**data, "email": "grace@example.com"}))
    assert found("ada@example.com") == [] and found("grace@example.com") == ["u1"]
    system.ask(StateCommit(writes=[
        StateWrite(state_id="u2", transition="create", state_type="User",
                   data={"email": "grace@example.com", "ssn": "000"}),
    ]))  # fmt: skip
    assert sorted(found("grace@example.com")) == ["u1", "u2"]
    history = system.ask(StateGetHistory(state_id="u1")).entries
    assert history[-1].old is not None and history[-1].old["email"] == "ada@example.com"
    with pytest.raises(InvalidMessage, match="not a searchable field"):
        system.ask(StateFind(state_type="User", field="ssn", value="123-45-6789"))

    if backend == "redis":
        at_rest = dump(redis_server.url)
        assert b"pro" in at_rest  # the fields not encrypted are there as they are
        assert not [secret for secret in SECRETS if secret in at_rest]
    system.ask(StateDelete(state_id="u1"))
    assert found("grace@example.com") == ["u2"]


def test_keys_rotate_with_a_new_first_key_and_a_reencryption(redis_server: RedisServer) -> None:
    url = redis_server.url
    with running(url, FIRST_KEY) as first:
        for n in range(3):
            first.ask(StateRegister(state_id=f"u{n}", state_type="User",
                                    data={"email": f"user{n}@example.com"}))  # fmt: skip
    with running(url, SECOND_KEY, FIRST_KEY) as both:
        assert both.ask(StateGet(state_id="u1")).data == {"email": "user1@example.com"}
        assert both.ask(StateReencrypt(state_type="User")).written == 3
        assert both.ask(StateReencrypt(state_type="User")).written == 0  # all under the new
    with running(url, SECOND_KEY) as second:
        assert second.ask(StateGet(state_id="u2")).data == {"email": "user2@example.com"}
        found = second.ask(StateFind(state_type="User", field="email", value="user0@example.com"))
        assert [s.state_id for s in found.states] == ["u0"]
    with (
        running(url, Fernet.generate_key().decode()) as stranger,
        pytest.raises(ConfigError, match="none of the encryption keys opens this field"),
    ):
        stranger.ask(StateGet(state_id="u0"))


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"encrypted_fields": {"User": ["email"]}}, "encrypted_fields need at least one key"),
        ({"encrypted_fields": {"User": ["email"]}, "encryption_keys": ["short"]},
         "is not a Fernet key"),
        ({**options(), "searchable_fields": {"User": ["plan"]}},
         "User.plan is searchable but not in encrypted_fields"),
        ({**options(), "search_key": ""}, "searchable_fields need a search_key"),
    ],
)  # fmt: skip
def test_a_wrong_encryption_setting_is_a_config_error(
    settings: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        make_system("memory", **settings)


def test_the_cipher_seals_opens_and_tokens_deterministically() -> None:
    cipher = FieldCipher([FIRST_KEY], search_key="k")
    sealed = cipher.seal({"email": "a@b.c", "n": 1, "tags": ["x"]}, ["email", "tags", "absent"])
    assert sealed["n"] == 1 and "absent" not in sealed
    assert sealed["email"].startswith(PREFIX) and sealed["email"] != cipher.encrypt("a@b.c")
    assert cipher.open(sealed, ["email", "tags"]) == {"email": "a@b.c", "n": 1, "tags": ["x"]}
    assert cipher.seal(sealed, ["email"]) == sealed  # sealed once, not twice
    token = cipher.search_token("User", "email", "a@b.c")
    assert token == FieldCipher([SECOND_KEY], search_key="k").search_token("User", "email", "a@b.c")
    assert token != FieldCipher([FIRST_KEY], search_key="j").search_token("User", "email", "a@b.c")
    assert not cipher.stale(sealed, ["email"])
    assert FieldCipher([SECOND_KEY, FIRST_KEY]).stale(sealed, ["email"])


def test_through_connect_against_two_daemons(redis_server: RedisServer) -> None:
    """Guards, entered-state events, encrypted fields and look-ups, from a client, with
    two daemons taking the requests."""
    order = {
        "states": ["new", "paid"],
        "initial": "new",
        "transitions": {"pay": {"source": "new", "dest": "paid", "guard": "data.amount > 0"}},
    }
    state = {**options(), "machines": {"Order": order}, "encrypted_fields": {
        "User": ["email", "ssn"], "Order": ["card"]}}  # fmt: skip
    config = Config().replace(
        bus=BusSection(backend="redis", url=redis_server.url, namespace="crypt"),
        daemon=DaemonSection(port=0),
        managers={"state": ManagerSection(options=state)},
    )
    with (
        Daemon(config),
        Daemon(config),
        corral.connect(redis_server.url, namespace="crypt") as client,
        client.subscribe("state.entered.Order.*") as entered,
    ):
        client.ask(StateRegister(state_id="u1", state_type="User",
                                 data={"email": "ada@example.com", "ssn": "1"}))  # fmt: skip
        found = client.ask(StateFind(state_type="User", field="email", value="ada@example.com"))
        assert [s.data["email"] for s in found.states] == ["ada@example.com"]
        client.ask(StateRegister(state_id="o1", state_type="Order",
                                 data={"amount": 0, "card": "4111"}))  # fmt: skip
        with pytest.raises(Conflict, match="its guard does not hold"):
            client.ask(StateUpdate(state_id="o1", transition="pay"))
        paid = client.ask(StateUpdate(state_id="o1", transition="pay",
                                      data={"amount": 5, "card": "4111"}))  # fmt: skip
        assert (paid.status, paid.data["card"]) == ("paid", "4111")
        topics = [d.topic for d in (entered.get(timeout=5), entered.get(timeout=5)) if d]
        assert topics == ["state.entered.Order.new", "state.entered.Order.paid"]
    # What the state manager keeps holds no plaintext; the run records of the requests,
    # which hold their replies until their deadline has passed (docs/state.md), do.
    at_rest = dump(redis_server.url, skip=b":ran:")
    assert not [secret for secret in (b"ada@example.com", b"4111") if secret in at_rest]
