"""Every error corral raises, and the codes they travel under on the wire.

The hierarchy::

    CorralError                      base of everything corral raises
    ├── InvalidMessage               a message failed validation (names the field path)
    ├── ConfigError                  bad configuration (names the key and where it came from)
    ├── RequestError                 a manager refused a well-formed request
    │   ├── NotFound
    │   ├── Conflict                 version or transition conflict
    │   ├── RateLimited
    │   └── Unauthorized
    ├── UnavailableError             the request could not be served right now
    │   ├── ManagerUnavailable       no live actor (crashed, restarting, stopped, no daemon)
    │   ├── BackendUnavailable       Redis or another backend is down
    │   └── Overloaded               a bounded mailbox stayed full
    └── Timeout                      no reply in time

A manager answers a request with an error by raising one of these; the error
travels as an ``ErrorReply(code, message, details)`` and is raised again, as the
same class, in the caller::

    try:
        system.ask(CacheGet(key="missing"))
    except corral.errors.NotFound as exc:
        print(exc.code, exc.details)
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BackendUnavailable",
    "ConfigError",
    "Conflict",
    "CorralError",
    "InvalidMessage",
    "ManagerUnavailable",
    "NotFound",
    "Overloaded",
    "RateLimited",
    "RequestError",
    "Timeout",
    "Unauthorized",
    "UnavailableError",
    "error_class",
]


class CorralError(Exception):
    """Base class of every corral error.

    ``code`` is the stable wire name of the error; ``details`` is a map of
    msgpack-encodable values that explains it.
    """

    code: ClassVar[str] = "error"

    def __init__(self, message: str = "", details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.details))


class InvalidMessage(CorralError):
    """A message failed validation; ``path`` names the field (``b.ttl``)."""

    code = "invalid_message"

    def __init__(
        self, message: str = "", details: dict[str, Any] | None = None, *, path: str = ""
    ) -> None:
        details = dict(details or {})
        path = path or details.get("path", "")
        if path:
            details["path"] = path
        super().__init__(message, details)
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(CorralError):
    """Bad configuration: unknown key, wrong type, unreadable source."""

    code = "config_error"


class RequestError(CorralError):
    """A manager understood the request and refused it."""

    code = "request_error"


class NotFound(RequestError):
    code = "not_found"


class Conflict(RequestError):
    code = "conflict"


class RateLimited(RequestError):
    code = "rate_limited"


class Unauthorized(RequestError):
    code = "unauthorized"


class UnavailableError(CorralError):
    """The request could not be served now; trying again later may work."""

    code = "unavailable"


class ManagerUnavailable(UnavailableError):
    code = "manager_unavailable"


class BackendUnavailable(UnavailableError):
    code = "backend_unavailable"


class Overloaded(UnavailableError):
    code = "overloaded"


class Timeout(CorralError):
    code = "timeout"


def _all_subclasses(cls: type[CorralError]) -> list[type[CorralError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_subclasses(sub))
    return found


def error_class(code: str) -> type[CorralError]:
    """The error class for a wire code; unknown codes map to :class:`CorralError`.

    >>> error_class("not_found") is NotFound
    True
    """
    # Scanned on each call so that error classes defined by embedding services count too.
    for cls in _all_subclasses(CorralError):
        if cls.code == code:
            return cls
    return CorralError
