"""The auth store kept in this process: dictionaries with expiry (the embedded default)."""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.actors.auth._store import Rotation

__all__ = ["MemoryStore"]


@dataclass
class _Family:
    current: str
    previous: str = ""
    rotated_at: float = 0.0
    revoked: bool = False


class MemoryStore:
    """The store in a process's memory. Thread-safe: actors of one namespace may share it."""

    kind = "memory"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.denied: dict[str, tuple[float, bool]] = {}
        self.families: dict[str, tuple[float, _Family]] = {}
        self.api_keys: dict[str, tuple[float, dict[str, str]]] = {}
        self.expiries: list[tuple[float, str, str]] = []  # (when, table, key): a heap

    def is_revoked(self, jti: str, family: str | None) -> bool:
        with self.lock:
            now = self.clock()
            if self._live(self.denied.get(jti), now):
                return True
            if family is None:
                return False
            entry = self.families.get(family)
            return entry is not None and self._live(entry, now) and entry[1].revoked

    def deny(self, jti: str, ttl: int) -> None:
        with self.lock:
            self._purge()
            if not self._live(self.denied.get(jti), self.clock()):  # NX: the first TTL stays
                self.denied[jti] = (self._expire("denied", jti, ttl), True)

    def is_denied(self, jti: str) -> bool:
        with self.lock:
            return self._live(self.denied.get(jti), self.clock())

    def start_family(self, family: str, jti: str, ttl: int) -> None:
        with self.lock:
            self._purge()
            self.families[family] = (self._expire("families", family, ttl), _Family(current=jti))

    def rotate(
        self, family: str, presented: str, successor: str, *, grace: float, ttl: int
    ) -> Rotation:
        with self.lock:
            now = self.clock()
            entry = self.families.get(family)
            if entry is None or not self._live(entry, now) or entry[1].revoked:
                return "revoked"
            record = entry[1]
            if record.current == presented:
                record.current, record.previous, record.rotated_at = successor, presented, now
                self.families[family] = (self._expire("families", family, ttl), record)
                return "rotated"
            if record.previous == presented and now - record.rotated_at <= grace:
                record.current = successor
                return "retried"
            record.revoked = True
            self.families[family] = (self._expire("families", family, ttl), record)
            return "reused"

    def revoke_family(self, family: str, ttl: int) -> None:
        with self.lock:
            self._purge()
            entry = self.families.get(family)
            record = entry[1] if entry is not None else _Family(current="")
            record.revoked = True
            self.families[family] = (self._expire("families", family, ttl), record)

    def put_api_key(self, key_id: str, record: dict[str, str], ttl: int | None) -> None:
        with self.lock:
            self._purge()
            expires = self._expire("api_keys", key_id, ttl) if ttl is not None else float("inf")
            self.api_keys[key_id] = (expires, dict(record))

    def get_api_key(self, key_id: str) -> dict[str, str] | None:
        with self.lock:
            entry = self.api_keys.get(key_id)
            return dict(entry[1]) if entry and self._live(entry, self.clock()) else None

    def delete_api_key(self, key_id: str) -> dict[str, str] | None:
        with self.lock:
            entry = self.api_keys.pop(key_id, None)
            return entry[1] if entry and self._live(entry, self.clock()) else None

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None

    def _expire(self, table: str, key: str, ttl: int) -> float:
        when = self.clock() + ttl
        heapq.heappush(self.expiries, (when, table, key))
        return when

    def _purge(self) -> None:
        """Drop what has expired; an entry whose expiry moved on since is left alone."""
        now = self.clock()
        tables: dict[str, dict[str, tuple[float, Any]]] = {
            "denied": self.denied,
            "families": self.families,
            "api_keys": self.api_keys,
        }
        while self.expiries and self.expiries[0][0] <= now:
            _, table_name, key = heapq.heappop(self.expiries)
            table = tables[table_name]
            entry = table.get(key)
            if entry is not None and not self._live(entry, now):
                del table[key]

    @staticmethod
    def _live(entry: tuple[float, Any] | None, now: float) -> bool:
        return entry is not None and entry[0] > now
