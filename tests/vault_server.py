"""A fake HashiCorp Vault on a free loopback port: the endpoints hvac calls, and no more.

::

    with VaultServer() as vault:
        token = vault.add_token(ttl=60)
        vault.put("secret/corral", {"jwt_secret": "hunter2"})
        source = VaultSource(VaultSection(url=vault.url, token=token))
        source.resolve("vault:secret/corral#jwt_secret")     # 'hunter2'
        vault.count("GET", "/v1/secret/data/corral")          # 1

Endpoints, as Vault answers them:

- ``GET /v1/auth/token/lookup-self`` and ``POST /v1/auth/token/renew-self``;
- ``POST /v1/auth/approle/login`` with ``{"role_id", "secret_id"}``;
- ``GET /v1/<mount>/data/<path>``: a KV v2 read.

Every request but the login needs a live token in ``X-Vault-Token``; an unknown
or expired one gets 403, as from Vault. Errors are JSON ``{"errors": [...]}``:
403 ``permission denied`` (wrapped the way Vault wraps it), 404 with no errors
for a missing secret, 404 ``no handler for route`` off the mounts, 400 for a bad
AppRole login or a token that cannot be renewed. Time can be moved forward with
:meth:`VaultServer.advance`, to expire tokens without waiting.
"""

from __future__ import annotations

import functools
import itertools
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

PERMISSION_DENIED = "1 error occurred:\n\t* permission denied\n\n"
"""Vault's 403 for a policy that does not allow the path."""


@dataclass
class Token:
    ttl: int
    """Seconds granted at creation and by each renewal; 0 never expires."""
    renewable: bool
    expires: float | None


@dataclass
class Role:
    secret_id: str
    ttl: int
    renewable: bool


class VaultServer:
    """The fake Vault, serving from a thread until :meth:`stop` (or the ``with`` block ends).

    The mount ``secret`` exists from the start; :meth:`put` makes the mount its
    path starts with unless :meth:`add_mount` made a longer one. ``requests``
    records every request as (method, path).
    """

    def __init__(self) -> None:
        self.mounts = {"secret"}
        self.secrets: dict[str, tuple[dict[str, Any], int]] = {}
        self.tokens: dict[str, Token] = {}
        self.roles: dict[str, Role] = {}
        self.forbidden: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self._offset = 0.0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, self))
        # A short poll interval, so that stop() returns at once.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.01,), daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def now(self) -> float:
        return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the server's clock forward: tokens expire as if that much time had passed."""
        self._offset += seconds

    def add_mount(self, mount: str) -> None:
        self.mounts.add(mount)

    def put(self, path: str, data: dict[str, Any], *, lease: int = 0) -> None:
        """Write a secret (``secret/corral``); ``lease`` is the lease_duration reads get."""
        if not any(path.startswith(f"{mount}/") for mount in self.mounts):
            self.mounts.add(path.partition("/")[0])
        self.secrets[path] = (data, lease)

    def forbid(self, path: str) -> None:
        """Answer 403 for reads of ``path``, as for a policy that does not allow it."""
        self.forbidden.add(path)

    def allow(self, path: str) -> None:
        """Serve reads of ``path`` again after :meth:`forbid`."""
        self.forbidden.discard(path)

    def add_token(self, *, ttl: int = 0, renewable: bool = True) -> str:
        """A new token: it expires ``ttl`` seconds from now, or never with 0."""
        token = f"hvs.token{next(self._ids)}"
        self.tokens[token] = Token(ttl, renewable, self._expiry(ttl))
        return token

    def add_approle(
        self, role_id: str, secret_id: str, *, ttl: int = 3600, renewable: bool = True
    ) -> None:
        """An AppRole whose logins get tokens with ``ttl`` and ``renewable``."""
        self.roles[role_id] = Role(secret_id, ttl, renewable)

    def count(self, method: str, path: str) -> int:
        """How many ``method path`` requests were served (``"GET", "/v1/secret/data/x"``)."""
        return self.requests.count((method, path))

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _expiry(self, ttl: int) -> float | None:
        return self.now() + ttl if ttl > 0 else None

    def answer(
        self, method: str, path: str, token: str | None, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """The status and JSON body of Vault's answer to a request."""
        with self._lock:
            self.requests.append((method, path))
            route = path.removeprefix("/v1/")
            if (method, route) == ("POST", "auth/approle/login"):
                return self._login(body)
            live = self.tokens.get(token or "")
            if live is None or (live.expires is not None and self.now() >= live.expires):
                return 403, {"errors": ["permission denied"]}
            if (method, route) == ("GET", "auth/token/lookup-self"):
                return 200, _envelope(data={"id": token, "ttl": self._ttl(live), **_policy(live)})
            if (method, route) == ("POST", "auth/token/renew-self"):
                if not live.renewable:
                    return 400, {"errors": ["lease is not renewable"]}
                live.expires = self._expiry(live.ttl)
                return 200, _envelope(auth=_auth(token or "", live))
            if method == "GET":
                return self._read(route)
            return 405, {"errors": []}

    def _ttl(self, token: Token) -> int:
        return 0 if token.expires is None else max(0, round(token.expires - self.now()))

    def _login(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        role = self.roles.get(body.get("role_id", ""))
        if role is None or body.get("secret_id") != role.secret_id:
            return 400, {"errors": ["invalid role or secret ID"]}
        token = self.add_token(ttl=role.ttl, renewable=role.renewable)
        return 200, _envelope(auth=_auth(token, self.tokens[token]))

    def _read(self, route: str) -> tuple[int, dict[str, Any]]:
        mounts = [m for m in self.mounts if route.startswith(f"{m}/data/")]
        if not mounts:
            return 404, {"errors": [f'no handler for route "{route}". route entry not found.']}
        mount = max(mounts, key=len)
        path = f"{mount}/{route.removeprefix(f'{mount}/data/')}"
        if path in self.forbidden:
            return 403, {"errors": [PERMISSION_DENIED]}
        if path not in self.secrets:
            return 404, {"errors": []}
        data, lease = self.secrets[path]
        metadata = {"created_time": "2026-01-01T00:00:00Z", "deletion_time": "", "version": 1}
        return 200, _envelope(data={"data": data, "metadata": metadata}, lease_duration=lease)


def _policy(token: Token) -> dict[str, Any]:
    return {"renewable": token.renewable, "policies": ["default", "corral"]}


def _auth(token: str, record: Token) -> dict[str, Any]:
    return {"client_token": token, "lease_duration": record.ttl, **_policy(record)}


def _envelope(*, data: Any = None, auth: Any = None, lease_duration: int = 0) -> dict[str, Any]:
    return {
        "request_id": "00000000-0000-0000-0000-000000000000",
        "lease_id": "",
        "renewable": False,
        "lease_duration": lease_duration,
        "data": data,
        "wrap_info": None,
        "warnings": None,
        "auth": auth,
    }


class _Handler(BaseHTTPRequestHandler):
    def __init__(self, vault: VaultServer, *args: Any) -> None:
        self.vault = vault
        super().__init__(*args)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else {}
        status, answer = self.vault.answer(
            self.command, urlsplit(self.path).path, self.headers.get("X-Vault-Token"), body
        )
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``VaultServer.requests`` instead."""
