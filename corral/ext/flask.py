"""Flask integration: rate limit routes through a corral System (or anything with ``ask``).

As a decorator on some views, or for the whole app with ``init_app``; either
way a refused call gets a 429 with ``Retry-After``, and every checked response
carries ``X-RateLimit-Limit / -Remaining / -Reset``::

    limit = RateLimit(system, user=lambda: flask.g.get("user_id"))

    @app.get("/search")
    @limit
    def search(): ...

    RateLimit(system).init_app(app, exempt={"health"})   # every view but ``health``

Per-view limits come on top of the configured rules, counted per client IP (or
``key``) and route, and views can be left out (Flask-Limiter's shape)::

    limiter = RateLimit(system)
    limiter.init_app(app)

    @app.post("/login")
    @limiter.limit("5/minute;100/hour", key=lambda: flask.request.form.get("email"))
    def login(): ...

    @app.get("/healthz")
    @limiter.exempt
    def healthz(): ...

A check waits at most ``timeout`` seconds (0.5 by default). When the rate limiter
cannot answer, ``fail_open`` decides (let the request through, or 503), and for
``recheck_after`` seconds later requests are decided the same way at once, without
waiting, so a dead daemon does not slow every request down.

The check names the client's IP (``request.remote_addr``), the user and the API
key (header ``X-API-Key``) when given, and the endpoint (the route's rule, such
as ``/items/<int:item_id>``), so the ``ratelimit`` manager applies every rule of
those levels in one round trip.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import flask
from flask.sessions import SessionInterface, SessionMixin
from itsdangerous import BadSignature, Signer
from werkzeug.datastructures import CallbackDict

from corral.actors.ratelimit import parse_limit
from corral.errors import NotFound, Timeout, UnavailableError
from corral.manager import Asker
from corral.messages.ratelimit import RatelimitCheck, RatelimitDecision
from corral.messages.session import (
    SessionCreate,
    SessionDestroy,
    SessionDestroyUser,
    SessionGet,
    SessionRotate,
    SessionSave,
)

__all__ = ["CorralSession", "CorralSessionInterface", "RateLimit"]

F = TypeVar("F", bound=Callable[..., Any])

Identify = Callable[[], str | None]


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
    ``timeout``: seconds a check may take, the round trip included (None: the
    system's ``ask_timeout``). When the manager cannot answer (stopped, timed out),
    ``fail_open`` lets the request through, else it is answered 503; for
    ``recheck_after`` seconds after such a failure requests are decided the same
    way without asking.
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
        timeout: float | None = 0.5,
        recheck_after: float = 2.0,
    ) -> None:
        self.system = system
        self.ip = ip
        self.user = user
        self.api_key = api_key
        self.identifiers = identifiers or {}
        self.cost = cost
        self.fail_open = fail_open
        self.timeout = timeout
        self.recheck_after = recheck_after
        self.unavailable_until = 0.0
        """Until when (monotonic) checks are decided by ``fail_open`` without asking."""

    def __call__(self, view: F) -> F:
        """Limit one view by the configured rules."""

        @functools.wraps(view)
        def limited(*args: Any, **kwargs: Any) -> Any:
            if flask.g.get("corral_ratelimit_checked"):  # init_app's hook did it already
                return view(*args, **kwargs)
            decision, refusal = self.check(*_route_limits(limited))
            if refusal is not None:
                return refusal
            response = flask.make_response(view(*args, **kwargs))
            if decision is not None:
                response.headers.update(decision.headers())
            return response

        return limited  # type: ignore[return-value]

    def limit(self, limits: str, *, key: Identify | None = None) -> Callable[[F], F]:
        """Limit one view by ``limits`` (``"10/minute"``, several joined by ``;``) on top of
        the configured rules, counted per ``key()`` (by default the client's IP) and route::

            @app.get("/search")
            @limiter.limit("10/minute;100/hour")
            def search(): ...

        A bad limit string raises ValueError here, when the view is defined.
        """
        parsed = [part.strip() for part in limits.split(";") if part.strip()]
        if not parsed:
            raise ValueError(f"expected limits like '10/minute;100/hour', got {limits!r}")
        for part in parsed:
            parse_limit(part)

        def decorate(view: F) -> F:
            limited = self(view)
            limited.corral_route_limits = (parsed, key or self.ip)  # type: ignore[attr-defined]
            return limited

        return decorate

    @staticmethod
    def exempt(view: F) -> F:
        """Leave a view out of ``init_app``'s checks::

        @app.get("/healthz")
        @limiter.exempt
        def healthz(): ...
        """
        view.corral_ratelimit_exempt = True  # type: ignore[attr-defined]
        return view

    def init_app(self, app: flask.Flask, *, exempt: Collection[str] = ()) -> None:
        """Limit every view of ``app`` except the endpoints named in ``exempt`` and the
        views marked :meth:`exempt`; views with :meth:`limit` get their limits too."""

        def before() -> flask.Response | None:
            view = app.view_functions.get(flask.request.endpoint or "")
            if flask.request.endpoint in exempt or getattr(view, "corral_ratelimit_exempt", False):
                return None
            decision, refusal = self.check(*_route_limits(view))
            flask.g.corral_ratelimit = decision
            flask.g.corral_ratelimit_checked = True
            return refusal

        def after(response: flask.Response) -> flask.Response:
            decision = flask.g.pop("corral_ratelimit", None)
            if isinstance(decision, RatelimitDecision):
                response.headers.update(decision.headers())
            return response

        app.before_request(before)
        app.after_request(after)

    def check(
        self, route_limits: list[str] | None = None, route_key: Identify | None = None
    ) -> tuple[RatelimitDecision | None, flask.Response | None]:
        """Ask about the current request: (decision, the response that refuses it or None).

        ``route_limits`` (limit strings) are counted per ``route_key()`` and route.
        """
        if time.monotonic() < self.unavailable_until:
            return self._unavailable("unavailable")
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
            route_limits=route_limits or [],
            route_key=route_key() if route_limits and route_key is not None else None,
        )
        try:
            decision = self.system.ask(message, timeout=self.timeout)
        except (UnavailableError, Timeout) as exc:
            self.unavailable_until = time.monotonic() + self.recheck_after
            return self._unavailable(exc.code)
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

    def _unavailable(self, code: str) -> tuple[None, flask.Response | None]:
        if self.fail_open:
            return None, None
        unavailable = {"error": code, "message": "rate limiter unavailable"}
        return None, flask.make_response(flask.jsonify(unavailable), 503)


def _route_limits(view: Any) -> tuple[list[str] | None, Identify | None]:
    """The limits and key :meth:`RateLimit.limit` put on a view, or (None, None)."""
    limits: tuple[list[str], Identify] | None = getattr(view, "corral_route_limits", None)
    return limits if limits is not None else (None, None)


class CorralSession(CallbackDict[str, Any], SessionMixin):
    """The session of a request under :class:`CorralSessionInterface`: a dict of the
    session's data, with its ``user`` ("" anonymous) and ``sid`` (None until saved)."""

    def __init__(
        self, data: dict[str, Any] | None = None, *, sid: str | None = None, user: str = ""
    ) -> None:
        def changed(_session: CallbackDict[str, Any]) -> None:
            self.modified = True

        super().__init__(data or {}, changed)
        self.sid = sid
        self.user = user
        self.modified = False
        self.rotate_to: str | None = None

    def rotate(self, user: str | None = None) -> None:
        """Give the session a new id when the response is saved (do it at login, against
        session fixation); with ``user``, the session becomes that user's."""
        self.rotate_to = self.user if user is None else user
        self.modified = True


class CorralSessionInterface(SessionInterface):
    """Flask sessions kept by corral's ``state`` manager (Flask-Session's shape).

    The cookie holds only the session id, signed with the app's ``secret_key``; the data
    stays on the server, with a sliding expiry of ``ttl`` seconds, and is shared by every
    process and daemon of the app::

        app.secret_key = os.environ["SECRET_KEY"]
        sessions = CorralSessionInterface(system, ttl=1800)
        app.session_interface = sessions

        @app.post("/login")
        def login():
            flask.session.rotate(user=checked_user)     # a new id for the logged-in session
            flask.session["cart"] = []

        @app.post("/logout-everywhere")
        def logout_everywhere():
            sessions.destroy_user(flask.session.user)    # every session of that user ends

    The cookie follows Flask's ``SESSION_COOKIE_*`` settings. A request with no session
    (or a tampered or ended one) gets an empty one, stored only once it holds data.
    """

    salt = "corral-session"

    def __init__(self, asker: Asker, *, ttl: float = 1800.0, timeout: float = 2.0) -> None:
        self.asker = asker
        self.ttl = ttl
        self.timeout = timeout

    def _signer(self, app: flask.Flask) -> Signer | None:
        if not app.secret_key:
            return None
        return Signer(app.secret_key, salt=self.salt, key_derivation="hmac")

    def open_session(self, app: flask.Flask, request: flask.Request) -> CorralSession | None:
        signer = self._signer(app)
        if signer is None:
            return None  # Flask's null session, which says the secret key is missing
        cookie = request.cookies.get(self.get_cookie_name(app))
        if cookie:
            try:
                sid = signer.unsign(cookie).decode()
                info = self.asker.ask(SessionGet(session_id=sid), timeout=self.timeout)
            except (BadSignature, NotFound):
                pass
            else:
                return CorralSession(info.data, sid=info.session_id, user=info.user)
        return CorralSession()

    def save_session(
        self, app: flask.Flask, session: SessionMixin, response: flask.Response
    ) -> None:
        assert isinstance(session, CorralSession)
        name, domain, path = (
            self.get_cookie_name(app), self.get_cookie_domain(app), self.get_cookie_path(app)
        )  # fmt: skip
        if not session and session.rotate_to is None:
            if session.sid is not None and session.modified:  # emptied: the session ends
                self.asker.ask(SessionDestroy(session_id=session.sid), timeout=self.timeout)
                response.delete_cookie(name, domain=domain, path=path)
            return
        if session.sid is None:
            info = self.asker.ask(
                SessionCreate(user=session.rotate_to or "", data=dict(session), ttl=self.ttl),
                timeout=self.timeout,
            )
        else:
            if session.rotate_to is not None:
                rotated = SessionRotate(session_id=session.sid, user=session.rotate_to)
                session.sid = self.asker.ask(rotated, timeout=self.timeout).session_id
            if not session.modified:
                return  # read only: the cookie stays as it is (its expiry slid on reading)
            info = self.asker.ask(
                SessionSave(session_id=session.sid, data=dict(session)), timeout=self.timeout
            )
        signer = self._signer(app)
        assert signer is not None
        response.set_cookie(
            name,
            signer.sign(info.session_id).decode(),
            max_age=int(self.ttl),
            domain=domain,
            path=path,
            httponly=self.get_cookie_httponly(app),
            secure=self.get_cookie_secure(app),
            samesite=self.get_cookie_samesite(app),
        )
        response.vary.add("Cookie")

    def destroy_user(self, user: str) -> int:
        """End every session of ``user``, in every process; the user's new generation."""
        revoked = self.asker.ask(SessionDestroyUser(user=user), timeout=self.timeout)
        return int(revoked.generation)
