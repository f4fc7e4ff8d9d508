"""A backend wrapper that keeps chosen fields of state data encrypted at rest.

Writes have their type's ``encrypted_fields`` sealed (:mod:`corral.encryption`) before
the backend stores them, and a searchable field's search token stored beside it as
``#<field>``; states read back are opened, tokens left out. Events keep what was
stored: the durable stream and the bus carry ciphertext, which a subscriber holding the
keys opens with :class:`~corral.encryption.FieldCipher`. Searchable fields are indexed
by token in states of their own (``index:{<token>}:...``), updated after each change and
checked again on each look-up, so a stale entry never finds a state that no longer
matches::

    backend = EncryptedBackend(inner, cipher, fields={"User": ["email"]},
                               searchable={"User": ["email"]})
    backend.find("User", "email", "ada@example.com", now_ms)   # [StateInfo(...)]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import msgspec

from corral.actors.state._memory import Backend
from corral.encryption import FieldCipher
from corral.errors import Conflict, CorralError, NotFound
from corral.messages.state import StateChanged, StateInfo, StateWrite

__all__ = ["INDEX_TYPE", "EncryptedBackend"]

log = logging.getLogger(__name__)

INDEX_TYPE = "StateIndex"
_INDEX_ATTEMPTS = 5


class EncryptedBackend:
    """``inner`` with the fields of :mod:`corral.encryption` sealed; see the module docstring."""

    def __init__(
        self,
        inner: Backend,
        cipher: FieldCipher,
        *,
        fields: Mapping[str, list[str]],
        searchable: Mapping[str, list[str]],
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.cipher = cipher
        self.fields = fields
        self.searchable = searchable

    # -- the Backend protocol -------------------------------------------------------------

    def apply(
        self, writes: list[StateWrite], now_ms: int, reads: dict[str, int] | None = None
    ) -> tuple[list[StateChanged], list[StateInfo]]:
        types: dict[str, str] = {}
        sealed = [self._seal(write, types, now_ms) for write in writes]
        events, states = self.inner.apply(sealed, now_ms, reads)
        self._index(events, now_ms)
        return events, [self._open(state) for state in states]

    def get(self, state_id: str, now_ms: int) -> StateInfo:
        return self._open(self.inner.get(state_id, now_ms))

    def history(self, state_id: str, limit: int) -> list[StateChanged]:
        return [self.open_event(event) for event in self.inner.history(state_id, limit)]

    def expire_due(self, now_ms: int) -> list[StateChanged]:
        events = self.inner.expire_due(now_ms)
        self._index(events, now_ms)
        return events

    def state_ids(self, state_type: str) -> list[str]:
        return self.inner.state_ids(state_type)

    def close(self) -> None:
        self.inner.close()

    # -- look-ups and key rotation ----------------------------------------------------------

    def find(self, state_type: str, field: str, value: Any, now_ms: int) -> list[StateInfo]:
        """The states of ``state_type`` whose searchable ``field`` holds ``value``."""
        token = self.cipher.search_token(state_type, field, value)
        try:
            index = self.inner.get(_index_id(state_type, field, token), now_ms)
        except NotFound:
            return []
        found = []
        for state_id in index.data.get("ids", []):
            try:
                state = self.inner.get(state_id, now_ms)
            except NotFound:
                continue
            if state.state_type == state_type and state.data.get(f"#{field}") == token:
                found.append(self._open(state))
        return found

    def rewrite_stale(self, state_ids: list[str], now_ms: int) -> int:
        """Write again, under the first key, the encrypted fields of those of ``state_ids``
        that are under another; how many were written."""
        written = 0
        for state_id in state_ids:
            try:
                stored = self.inner.get(state_id, now_ms)
            except NotFound:
                continue
            fields = self.fields.get(stored.state_type, [])
            if not fields or not self.cipher.stale(stored.data, fields):
                continue
            data = self.cipher.open(stored.data, fields)
            update = StateWrite(
                state_id=state_id,
                transition="update",
                data=self.cipher.seal(data, fields),
                expected_version=stored.version,
            )
            try:
                self.inner.apply([update], now_ms)
            except Conflict:
                continue  # written meanwhile, under the first key
            written += 1
        return written

    # -- sealing and opening ----------------------------------------------------------------

    def _seal(self, write: StateWrite, types: dict[str, str], now_ms: int) -> StateWrite:
        state_type = write.state_type if write.transition == "create" else types.get(write.state_id)
        if state_type is None and write.data is not None:
            try:
                state_type = self.inner.get(write.state_id, now_ms).state_type
            except NotFound:
                state_type = ""  # the backend refuses the write
        if state_type is not None:
            types[write.state_id] = state_type
        fields = self.fields.get(state_type or "", [])
        if write.data is None or not fields:
            return write
        data = {k: v for k, v in write.data.items() if not k.startswith("#")}
        for field in self.searchable.get(state_type or "", []):
            if field in data:
                data[f"#{field}"] = self.cipher.search_token(state_type or "", field, data[field])
        return msgspec.structs.replace(write, data=self.cipher.seal(data, fields))

    def _open(self, state: StateInfo) -> StateInfo:
        fields = self.fields.get(state.state_type)
        if not fields:
            return state
        return msgspec.structs.replace(state, data=self._open_data(state.state_type, state.data))

    def open_event(self, event: StateChanged) -> StateChanged:
        """``event`` with its data opened, as a reply gives it."""
        if not self.fields.get(event.state_type):
            return event
        return msgspec.structs.replace(
            event,
            old=None if event.old is None else self._open_data(event.state_type, event.old),
            new=None if event.new is None else self._open_data(event.state_type, event.new),
        )

    def _open_data(self, state_type: str, data: dict[str, Any]) -> dict[str, Any]:
        opened = self.cipher.open(data, self.fields.get(state_type, []))
        return {k: v for k, v in opened.items() if not k.startswith("#")}

    # -- the search index ---------------------------------------------------------------------

    def _index(self, events: list[StateChanged], now_ms: int) -> None:
        for event in events:
            for field in self.searchable.get(event.state_type, []):
                before = (event.old or {}).get(f"#{field}")
                after = (event.new or {}).get(f"#{field}")
                if before == after:
                    continue
                try:
                    if before:
                        self._edit(event.state_type, field, before, event.state_id, False, now_ms)
                    if after:
                        self._edit(event.state_type, field, after, event.state_id, True, now_ms)
                except CorralError as exc:  # the state is written; a look-up checks again
                    log.warning("state: the search index of %s missed a change of %s: %s",
                                field, event.state_id, exc)  # fmt: skip

    def _edit(
        self, state_type: str, field: str, token: str, state_id: str, add: bool, now_ms: int
    ) -> None:
        index_id = _index_id(state_type, field, token)
        for _attempt in range(_INDEX_ATTEMPTS):
            try:
                index = self.inner.get(index_id, now_ms)
            except NotFound:
                if not add:
                    return
                write = StateWrite(
                    state_id=index_id,
                    transition="create",
                    state_type=INDEX_TYPE,
                    data={"ids": [state_id]},
                )
            else:
                ids = [i for i in index.data.get("ids", []) if i != state_id]
                if add:
                    ids.append(state_id)
                write = StateWrite(
                    state_id=index_id,
                    transition="update" if ids else "delete",
                    data={"ids": ids} if ids else None,
                    expected_version=index.version,
                )
            try:
                self.inner.apply([write], now_ms)
            except Conflict:
                continue  # another change of the same index: read it again
            return
        raise Conflict(f"the search index {index_id} kept changing", {"index": index_id})


def _index_id(state_type: str, field: str, token: str) -> str:
    return f"index:{{{token[:16]}}}:{state_type}:{field}:{token}"
