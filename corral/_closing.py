"""``with`` for the objects that close: a bus, a subscription, a client."""

from __future__ import annotations

from typing import Self

__all__ = ["Closing"]


class Closing:
    """A base whose ``with`` block ends with :meth:`close`::

    with MemoryBus() as bus:
        ...
    """

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
