"""corral.ext.flask through Flask's real test client and a real System."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import flask
import pytest

import corral
from corral.actors.ratelimit import RatelimitManager
from corral.config import BusSection, Config, DaemonSection, ManagerSection
from corral.daemon import Daemon
from corral.errors import InvalidMessage
from corral.ext.flask import RateLimit
from corral.manager import Asker
from corral.messages.base import Reply, Request
from corral.messages.ratelimit import RatelimitBan, RatelimitCheck
from corral.supervisor import ChildSpec
from corral.system import System
from tests.redis_server import RedisServer

R = TypeVar("R", bound=Reply)

RULES = {
    "ip": "3/hour",
    "user": {"limit": "100/hour", "algorithm": "token_bucket"},
    "search": {"level": "ip", "limit": "1/hour", "endpoints": ["/search"]},
}


@pytest.fixture
def system(redis_server: RedisServer) -> Iterator[System]:
    options = {"backend": "redis", "redis_url": redis_server.url, "rules": RULES}
    with System(
        managers=[ChildSpec(name="ratelimit", manager=RatelimitManager, options=options)]
    ) as s:
        yield s


class CountedAsker:
    """An asker that notes the timeout of each ask it passes on."""

    def __init__(self, inner: Asker) -> None:
        self.inner = inner
        self.timeouts: list[float | None] = []

    def ask(self, message: Request[R], *, timeout: float | None = None) -> R:
        self.timeouts.append(timeout)
        return self.inner.ask(message, timeout=timeout)


def make_app(limit: RateLimit) -> flask.Flask:
    app = flask.Flask(__name__)

    @app.get("/items/<int:item_id>")
    @limit
    def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    @app.get("/free")
    def free() -> str:
        return "free"

    return app


def test_decorator_sets_headers_and_refuses_with_429(system: System) -> None:
    limit = RateLimit(system, user=lambda: flask.request.headers.get("X-User"))
    client = make_app(limit).test_client()
    for left in ("2", "1", "0"):
        response = client.get("/items/7", headers={"X-User": "ada"})
        assert response.status_code == 200 and response.json == {"item": 7}
        assert response.headers["X-RateLimit-Limit"] == "3"
        assert response.headers["X-RateLimit-Remaining"] == left
        assert int(response.headers["X-RateLimit-Reset"]) > 0
        assert "Retry-After" not in response.headers
    refused = client.get("/items/8", headers={"X-User": "ada"})
    assert refused.status_code == 429
    assert refused.json is not None and refused.json["exceeded"] == ["ip"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    # Unlimited views are untouched.
    assert "X-RateLimit-Limit" not in client.get("/free").headers


def test_init_app_limits_every_view_but_the_exempt(system: System) -> None:
    app = flask.Flask(__name__)

    @app.get("/search")
    def search() -> str:
        return "results"

    @app.get("/health")
    def health() -> str:
        return "ok"

    RateLimit(system).init_app(app, exempt={"health"})
    client = app.test_client()
    first = client.get("/search")
    assert first.status_code == 200 and first.headers["X-RateLimit-Remaining"] == "0"
    second = client.get("/search")
    assert second.status_code == 429 and second.json is not None
    assert second.json["exceeded"] == ["search"]
    for _ in range(5):
        response = client.get("/health")
        assert response.status_code == 200 and "X-RateLimit-Limit" not in response.headers


def test_banned_clients_get_429(system: System) -> None:
    system.ask(RatelimitBan(level="user", identifier="mallory", duration=30))
    limit = RateLimit(system, user=lambda: flask.request.headers.get("X-User"))
    client = make_app(limit).test_client()
    refused = client.get("/items/1", headers={"X-User": "mallory"})
    assert refused.status_code == 429 and refused.json is not None
    assert refused.json["banned"] == ["user"] and int(refused.headers["Retry-After"]) >= 29
    assert client.get("/items/1", headers={"X-User": "ada"}).status_code == 200


def test_an_unreachable_limiter_fails_open_or_closed() -> None:
    with System() as bare:  # no ratelimit manager: asks time out
        opened = make_app(RateLimit(bare, timeout=0.05)).test_client().get("/items/1")
        assert opened.status_code == 200 and "X-RateLimit-Limit" not in opened.headers
        closed = make_app(RateLimit(bare, timeout=0.05, fail_open=False)).test_client()
        assert closed.get("/items/1").status_code == 503


@pytest.fixture
def generous(redis_server: RedisServer) -> Iterator[System]:
    """Configured rules that never refuse in a test: what refuses is a view's own limit."""
    options = {"backend": "redis", "redis_url": redis_server.url, "rules": {"ip": "1000/hour"}}
    with System(
        managers=[ChildSpec(name="ratelimit", manager=RatelimitManager, options=options)]
    ) as s:
        yield s


def test_per_view_limits_and_exemptions_with_init_app(generous: System) -> None:
    limiter = RateLimit(generous)
    app = flask.Flask(__name__)

    @app.post("/login")
    @limiter.limit("2/minute;50/hour", key=lambda: flask.request.form.get("email"))
    def login() -> str:
        return "welcome"

    @app.get("/search")
    @limiter.limit("1/minute")
    def search() -> str:
        return "results"

    @app.get("/items")
    def items() -> str:
        return "items"

    @app.get("/healthz")
    @limiter.exempt
    def healthz() -> str:
        return "ok"

    limiter.init_app(app)
    client = app.test_client()
    for _ in range(2):
        allowed = client.post("/login", data={"email": "ada@example.com"})
        assert allowed.status_code == 200 and allowed.text == "welcome"
    refused = client.post("/login", data={"email": "ada@example.com"})
    assert refused.status_code == 429 and refused.json is not None
    assert refused.json["exceeded"] == ["route:2/60s"]
    assert refused.headers["X-RateLimit-Limit"] == "2"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(refused.headers["Retry-After"]) <= 120  # sliding window: up to 2 periods
    # Counted per key and per route: another email, another route go on.
    assert client.post("/login", data={"email": "bob@example.com"}).status_code == 200
    assert client.get("/search").status_code == 200
    assert client.get("/search").status_code == 429
    items_response = client.get("/items")  # only the configured rules
    assert items_response.status_code == 200
    assert items_response.headers["X-RateLimit-Limit"] == "1000"
    for _ in range(3):
        exempt = client.get("/healthz")
        assert exempt.status_code == 200 and "X-RateLimit-Limit" not in exempt.headers


def test_per_view_limits_without_init_app(generous: System) -> None:
    limiter = RateLimit(generous)
    app = flask.Flask(__name__)

    @app.get("/export")
    @limiter.limit("1/hour")
    def export() -> str:
        return "csv"

    client = app.test_client()
    assert client.get("/export").status_code == 200
    refused = client.get("/export")
    assert refused.status_code == 429 and refused.json is not None
    assert refused.json["exceeded"] == ["route:1/3600s"]
    with pytest.raises(ValueError, match="expected a limit"):
        limiter.limit("ten per fortnight")
    with pytest.raises(ValueError, match="expected limits"):
        limiter.limit(" ; ")
    with pytest.raises(InvalidMessage, match="route_limits"):
        generous.ask(RatelimitCheck(ip="10.0.0.1", route_limits=["often"], route_key="k"))


@pytest.mark.parametrize("fail_open", [True, False])
def test_a_dead_daemon_costs_one_short_wait_then_none(
    redis_server: RedisServer, fail_open: bool
) -> None:
    namespace = f"flask{int(fail_open)}"
    config = Config().replace(
        bus=BusSection(backend="redis", url=redis_server.url, namespace=namespace),
        daemon=DaemonSection(port=0),
        managers={
            "ratelimit": ManagerSection(
                class_path="corral.actors.ratelimit:RatelimitManager",
                options={"backend": "redis", "rules": {"ip": "1000/hour"}},
            )
        },
    )
    daemon = Daemon(config)
    daemon.start()
    with corral.connect(redis_server.url, namespace=namespace) as client:
        counted = CountedAsker(client)
        limiter = RateLimit(counted, fail_open=fail_open)
        assert limiter.timeout == 0.5
        app = make_app(limiter)
        app.config["TESTING"] = True
        browser = app.test_client()
        assert browser.get("/items/1").headers["X-RateLimit-Limit"] == "1000"
        daemon.stop(drain=False)
        first = browser.get("/items/1")
        assert counted.timeouts == [0.5, 0.5]  # the one short wait
        later = [browser.get("/items/1") for _ in range(20)]
        assert counted.timeouts == [0.5, 0.5]  # then decided without asking
        expected = 200 if fail_open else 503
        assert {r.status_code for r in [first, *later]} == {expected}
        assert all("X-RateLimit-Limit" not in r.headers for r in later)
