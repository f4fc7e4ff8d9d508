"""The auth store kept in this process: dictionaries with expiry (the embedded default)."""

from __future__ import annotations

import heapq
import threading
from dataclasses import dataclass
from typing import Any

from corral.actors.auth._store import Pair, Rotation
from corral.clock import Clock, SystemClock

__all__ = ["MemoryStore"]


@dataclass
class _Family:
    current: Pair
    deadline: int
    previous: str = ""
    rotated_at: float = 0.0
    revoked: bool = False


class MemoryStore:
    """The store in a process's memory. Thread-safe: actors of one namespace may share it."""

    kind = "memory"

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or SystemClock()
        self.lock = threading.Lock()
        self.denied: dict[str, tuple[float, bool]] = {}
        self.families: dict[str, tuple[float, _Family]] = {}
        self.users: dict[str, tuple[float, int]] = {}
        self.api_keys: dict[str, tuple[float, dict[str, str]]] = {}
        self.expiries: list[tuple[float, str, str]] = []  # (when, table, key): a heap

    def is_revoked(self, jti: str, family: str | None, subject: str, issued_at: float) -> bool:
        with self.lock:
            now = self.clock.monotonic()
            if self._live(self.denied.get(jti), now):
                return True
            user = self.users.get(subject)
            if user is not None and self._live(user, now) and issued_at < user[1]:
                return True
            if family is None:
                return False
            entry = self.families.get(family)
            return entry is not None and self._live(entry, now) and entry[1].revoked

    def revoke_user(self, subject: str, not_before: int, ttl: int) -> None:
        with self.lock:
            self._purge()
            self.users[subject] = (self._expire("users", subject, ttl), not_before)

    def not_before(self, subject: str) -> int:
        with self.lock:
            user = self.users.get(subject)
            return user[1] if user is not None and self._live(user, self.clock.monotonic()) else 0

    def deny(self, jti: str, ttl: int) -> None:
        with self.lock:
            self._purge()
            # NX: the first TTL stays.
            if not self._live(self.denied.get(jti), self.clock.monotonic()):
                self.denied[jti] = (self._expire("denied", jti, ttl), True)

    def is_denied(self, jti: str) -> bool:
        with self.lock:
            return self._live(self.denied.get(jti), self.clock.monotonic())

    def start_family(self, family: str, pair: Pair, *, deadline: int, ttl: int) -> None:
        with self.lock:
            self._purge()
            record = _Family(current=pair, deadline=deadline)
            self.families[family] = (self._expire("families", family, ttl), record)

    def rotate(
        self, family: str, presented: str, successor: Pair, *, grace: float, ttl: int
    ) -> tuple[Rotation, Pair, int]:
        with self.lock:
            now = self.clock.monotonic()
            entry = self.families.get(family)
            if entry is None or not self._live(entry, now) or entry[1].revoked:
                return "revoked", successor, 0
            record = entry[1]
            if self.clock.time() >= record.deadline:
                return "expired", successor, record.deadline
            if record.current.refresh_jti == presented:
                record.current, record.previous, record.rotated_at = successor, presented, now
                self.families[family] = (self._expire("families", family, ttl), record)
                return "rotated", successor, record.deadline
            if record.previous == presented and now - record.rotated_at <= grace:
                return "retried", record.current, record.deadline
            record.revoked = True
            self.families[family] = (self._expire("families", family, ttl), record)
            return "reused", successor, record.deadline

    def revoke_family(self, family: str, ttl: int) -> None:
        with self.lock:
            self._purge()
            entry = self.families.get(family)
            record = entry[1] if entry is not None else _Family(Pair("", "", 0), deadline=0)
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
            return dict(entry[1]) if entry and self._live(entry, self.clock.monotonic()) else None

    def delete_api_key(self, key_id: str) -> dict[str, str] | None:
        with self.lock:
            entry = self.api_keys.pop(key_id, None)
            return entry[1] if entry and self._live(entry, self.clock.monotonic()) else None

    def update_api_key(self, key_id: str, changes: dict[str, str]) -> dict[str, str] | None:
        with self.lock:
            entry = self.api_keys.get(key_id)
            if entry is None or not self._live(entry, self.clock.monotonic()):
                return None
            entry[1].update(changes)
            return dict(entry[1])

    def api_keys_of(self, owner: str) -> dict[str, dict[str, str]]:
        with self.lock:
            now = self.clock.monotonic()
            return {
                key_id: dict(record)
                for key_id, (expires, record) in self.api_keys.items()
                if expires > now and record.get("owner") == owner
            }

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None

    def _expire(self, table: str, key: str, ttl: int) -> float:
        when = self.clock.monotonic() + ttl
        heapq.heappush(self.expiries, (when, table, key))
        return when

    def _purge(self) -> None:
        """Drop what has expired; an entry whose expiry moved on since is left alone."""
        now = self.clock.monotonic()
        tables: dict[str, dict[str, tuple[float, Any]]] = {
            "denied": self.denied,
            "families": self.families,
            "users": self.users,
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
