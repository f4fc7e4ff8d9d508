"""Redis glob patterns: which topics are patterns, and a regex that matches as Redis does."""

from __future__ import annotations

import functools
import re

__all__ = ["byte_view", "check_topic", "compile_glob", "is_pattern"]

_GLOB_CHARS = frozenset("*?[")


def is_pattern(topic: str) -> bool:
    """True when ``topic`` holds a Redis glob character (``*``, ``?`` or ``[``)."""
    return not _GLOB_CHARS.isdisjoint(topic)


@functools.lru_cache(maxsize=1024)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile a Redis glob pattern to a regex, following Redis's ``stringmatchlen``.

    ``*`` any run, ``?`` one character, ``[abc]`` ``[^a]`` ``[a-z]`` (reversed ranges
    allowed, ``]`` right after ``[`` closes an empty set, an unclosed ``[`` runs to the
    end), and a backslash makes the next character literal, also inside brackets.

    Redis matches bytes, so the regex is written over the topic's UTF-8 bytes read
    as Latin-1: for an ASCII topic (every corral topic) that is the topic itself;
    otherwise match ``topic.encode().decode("latin-1")``, as :class:`MemoryBus` does::

        compile_glob("state.changed.User.*").match("state.changed.User.42")
    """
    p = pattern.encode().decode("latin-1")
    n = len(p)
    out: list[str] = []
    i = 0
    while i < n:
        c = p[i]
        if c == "*":
            while i + 1 < n and p[i + 1] == "*":
                i += 1
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            i, bracket = _compile_bracket(p, i + 1)
            out.append(bracket)
        else:
            if c == "\\" and i + 1 < n:
                i += 1
            out.append(re.escape(p[i]))
        i += 1
    return re.compile(r"\A(?:" + "".join(out) + r")\Z", re.DOTALL)


def _compile_bracket(p: str, i: int) -> tuple[int, str]:
    """Translate the set that starts at ``p[i]`` (just after ``[``); return its last index."""
    n = len(p)
    negate = i < n and p[i] == "^"
    if negate:
        i += 1
    ranges: list[tuple[str, str]] = []
    while True:
        if i + 1 < n and p[i] == "\\":
            i += 1
            ranges.append((p[i], p[i]))
        elif i < n and p[i] == "]":
            break
        elif i >= n:
            i = n - 1  # an unclosed set ends with the pattern, as in Redis
            break
        elif i + 2 < n and p[i + 1] == "-":
            low, high = sorted((p[i], p[i + 2]))
            ranges.append((low, high))
            i += 2
        else:
            ranges.append((p[i], p[i]))
        i += 1
    members = "".join(f"\\x{ord(lo):02x}-\\x{ord(hi):02x}" for lo, hi in ranges)
    if not members:
        return i, "." if negate else "(?!)"
    return i, f"[{'^' if negate else ''}{members}]"


def byte_view(topic: str) -> str:
    """``topic`` as the regexes of :func:`compile_glob` read it (its UTF-8 bytes as Latin-1)."""
    return topic if topic.isascii() else topic.encode().decode("latin-1")


def check_topic(topic: str) -> None:
    """Refuse what cannot be published to: an empty topic, or one with glob characters."""
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"a topic must be a non-empty string, got {topic!r}")
    if is_pattern(topic):
        raise ValueError(f"cannot publish to {topic!r}: topics must not contain * ? or [")
