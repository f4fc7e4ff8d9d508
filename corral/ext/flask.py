"""Flask integration: rate limit routes through a corral System (or anything with ``ask``).

As a decorator on some views, or for the whole app with ``init_app``; either
way a refused call gets a 429 with ``Retry-After``, and every checked response
carries ``X-RateLimit-Limit / -Remaining / -Reset``::

    limit = RateLimit(system, user=lambda: flask.g.get("user_id"))

    @app.get("/search")
    @limit
    def search(): ...

    RateLimit(system).init_app(app, exempt={"health"})   # every view but ``health``

The check names the client's IP (``request.remote_addr``), the user and the API
key (header ``X-API-Key``) when given, and the endpoint (the route's rule, such
as ``/items/<int:item_id>``), so the ``ratelimit`` manager applies every rule of
those levels in one round trip.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Any, Protocol, TypeVar

import flask

from corral.errors import Timeout, UnavailableError
from corral.messages.base import Reply, Request
from corral.messages.ratelimit import RatelimitCheck, RatelimitDecision

__all__ = ["Asker", "RateLimit"]

R = TypeVar("R", bound=Reply)
F = TypeVar("F", bound=Callable[..., Any])

Identify = Callable[[], str | None]


class Asker(Protocol):
    """What RateLimit needs: a ``corral.System``, a ``corral.connect()`` client, ..."""

    def ask(self, message: Request[R], *, timeout: float | None = None) -> R: ...


def _remote_addr() -> str | None:
    return flask.request.remote_addr


def _api_key_header() -> str | None:
    return flask.request.headers.get("X-API-Key")


def _nobody() -> str | None:
    return None


class RateLimit:
    """Checks requests with the ``ratelimit`` manager; see the module docstring.

    ``ip``, ``user`` and ``api_key`` are called in the request context and return
    the identifier or None; ``identifiers`` gives custom levels the same way.
    When the manager cannot answer (stopped, timed out), ``fail_open`` lets the
    request through; otherwise it is answered 503.
    """

    def __init__(
        self,
        system: Asker,
        *,
        ip: Identify = _remote_addr,
        user: Identify = _nobody,
        api_key: Identify = _api_key_header,
        identifiers: dict[str, Identify] | None = None,
        cost: int = 1,
        fail_open: bool = True,
        timeout: float | None = None,
    ) -> None:
        self.system = system
        self.ip = ip
        self.user = user
        self.api_key = api_key
        self.identifiers = identifiers or {}
        self.cost = cost
        self.fail_open = fail_open
        self.timeout = timeout

    def __call__(self, view: F) -> F:
        """Limit one view."""

        @functools.wraps(view)
        def limited(*args: Any, **kwargs: Any) -> Any:
            decision, refusal = self.check()
            if refusal is not None:
                return refusal
            response = flask.make_response(view(*args, **kwargs))
            if decision is not None:
                response.headers.update(decision.headers())
            return response

        return limited  # type: ignore[return-value]

    def init_app(self, app: flask.Flask, *, exempt: Collection[str] = ()) -> None:
        """Limit every view of ``app`` except the endpoints named in ``exempt``."""

        def before() -> flask.Response | None:
            if flask.request.endpoint in exempt:
                return None
            decision, refusal = self.check()
            flask.g.corral_ratelimit = decision
            return refusal

        def after(response: flask.Response) -> flask.Response:
            decision = flask.g.pop("corral_ratelimit", None)
            if isinstance(decision, RatelimitDecision):
                response.headers.update(decision.headers())
            return response

        app.before_request(before)
        app.after_request(after)

    def check(self) -> tuple[RatelimitDecision | None, flask.Response | None]:
        """Ask about the current request: (decision, the response that refuses it or None)."""
        rule = flask.request.url_rule
        message = RatelimitCheck(
            ip=self.ip(),
            user=self.user(),
            api_key=self.api_key(),
            endpoint=rule.rule if rule is not None else flask.request.path,
            identifiers={
                level: value for level, get in self.identifiers.items() if (value := get())
            },
            cost=self.cost,
        )
        try:
            decision = self.system.ask(message, timeout=self.timeout)
        except (UnavailableError, Timeout) as exc:
            if self.fail_open:
                return None, None
            unavailable = {"error": exc.code, "message": "rate limiter unavailable"}
            return None, flask.make_response(flask.jsonify(unavailable), 503)
        if decision.allowed:
            return decision, None
        body: dict[str, Any] = {
            "error": "rate_limited",
            "exceeded": decision.exceeded,
            "banned": decision.banned,
            "retry_after": decision.retry_after,
        }
        refusal = flask.make_response(flask.jsonify(body), 429)
        refusal.headers.update(decision.headers())
        return decision, refusal
