"""Who may see the dashboard: everyone, or whoever shows ``daemon.dashboard_token``.

With a token configured (the config requires one when the daemon listens beyond
loopback), the page and every JSON endpoint it reads want the token, in the cookie
the login form sets or in an ``Authorization: Bearer`` header; it is compared in
constant time. Without a token, the daemon only listens on loopback and all may look::

    gate = TokenGate("s3cret-token-of-16+")
    app.router.add_get("/dashboard/api/daemons", gate.guard(handler))
    app.router.add_post("/dashboard/login", gate.login)

    curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8650/dashboard/api/daemons
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources

from aiohttp import web

__all__ = ["COOKIE", "PAGE_HEADERS", "TokenGate"]

COOKIE = "corral_dashboard"
"""The cookie the login form sets."""

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
"""Sent with the page and the login form: its own inline script and styles, requests to
its own daemon only, and never inside another site's frame."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@cache
def _login_page() -> str:
    return resources.files(__package__).joinpath("login.html").read_text()


class TokenGate:
    """Checks the dashboard token of each request; ``token`` empty lets every request in."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    @property
    def open(self) -> bool:
        """Whether no token is needed."""
        return not self._token

    def allows(self, request: web.Request) -> bool:
        """Whether ``request`` carries the token (in the cookie or a Bearer header)."""
        if self.open:
            return True
        scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
        shown = [request.cookies.get(COOKIE, "")]
        if scheme.lower() == "bearer":
            shown.append(bearer.strip())
        # Every candidate is compared, so that the time taken says nothing about either.
        matches = [hmac.compare_digest(candidate.encode(), self._token) for candidate in shown]
        return any(matches)

    def guard(self, handler: Handler, *, page: bool = False) -> Handler:
        """``handler`` behind the token: a JSON 401 without it, or the login form for ``page``."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            if self.allows(request):
                return await handler(request)
            if page:
                return self._form(status=401)
            return web.json_response(
                {"error": "the dashboard token is missing or wrong: log in at /"}, status=401
            )

        return guarded

    async def login(self, request: web.Request) -> web.StreamResponse:
        """``POST /dashboard/login`` (form field ``token``): set the cookie and go to the page."""
        form = await request.post()
        token = form.get("token")
        if self.open:
            raise web.HTTPSeeOther("/")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self._token):
            return self._form(status=401, problem="That token is not the dashboard's.")
        to_the_page = web.HTTPSeeOther("/")
        to_the_page.set_cookie(
            COOKIE, token, httponly=True, samesite="Strict", secure=request.secure, path="/"
        )
        raise to_the_page

    async def logout(self, _request: web.Request) -> web.StreamResponse:
        """``POST /dashboard/logout``: forget the cookie."""
        to_the_page = web.HTTPSeeOther("/")
        to_the_page.del_cookie(COOKIE, path="/")
        raise to_the_page

    @staticmethod
    def _form(*, status: int, problem: str = "") -> web.Response:
        page = _login_page().replace("{problem}", problem)
        return web.Response(
            text=page, status=status, content_type="text/html", charset="utf-8",
            headers=PAGE_HEADERS,
        )  # fmt: skip
