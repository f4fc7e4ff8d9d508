"""``with transaction(system):`` — a transaction of the ``transaction`` manager as a block.

The outermost block begins a transaction and commits it when the block ends
(rolls it back when the block raises); a block nested inside it, in the same
thread or task, is a savepoint: rolled back alone when it raises, kept when it
ends normally. Events are published only after the outermost commit::

    with transaction(system) as tx:
        tx.update("u1", data={"n": 1})
        tx.on_commit(lambda: print("u1 committed"))   # runs after the outermost commit
        try:
            with transaction(system):
                tx.update("u2", transition="suspend")
                raise RuntimeError("undo just this part")
        except RuntimeError:
            pass
        tx.get("u1").data            # {"n": 1}: reads see the transaction's own writes
    tx.states                        # the committed states

The same block works in asyncio code with ``async with`` (over ``ask_async``; every
method of the transaction is then awaited)::

    async with transaction(system) as tx:
        await tx.update("u1", data={"n": 1})

``system`` is anything with ``ask`` (and ``ask_async`` for ``async with``): a
``corral.System`` or ``corral.connect(...)``. The commit is serializable by default:
``transaction(system, isolation_level="read_committed")`` checks only the written states.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

from corral.manager import Asker, AsyncAsker
from corral.messages.state import StateInfo, StateWrite
from corral.messages.transaction import (
    IsolationLevel,
    TransactionBegin,
    TransactionCommit,
    TransactionGet,
    TransactionReleaseSavepoint,
    TransactionRollback,
    TransactionRollbackToSavepoint,
    TransactionSavepoint,
    TransactionWrite,
)

__all__ = [
    "AsyncTransaction",
    "Transaction",
    "TransactionBlock",
    "on_commit",
    "transaction",
]

A = TypeVar("A", bound=Asker | AsyncAsker)

OnCommit = Callable[[], object]
"""A hook: called with no arguments after the outermost commit; in an ``async with``
block, an awaitable it returns is awaited."""


class _Hooks:
    """``on_commit`` hooks of one transaction, with the mark each savepoint set, so that
    rolling a savepoint back drops the hooks added since::

        hooks.add(send_mail); hooks.mark("sp1"); hooks.add(audit); hooks.drop_since("sp1")
    """

    def __init__(self) -> None:
        self.callbacks: list[OnCommit] = []
        self.marks: dict[str, int] = {}

    def add(self, callback: OnCommit) -> None:
        self.callbacks.append(callback)

    def mark(self, savepoint: str) -> None:
        self.marks[savepoint] = len(self.callbacks)

    def drop_since(self, savepoint: str) -> None:
        del self.callbacks[self.marks.get(savepoint, len(self.callbacks)) :]

    def forget(self, savepoint: str) -> None:
        self.marks.pop(savepoint, None)

    def take(self) -> list[OnCommit]:
        callbacks, self.callbacks = self.callbacks, []
        return callbacks


class _Open(Generic[A]):
    """What a transaction handle holds, in sync and asyncio code alike."""

    def __init__(self, system: A, transaction_id: str) -> None:
        self.system: A = system
        self.transaction_id = transaction_id
        self.states: list[StateInfo] = []
        """The committed states, once the outermost block has committed."""
        self.hooks = _Hooks()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.transaction_id}>"


class Transaction(_Open[Asker]):
    """One open transaction: buffered writes, reads that see them, savepoints."""

    def on_commit(self, callback: OnCommit) -> None:
        """Call ``callback()`` once the outermost block has committed (never, if it rolls
        back; not if the savepoint block it was added in rolls back)::

        tx.on_commit(lambda: mailer.send("order paid"))
        """
        self.hooks.add(callback)

    def get(self, state_id: str) -> StateInfo:
        """The state as this transaction sees it: stored, with its buffered writes on top."""
        return self.system.ask(
            TransactionGet(transaction_id=self.transaction_id, state_id=state_id)
        )

    def write(self, write: StateWrite) -> StateInfo:
        """Buffer any write; answers the state as the transaction now sees it."""
        return self.system.ask(TransactionWrite(transaction_id=self.transaction_id, write=write))

    def register(self, state_id: str, state_type: str, **fields: Any) -> StateInfo:
        """Create a state (fields: data, allowed_transitions, ttl)."""
        return self.write(_register(state_id, state_type, fields))

    def update(self, state_id: str, *, transition: str = "update", **fields: Any) -> StateInfo:
        """Run a transition (fields: data, expected_version, ttl)."""
        return self.write(StateWrite(state_id=state_id, transition=transition, **fields))

    def delete(self, state_id: str, *, expected_version: int | None = None) -> StateInfo:
        """Delete a state (at ``expected_version``, when given)."""
        return self.write(
            StateWrite(state_id=state_id, transition="delete", expected_version=expected_version)
        )

    def savepoint(self, name: str = "") -> str:
        """Mark the writes so far; returns the savepoint's name (generated for "")::

        mark = tx.savepoint()          # "sp1"
        tx.delete("u1")
        tx.rollback_to_savepoint(mark) # the delete is undone
        """
        info = self.system.ask(
            TransactionSavepoint(transaction_id=self.transaction_id, savepoint=name)
        )
        self.hooks.mark(info.savepoint)
        return info.savepoint

    def rollback_to_savepoint(self, name: str) -> None:
        """Drop the writes (and ``on_commit`` hooks) added since ``name`` and the savepoints
        after it; ``name`` stays."""
        self.system.ask(
            TransactionRollbackToSavepoint(transaction_id=self.transaction_id, savepoint=name)
        )
        self.hooks.drop_since(name)

    def release_savepoint(self, name: str) -> None:
        """Forget ``name`` and the savepoints after it, keeping their writes."""
        self.system.ask(
            TransactionReleaseSavepoint(transaction_id=self.transaction_id, savepoint=name)
        )
        self.hooks.forget(name)


class AsyncTransaction(_Open[AsyncAsker]):
    """:class:`Transaction` for ``async with``: the same methods, awaited."""

    def on_commit(self, callback: OnCommit) -> None:
        """Call ``callback()`` (and await what it returns, if awaitable) once the outermost
        block has committed::

        tx.on_commit(notify_shipping)    # an async def, or a plain function
        """
        self.hooks.add(callback)

    async def get(self, state_id: str) -> StateInfo:
        """The state as this transaction sees it: stored, with its buffered writes on top."""
        return await self.system.ask_async(
            TransactionGet(transaction_id=self.transaction_id, state_id=state_id)
        )

    async def write(self, write: StateWrite) -> StateInfo:
        """Buffer any write; answers the state as the transaction now sees it."""
        return await self.system.ask_async(
            TransactionWrite(transaction_id=self.transaction_id, write=write)
        )

    async def register(self, state_id: str, state_type: str, **fields: Any) -> StateInfo:
        """Create a state (fields: data, allowed_transitions, ttl)."""
        return await self.write(_register(state_id, state_type, fields))

    async def update(
        self, state_id: str, *, transition: str = "update", **fields: Any
    ) -> StateInfo:
        """Run a transition (fields: data, expected_version, ttl)."""
        return await self.write(StateWrite(state_id=state_id, transition=transition, **fields))

    async def delete(self, state_id: str, *, expected_version: int | None = None) -> StateInfo:
        """Delete a state (at ``expected_version``, when given)."""
        return await self.write(
            StateWrite(state_id=state_id, transition="delete", expected_version=expected_version)
        )

    async def savepoint(self, name: str = "") -> str:
        """Mark the writes so far; returns the savepoint's name (generated for "")."""
        info = await self.system.ask_async(
            TransactionSavepoint(transaction_id=self.transaction_id, savepoint=name)
        )
        self.hooks.mark(info.savepoint)
        return info.savepoint

    async def rollback_to_savepoint(self, name: str) -> None:
        """Drop the writes (and ``on_commit`` hooks) added since ``name`` and the savepoints
        after it; ``name`` stays."""
        await self.system.ask_async(
            TransactionRollbackToSavepoint(transaction_id=self.transaction_id, savepoint=name)
        )
        self.hooks.drop_since(name)

    async def release_savepoint(self, name: str) -> None:
        """Forget ``name`` and the savepoints after it, keeping their writes."""
        await self.system.ask_async(
            TransactionReleaseSavepoint(transaction_id=self.transaction_id, savepoint=name)
        )
        self.hooks.forget(name)


def _register(state_id: str, state_type: str, fields: dict[str, Any]) -> StateWrite:
    fields.setdefault("data", {})
    return StateWrite(state_id=state_id, transition="create", state_type=state_type, **fields)


TransactionT = TypeVar("TransactionT", Transaction, AsyncTransaction)

_open: contextvars.ContextVar[dict[int, Transaction]] = contextvars.ContextVar(
    "corral_open_transactions"
)
_open_async: contextvars.ContextVar[dict[int, AsyncTransaction]] = contextvars.ContextVar(
    "corral_open_async_transactions"
)


class _Entered(Generic[TransactionT]):
    """What one entered block did: began ``tx`` (``token`` set), or made ``savepoint``."""

    def __init__(
        self,
        tx: TransactionT,
        token: contextvars.Token[Any] | None = None,
        savepoint: str = "",
    ) -> None:
        self.tx: TransactionT = tx
        self.token = token
        self.savepoint = savepoint


class TransactionBlock:
    """What :func:`transaction` answers: a context manager for ``with`` and for
    ``async with``. The outermost block of a system in this thread or task begins and
    commits; a nested one is a savepoint::

        async with transaction(system, isolation_level="read_committed") as tx:
            await tx.update("u1", data={"n": 1})
    """

    def __init__(
        self,
        system: Asker | AsyncAsker,
        *,
        idle_timeout: float | None,
        isolation_level: IsolationLevel,
    ) -> None:
        self.system = system
        self.begin = TransactionBegin(idle_timeout=idle_timeout, isolation_level=isolation_level)
        self._entered: list[_Entered[Transaction]] = []
        self._entered_async: list[_Entered[AsyncTransaction]] = []

    def __enter__(self) -> Transaction:
        system = self.system
        if not isinstance(system, Asker):
            raise TypeError(f"with transaction(...) needs a system with ask(), not {system!r}")
        open_now = _open.get({})
        outer = open_now.get(id(system))
        if outer is not None:
            self._entered.append(_Entered(outer, savepoint=outer.savepoint()))
            return outer
        tx = Transaction(system, system.ask(self.begin).transaction_id)
        self._entered.append(_Entered(tx, _open.set({**open_now, id(system): tx})))
        return tx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        entered = self._entered.pop()
        tx = entered.tx
        if entered.savepoint:
            if exc_type is None:
                tx.release_savepoint(entered.savepoint)
            else:
                tx.rollback_to_savepoint(entered.savepoint)
            return
        assert entered.token is not None
        try:
            if exc_type is not None:
                tx.hooks.take()
                with contextlib.suppress(Exception):  # the block's own error matters more
                    tx.system.ask(TransactionRollback(transaction_id=tx.transaction_id))
                return
            tx.states = tx.system.ask(TransactionCommit(transaction_id=tx.transaction_id)).states
        finally:
            _open.reset(entered.token)
        for callback in tx.hooks.take():
            callback()

    async def __aenter__(self) -> AsyncTransaction:
        system = self.system
        if not isinstance(system, AsyncAsker):
            raise TypeError(
                f"async with transaction(...) needs a system with ask_async(), not {system!r}"
            )
        open_now = _open_async.get({})
        outer = open_now.get(id(system))
        if outer is not None:
            self._entered_async.append(_Entered(outer, savepoint=await outer.savepoint()))
            return outer
        tx = AsyncTransaction(system, (await system.ask_async(self.begin)).transaction_id)
        self._entered_async.append(_Entered(tx, _open_async.set({**open_now, id(system): tx})))
        return tx

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        entered = self._entered_async.pop()
        tx = entered.tx
        if entered.savepoint:
            if exc_type is None:
                await tx.release_savepoint(entered.savepoint)
            else:
                await tx.rollback_to_savepoint(entered.savepoint)
            return
        assert entered.token is not None
        try:
            if exc_type is not None:
                tx.hooks.take()
                with contextlib.suppress(Exception):  # the block's own error matters more
                    await tx.system.ask_async(TransactionRollback(transaction_id=tx.transaction_id))
                return
            committed = await tx.system.ask_async(
                TransactionCommit(transaction_id=tx.transaction_id)
            )
            tx.states = committed.states
        finally:
            _open_async.reset(entered.token)
        for callback in tx.hooks.take():
            result = callback()
            if inspect.isawaitable(result):
                await result


def transaction(
    system: Asker | AsyncAsker,
    *,
    idle_timeout: float | None = None,
    isolation_level: IsolationLevel = "serializable",
) -> TransactionBlock:
    """A transaction block (``with`` or ``async with``), or a savepoint when one is already
    open for ``system`` in this thread or task (whose ``isolation_level`` then counts)."""
    return TransactionBlock(system, idle_timeout=idle_timeout, isolation_level=isolation_level)


def on_commit(system: object, callback: OnCommit) -> Awaitable[None] | None:
    """Django's ``transaction.on_commit``: run ``callback`` after the outermost commit of
    the transaction open for ``system`` in this thread or task, or now when none is::

        on_commit(system, lambda: mailer.send("welcome"))
    """
    tx: Transaction | AsyncTransaction | None = _open.get({}).get(id(system))
    if tx is None:
        tx = _open_async.get({}).get(id(system))
    if tx is not None:
        tx.on_commit(callback)
        return None
    result = callback()
    return result if inspect.isawaitable(result) else None
