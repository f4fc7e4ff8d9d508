"""Sessions: the state manager's session API on both backends, and corral's Flask
SessionInterface in a real Flask app served by a real server, its sessions in Redis."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import flask
import httpx
import pytest
import redis
from werkzeug.serving import make_server

import corral
from corral.config import BusSection, Config, DaemonSection, ManagerSection
from corral.daemon import Daemon
from corral.errors import Conflict, InvalidMessage, NotFound
from corral.ext.flask import CorralSession, CorralSessionInterface
from corral.messages.session import (
    SessionCreate,
    SessionDestroy,
    SessionDestroyUser,
    SessionGet,
    SessionRotate,
    SessionSave,
)
from corral.system import System
from tests.redis_server import RedisServer
from tests.support import wait_until
from tests.test_state import make_system


@pytest.fixture(params=["memory", "redis"])
def system(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[System]:
    started = make_system(request.param, redis_server.url)
    yield started
    started.stop()


def test_a_session_lives_slides_rotates_and_ends(system: System) -> None:
    created = system.ask(SessionCreate(user="ada", data={"cart": []}, ttl=60))
    assert created.session_id.startswith("session:{") and len(created.session_id) > 60
    assert (created.user, created.data, created.ttl) == ("ada", {"cart": []}, 60)
    read = system.ask(SessionGet(session_id=created.session_id))
    assert read.expires_at == created.expires_at  # most of its time left: no write
    saved = system.ask(SessionSave(session_id=created.session_id, data={"cart": [7]}))
    assert saved.data == {"cart": [7]} and saved.version == 2
    with pytest.raises(Conflict):
        system.ask(SessionSave(session_id=created.session_id, data={}, expected_version=1))

    rotated = system.ask(SessionRotate(session_id=created.session_id))
    assert rotated.session_id != created.session_id and rotated.data == {"cart": [7]}
    with pytest.raises(NotFound, match="no such session"):
        system.ask(SessionGet(session_id=created.session_id))
    anonymous = system.ask(SessionCreate(data={"theme": "dark"}))
    logged_in = system.ask(SessionRotate(session_id=anonymous.session_id, user="bob"))
    assert (logged_in.user, logged_in.data) == ("bob", {"theme": "dark"})

    assert system.ask(SessionDestroy(session_id=rotated.session_id)).destroyed
    assert not system.ask(SessionDestroy(session_id=rotated.session_id)).destroyed
    for forged in ("", "state-of-someone-else", "session:{0000}:x", logged_in.session_id + "x"):
        with pytest.raises(NotFound):
            system.ask(SessionGet(session_id=forged))
    with pytest.raises(InvalidMessage, match="ttl"):
        system.ask(SessionCreate(ttl=0.1))
    with pytest.raises(InvalidMessage, match="a user is at most 200 characters"):
        system.ask(SessionCreate(user="u" * 201))


def test_a_touch_slides_the_expiry_once_half_of_it_has_passed(system: System) -> None:
    created = system.ask(SessionCreate(user="ada", ttl=1.0))
    touched = wait_until(
        lambda: (
            (got := system.ask(SessionGet(session_id=created.session_id))).expires_at
            > created.expires_at
            and got
        ),
        timeout=5,
    )
    assert touched.version == 2 and touched.expires_at - touched.created_at > 1000
    untouched = system.ask(SessionGet(session_id=created.session_id, touch=False))
    assert untouched.expires_at == touched.expires_at


def test_ending_a_users_sessions_ends_all_of_them_and_not_later_ones(system: System) -> None:
    first = system.ask(SessionCreate(user="ada"))
    second = system.ask(SessionCreate(user="ada"))
    other = system.ask(SessionCreate(user="bob"))
    assert system.ask(SessionDestroyUser(user="ada")).generation == 1
    for ended in (first, second):
        with pytest.raises(NotFound):
            system.ask(SessionGet(session_id=ended.session_id))
    assert system.ask(SessionGet(session_id=other.session_id)).user == "bob"
    later = system.ask(SessionCreate(user="ada"))
    assert system.ask(SessionGet(session_id=later.session_id)).user == "ada"
    assert system.ask(SessionDestroyUser(user="ada")).generation == 2


# -- Flask -------------------------------------------------------------------------------


def make_app(asker: Any) -> tuple[flask.Flask, CorralSessionInterface]:
    app = flask.Flask("shop")
    app.secret_key = "flask-sessions-test-secret-key"
    sessions = CorralSessionInterface(asker, ttl=600)
    app.session_interface = sessions

    def current() -> CorralSession:
        assert isinstance(flask.session, CorralSession)
        return flask.session

    @app.get("/whoami")
    def whoami() -> dict[str, Any]:
        return {"user": current().user or None, "cart": current().get("cart", [])}

    @app.post("/cart")
    def add() -> dict[str, Any]:
        current().setdefault("cart", []).append(flask.request.args["item"])
        current().modified = True
        return {"cart": current()["cart"]}

    @app.post("/login")
    def login() -> dict[str, Any]:
        current().rotate(user=flask.request.args["user"])
        return {"ok": True}

    @app.post("/logout")
    def logout() -> dict[str, Any]:
        current().clear()
        return {"ok": True}

    @app.post("/logout-everywhere")
    def logout_everywhere() -> dict[str, Any]:
        return {"generation": sessions.destroy_user(current().user)}

    return app, sessions


@pytest.fixture
def served(redis_server: RedisServer) -> Iterator[str]:
    """The app behind a real HTTP server, its sessions in a daemon's state manager on Redis."""
    config = Config().replace(
        bus=BusSection(backend="redis", url=redis_server.url, namespace="web"),
        daemon=DaemonSection(port=0),
        managers={"state": ManagerSection()},
    )
    with Daemon(config), corral.connect(redis_server.url, namespace="web") as client:
        app, _sessions = make_app(client)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_port}"
        server.shutdown()
        thread.join(5)


def test_flask_sessions_live_in_corral_behind_a_signed_id(
    served: str, redis_server: RedisServer
) -> None:
    with httpx.Client(base_url=served) as browser, httpx.Client(base_url=served) as phone:
        assert browser.get("/whoami").json() == {"user": None, "cart": []}
        assert "session" not in browser.cookies  # nothing stored for an empty session
        browser.post("/cart", params={"item": "tea"})
        anonymous = browser.cookies["session"]
        assert "tea" not in anonymous and "." in anonymous  # an id and its signature only

        browser.post("/login", params={"user": "ada"})
        logged_in = browser.cookies["session"]
        assert logged_in != anonymous  # rotated at login
        assert browser.get("/whoami").json() == {"user": "ada", "cart": ["tea"]}
        stale = httpx.get(f"{served}/whoami", cookies={"session": anonymous}).json()
        assert stale == {"user": None, "cart": []}  # the id before the login works no more
        tampered = logged_in[:-2] + ("AA" if not logged_in.endswith("AA") else "BB")
        assert httpx.get(f"{served}/whoami", cookies={"session": tampered}).json()["user"] is None

        phone.post("/login", params={"user": "ada"})
        assert phone.get("/whoami").json()["user"] == "ada"
        with redis.Redis.from_url(redis_server.url) as raw:
            keys = list(raw.scan_iter("web:*:s:session:*"))
            stored = b"".join(raw.hget(key, "data") or b"" for key in keys)
        assert b"tea" in stored  # the cart is kept on the server

        assert phone.post("/logout-everywhere").json() == {"generation": 1}
        assert browser.get("/whoami").json() == {"user": None, "cart": []}
        assert phone.get("/whoami").json() == {"user": None, "cart": []}

        browser.post("/login", params={"user": "ada"})
        browser.post("/logout")
        assert "session" not in browser.cookies  # ended, its cookie removed
