"""Running generated code (the messages' decoders, checks and encoders) with a real filename."""

from __future__ import annotations

import linecache
from typing import Any

__all__ = ["run_generated"]


def run_generated(source: str, what: str, namespace: dict[str, Any]) -> None:
    """``exec`` generated ``source`` in ``namespace`` under a filename naming ``what``,
    with the source registered in :mod:`linecache` (as :mod:`dataclasses` does), so that
    a traceback through it shows the generated line::

        File "<corral generated message corral.messages.cache.CacheGet>", line 7, in from_wire
    """
    filename = f"<corral generated {what}>"
    lines = source.splitlines(keepends=True)
    count = 1
    while _registered(filename) not in (None, lines):  # a class of that name made again
        count += 1
        filename = f"<corral generated {what} #{count}>"
    linecache.cache[filename] = (len(source), None, lines, filename)
    exec(compile(source, filename, "exec"), namespace)


def _registered(filename: str) -> list[str] | None:
    entry = linecache.cache.get(filename)
    return None if entry is None or len(entry) < 3 else list(entry[2])
