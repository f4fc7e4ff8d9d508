"""corral.ext.flask through Flask's real test client and a real System."""

from __future__ import annotations

from collections.abc import Iterator

import flask
import pytest

from corral.actors.ratelimit import RatelimitManager
from corral.ext.flask import RateLimit
from corral.messages.ratelimit import RatelimitBan
from corral.supervisor import ChildSpec
from corral.system import System
from tests.redis_server import RedisServer

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
