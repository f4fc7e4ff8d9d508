"""Config values: checking them against field types, parsing text, masking secrets."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

HIDDEN = "***"

_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})
_SECRET_NAME = re.compile(r"secret|password|passwd|token|(^|_)keys?$", re.IGNORECASE)


class Text(str):
    """Text from the environment or a secret store where any value may go: a manager's option.

    The manager's ``Options`` parse it as the option's declared type, the way environment
    values are parsed for the sections (``"120"`` for an int is 120). ``origin`` says where
    it came from (``vault``); a ``secret`` one is not repeated in error messages.
    """

    origin: str
    secret: bool

    def __new__(cls, value: str, origin: str = "", *, secret: bool = False) -> Text:
        text = super().__new__(cls, value)
        text.origin = origin
        text.secret = secret
        return text


class Mismatch(Exception):
    """A value does not fit a type; ``path`` locates the culprit inside the value (``[1]``)."""

    def __init__(self, expected: str, got: str, path: str = "") -> None:
        super().__init__(f"expected {expected}, got {got}")
        self.expected = expected
        self.got = got
        self.path = path

    @property
    def problem(self) -> str:
        return f"expected {self.expected}, got {self.got}"


def describe(tp: Any) -> str:
    """``tp`` as a config user reads it: ``int``, ``list[str]``, ``one of 'a', 'b'``."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in get_args(tp))
    if _is_union(origin):
        return " or ".join("None" if arg is type(None) else describe(arg) for arg in get_args(tp))
    if origin is list:
        return f"list[{describe(get_args(tp)[0])}]"
    if origin is dict:
        return "table"
    if tp is Any:
        return "any value"
    return str(tp.__name__)


def split_list(text: str) -> list[str]:
    """A comma-separated environment value as a list: ``"a, b"`` -> ``["a", "b"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def convert(tp: Any, value: Any, *, text: bool = False) -> Any:
    """``value`` checked against ``tp`` and normalised (int -> float, fresh lists and dicts).

    With ``text``, strings are parsed the way environment variables are: numbers,
    ``true/false/yes/no/1/0``, comma-separated lists. Raises :class:`Mismatch`.
    """
    origin = get_origin(tp)
    if tp is Any:
        return value
    if _is_union(origin):
        if value is None and type(None) in get_args(tp):
            return None
        # Sections only use optional unions (``float | None``): one type besides None.
        (inner,) = (arg for arg in get_args(tp) if arg is not type(None))
        return convert(inner, value, text=text)
    if origin is Literal:
        if isinstance(value, str) and value in get_args(tp):
            return value
        raise Mismatch(describe(tp), repr(value) if isinstance(value, str) else _kind(value))
    if origin is list:
        if text and isinstance(value, str):
            value = split_list(value)
        if not isinstance(value, list):
            raise Mismatch(describe(tp), _got(value, text))
        (item_type,) = get_args(tp)
        items = []
        for index, item in enumerate(value):
            try:
                items.append(convert(item_type, item, text=text))
            except Mismatch as exc:
                raise Mismatch(exc.expected, exc.got, f"[{index}]{exc.path}") from None
        return items
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
            raise Mismatch(describe(tp), _got(value, text))
        return dict(value)
    if text and isinstance(value, str) and tp is not str:
        return _parse(tp, value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise Mismatch(describe(tp), _got(value, text))


def _parse(tp: type, text: str) -> Any:
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise Mismatch("bool (true/false, yes/no, 1/0)", repr(text))
    try:
        return tp(text)
    except ValueError:
        raise Mismatch(describe(tp), repr(text)) from None


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def _got(value: Any, text: bool) -> str:
    return repr(value) if text and isinstance(value, str) else _kind(value)


def _kind(value: Any) -> str:
    return "table" if isinstance(value, Mapping) else type(value).__name__


def hide(value: Any) -> Any:
    """A secret as shown: ``***``, or one ``***`` per item of a list. An empty one is shown
    as it is: that a secret is not set is no secret, and ``corral config check`` then
    prints a config that loads back."""
    if isinstance(value, list):
        return [HIDDEN] * len(value)
    return HIDDEN if value else value


def mask(value: Any) -> Any:
    """``value`` as plain data safe to print: URL passwords and secret-named keys hidden.

    A key counts as secret-named when it mentions secret, password, passwd or
    token, or ends in ``key``/``keys`` (``api_key``, ``signing_keys``).
    """
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, list):
        return [mask(item) for item in value]
    if isinstance(value, Mapping):
        return {
            key: hide(item) if _SECRET_NAME.search(str(key)) else mask(item)
            for key, item in value.items()
        }
    return value


def mask_url(text: str) -> str:
    """``text`` with the password of a URL replaced: ``redis://:***@host:6379/0``."""
    try:
        parts = urlsplit(text)
    except ValueError:
        # Not parseable, so its password cannot be located: hide the whole string.
        return HIDDEN if "@" in text else text
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return text
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{HIDDEN}@{host}"))
