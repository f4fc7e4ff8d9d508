"""The Vault config source: KV v2 secrets as the top layer, and ``vault:<path>#<key>`` references.

``load_config`` builds a :class:`VaultSource` by itself when ``vault.url`` is set
(in the environment or the file) and reads it last, above the file. A daemon that
wants the token and the leased secrets kept fresh builds its own, so as to hold
on to it::

    base = load_config("corral.toml", sources=[])      # defaults, environment, file
    vault = VaultSource(base.vault)                     # token or AppRole, from [vault]
    config = load_config("corral.toml", sources=[vault])
    vault.resolve("vault:secret/corral#jwt_secret")     # 'hunter2', from the cache
    vault.start_refresher()     # renews the token and leased secrets at 2/3 of their TTL
    ...
    vault.close()

A path is ``<mount>/<path>``: the mount is ``vault.mount`` when the path starts
with it (a mount may hold slashes, as ``kv/prod`` does), else its first segment.
So ``vault:secret/corral#jwt_secret`` is key ``jwt_secret`` of the secret
``corral`` on the KV v2 mount ``secret``. ``vault.config_path``, when set, names
a secret whose keys are dotted settings (``bus.url``, ``managers.auth.issuer``):
that secret is the layer :meth:`VaultSource.values` returns.

Every secret is read once and cached. The token (when its TTL is not zero) and
secrets that come with a lease are renewed or read again once two thirds of
their TTL have passed: by :meth:`VaultSource.refresh`, which the refresher thread
calls, and on use when a refresh is overdue. A secret that cannot be read raises
:class:`~corral.errors.ConfigError` saying which path, which key and what Vault
said: ``vault: cannot read secret/corral#jwt_secret: Vault said 404 (no such secret)``.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from corral.config._sections import VaultSection
from corral.errors import ConfigError

if TYPE_CHECKING:  # hvac (and requests under it) load with the first VaultSource
    import hvac
    import hvac.exceptions

log = logging.getLogger(__name__)

SCHEME = "vault:"
RENEW_AFTER = 2 / 3
"""The share of a TTL or lease after which the token is renewed, or the secret read again."""


@functools.cache
def _statuses() -> dict[type[hvac.exceptions.VaultError], tuple[int, str]]:
    """What hvac's exception for an HTTP status stands for: the status, and what to say when
    Vault gave no reason (as it does for a missing secret)."""
    import hvac.exceptions as errors  # noqa: PLC0415 - hvac loads when Vault is used

    return {
        errors.InvalidRequest: (400, "invalid request"),
        errors.Unauthorized: (401, "unauthorized"),
        errors.Forbidden: (403, "permission denied"),
        errors.InvalidPath: (404, "no such secret"),
        errors.RateLimitExceeded: (429, "rate limit exceeded"),
        errors.InternalServerError: (500, "internal server error"),
        errors.VaultNotInitialized: (501, "Vault is not initialized"),
        errors.BadGateway: (502, "bad gateway"),
        errors.VaultDown: (503, "Vault is sealed or down"),
    }


_MULTI_ERROR_HEAD = re.compile(r"^\d+ errors? occurred:$")
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^\"')]+)")


@dataclass
class _Secret:
    data: dict[str, Any]
    due: float | None
    """When to read it again (on the source's clock); None without a lease."""


class VaultSource:
    """A :class:`~corral.config.ConfigSource` backed by HashiCorp Vault's KV v2 engine.

    ``section`` holds the URL and credentials (``vault.token``, or ``vault.role_id``
    and ``vault.secret_id`` for AppRole); nothing is sent to Vault before the first
    :meth:`values` or :meth:`resolve`. ``clock`` is for tests. Safe to use from
    several threads.
    """

    name = "vault"

    def __init__(
        self, section: VaultSection, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not section.url:
            raise ConfigError("vault: vault.url is not set", {"source": self.name})
        self.section = section
        self._clock = clock
        # The condition's lock guards the client, the cache and the schedule; the refresher
        # waits on it until the next renewal is due or the schedule changes.
        self._changed = threading.Condition(threading.RLock())
        import hvac  # noqa: PLC0415 - hvac (and requests) load when Vault is used

        self._client = hvac.Client(  # type: ignore[no-untyped-call]
            url=section.url,
            token=section.token,
            timeout=section.timeout,
            verify=section.ca_cert or section.verify,
        )
        self._logged_in = False
        self._token_due: float | None = None
        self._secrets: dict[str, _Secret] = {}
        self._refresher: threading.Thread | None = None
        self._closed = False

    def values(self) -> dict[str, dict[str, Any]]:
        """The settings in the ``vault.config_path`` secret, as sections; {} when it is not set.

        A key ``bus.url`` becomes ``{"bus": {"url": ...}}`` and ``managers.auth.issuer``
        becomes ``{"managers": {"auth": {"issuer": ...}}}``.
        """
        path = self.section.config_path
        if not path:
            return {}
        what = f"{path} (vault.config_path)"
        layer: dict[str, dict[str, Any]] = {}
        for key, value in self._read(path, what).items():
            size = 3 if key.startswith("managers.") else 2
            parts = key.split(".", size - 1)
            if len(parts) != size or not all(parts):
                raise ConfigError(
                    f"vault: {what}: key {key!r} is not a dotted setting "
                    "such as bus.url or managers.<name>.<key>",
                    {"source": self.name, "path": path, "key": key},
                )
            table = layer.setdefault(parts[0], {})
            if size == 3:
                table = table.setdefault(parts[1], {})
            table[parts[-1]] = value
        return layer

    def resolve(self, reference: str) -> Any | None:
        """The value ``vault:<path>#<key>`` refers to; None for a reference of another scheme."""
        if not reference.startswith(SCHEME):
            return None
        target = reference.removeprefix(SCHEME)
        path, _, key = target.partition("#")
        if not key:
            raise ConfigError(
                f"vault: {reference!r}: expected vault:<mount>/<path>#<key>",
                {"source": self.name, "reference": reference},
            )
        data = self._read(path, target)
        if key not in data:
            raise ConfigError(
                f"vault: cannot read {target}: key {key!r} not in {path} "
                f"(keys: {', '.join(sorted(data)) or 'none'})",
                {"source": self.name, "path": path, "key": key},
            )
        return data[key]

    def forget_secrets(self) -> None:
        """Drop the secrets read so far: the next :meth:`values` or :meth:`resolve` reads
        them from Vault again (the token is kept)."""
        with self._changed:
            self._secrets.clear()
            self._changed.notify_all()

    def refresh(self) -> float | None:
        """Renew the token and read leased secrets again, those that are due.

        Returns the seconds until the next renewal is due, or None when none ever is
        (a token without TTL, no leased secret). Raises :class:`ConfigError` as
        :meth:`resolve` does.
        """
        with self._changed:
            now = self._clock()
            if self._token_due is not None and now >= self._token_due:
                self._renew_token()
            for path, secret in list(self._secrets.items()):
                if secret.due is not None and now >= secret.due:
                    self._fetch(path, path)
            dues = [s.due for s in self._secrets.values() if s.due is not None]
            if self._token_due is not None:
                dues.append(self._token_due)
            return max(0.0, min(dues) - self._clock()) if dues else None

    def start_refresher(self, *, retry: float = 5.0) -> None:
        """Call :meth:`refresh` from a daemon thread whenever something is due, until closed.

        A failed refresh is logged and tried again after ``retry`` seconds.
        """
        with self._changed:
            if self._refresher is None and not self._closed:
                self._refresher = threading.Thread(
                    target=self._refresh_until_closed,
                    args=(retry,),
                    name="corral-vault",
                    daemon=True,
                )
                self._refresher.start()

    def close(self) -> None:
        """Stop the refresher and close the connection to Vault."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            refresher = self._refresher
        if refresher is not None:
            refresher.join()
        with self._changed:
            self._client.adapter.close()

    def _refresh_until_closed(self, retry: float) -> None:
        with self._changed:
            while not self._closed:
                try:
                    delay = self.refresh()
                except ConfigError as exc:
                    log.warning("%s (trying again in %g s)", exc.message, retry)
                    delay = retry
                if not self._closed:
                    self._changed.wait(delay)

    def _read(self, path: str, what: str) -> dict[str, Any]:
        """The data of the secret at ``path``: cached, else read; ``what`` names it in errors."""
        with self._changed:
            secret = self._secrets.get(path)
            if secret is None or (secret.due is not None and self._clock() >= secret.due):
                secret = self._fetch(path, what)
            return secret.data

    def _fetch(self, path: str, what: str) -> _Secret:
        mount, sub = self._split(path, what)
        self._ensure_token()
        response = self._call(
            f"cannot read {what}",
            lambda: self._client.secrets.kv.v2.read_secret_version(
                sub, mount_point=mount, raise_on_deleted_version=True
            ),
        )
        lease = response.get("lease_duration") or 0
        due = self._clock() + lease * RENEW_AFTER if lease > 0 else None
        secret = _Secret(dict(response["data"]["data"]), due)
        self._secrets[path] = secret
        self._changed.notify_all()
        return secret

    def _split(self, path: str, what: str) -> tuple[str, str]:
        """``path`` as (mount, path on the mount)."""
        mount = self.section.mount
        if path.startswith(f"{mount}/"):
            return mount, path.removeprefix(f"{mount}/")
        mount, _, sub = path.partition("/")
        if not (mount and sub):
            raise ConfigError(
                f"vault: {what}: expected <mount>/<path>, such as secret/corral",
                {"source": self.name, "path": path},
            )
        return mount, sub

    def _ensure_token(self) -> None:
        """Log in (AppRole) or look the token up, the first time; renew it when overdue."""
        if not self._logged_in:
            if self.section.role_id:
                self._approle_login()
            else:
                data = self._call(
                    f"token lookup at {self.section.url} failed",
                    self._client.auth.token.lookup_self,
                )["data"]
                self._schedule_token(data["ttl"], data["renewable"])
            self._logged_in = True
        elif self._token_due is not None and self._clock() >= self._token_due:
            self._renew_token()

    def _approle_login(self) -> None:
        auth = self._call(
            f"AppRole login at {self.section.url} failed",
            lambda: self._client.auth.approle.login(
                role_id=self.section.role_id, secret_id=self.section.secret_id
            ),
        )["auth"]
        self._schedule_token(auth["lease_duration"], auth["renewable"])

    def _renew_token(self) -> None:
        """Renew the token; with AppRole, log in again when it cannot be renewed."""
        approle = bool(self.section.role_id)
        try:
            auth = self._call(
                f"token renewal at {self.section.url} failed",
                self._client.auth.token.renew_self,
            )["auth"]
        except ConfigError as exc:
            if not approle:
                raise
            log.info("%s; logging in again", exc.message)
            self._approle_login()
            return
        log.info("vault: renewed the token for %d s", auth["lease_duration"])
        self._schedule_token(auth["lease_duration"], auth["renewable"])

    def _schedule_token(self, ttl: int, renewable: bool) -> None:
        # An AppRole token that cannot be renewed is replaced by logging in again.
        renews = ttl > 0 and (renewable or bool(self.section.role_id))
        if ttl > 0 and not renews:
            log.warning("vault: the token is not renewable and expires in %d s", ttl)
        self._token_due = self._clock() + ttl * RENEW_AFTER if renews else None
        self._changed.notify_all()

    def _call(self, failed: str, request: Callable[[], Any]) -> Any:
        """``request()``, its failures as ConfigError: ``vault: <failed>: Vault said 403 (...)``."""
        import hvac.exceptions  # noqa: PLC0415 - loaded with the client already

        try:
            return request()
        except hvac.exceptions.VaultError as exc:
            raise ConfigError(
                f"vault: {failed}: {_said(exc)}", {"source": self.name, "url": self.section.url}
            ) from exc
        except OSError as exc:  # requests' errors: refused, timed out, unknown host, TLS
            raise ConfigError(
                f"vault: cannot reach Vault at {self.section.url}: {self._reason(exc)}",
                {"source": self.name, "url": self.section.url},
            ) from exc

    def _reason(self, exc: OSError) -> str:
        text = str(exc)
        if "timed out" in text.lower():
            return f"no answer within {self.section.timeout:g} s"
        found = _ERRNO.search(text)
        return found.group(1).strip() if found else text


def _said(exc: hvac.exceptions.VaultError) -> str:
    """What Vault answered: ``Vault said 403 (permission denied)``."""
    # Vault wraps its reasons as "1 error occurred:\n\t* permission denied\n\n".
    reasons = [
        line.strip().removeprefix("* ")
        for error in exc.errors or []
        for line in str(error).splitlines()
        if line.strip() and not _MULTI_ERROR_HEAD.match(line.strip())
    ]
    # hvac keeps no status for the statuses it has no exception of its own for.
    status, default = _statuses().get(type(exc), (None, str(exc.args[0] or "no reason given")))
    reason = "; ".join(reasons) or default
    return f"Vault said {status} ({reason})" if status else f"Vault said: {reason}"
