"""``cached``: keep a function's results in the cache manager, computing each one once;
``CacheKey``: key templates; ``lock``: a distributed lock with a fencing token.

::

    with System(managers=[CacheManager]) as system:

        @cached(system, ttl=60, key="profile:{user_id}", tags=["profiles"])
        def profile(user_id: int) -> dict[str, Any]:
            return load_profile(user_id)        # runs once per user per minute

        profile(42)                             # computed, stored under "profile:42"
        profile(42)                             # from the cache
        profile.invalidate(42)                  # the next call computes again
        profile.stats().hits                    # 1

``system`` is anything with ``ask`` (and ``ask_async`` for coroutine functions): a
:class:`corral.System` or ``corral.connect(url)``. Concurrent callers that miss the
same key make one computation: the first gets a lease and computes, the others wait
for its value (``CacheGetOrLease``).

The cache never fails the function. A cache that is down, or a wait that times out,
makes the caller compute the value itself. A value the codec cannot carry (a
``datetime``, a ``set``, a dataclass, a map with keys that are not strings, one over
the size limit) is returned uncached, counted in :meth:`CachedFunction.stats` and
logged once per function. Tuples come back as tuples: a tuple is stored as the map
``{" t": [items]}`` (and a map whose only key is ``" t"`` or ``" d"`` as
``{" d": map}``); every other value is stored as it is, so other readers see plain
msgpack.

With ``stale_ttl``, a value is still served for that long after its ``ttl`` while one
caller (across daemons) computes it again and returns the new value; with
``early_ttl``, that caller does so from that long before the ``ttl`` ends, so that the
others never wait::

    @cached(system, ttl=60, stale_ttl=300, early_ttl=10)
    def report(day: str) -> dict[str, Any]: ...

The key of a call is, by choice:

- a template naming the function's parameters, ``key="user:{user_id}"``, or a
  :class:`CacheKey` (which also makes the keys, and patterns, outside the function);
- a function of the call's arguments, ``key=lambda user_id: f"user:{user_id}"``;
- by default, the function's qualified name and a digest of its arguments (bound to
  its parameters, defaults applied, so ``f(1)`` and ``f(x=1)`` share a key). Only
  values that say the same in every process make a default key: ``None``, ``bool``,
  ``int``, ``float``, ``str``, ``bytes``, tuples, lists, dicts, sets and frozensets of
  them, enum members, dates, times, durations, ``Decimal``, ``Fraction``, ``UUID``
  and dataclass instances made of them. A call with any other argument (an object
  whose ``repr`` is its address, say ``self``) runs without the cache, counted and
  logged once: give that function a ``key``.

A lock held while a job runs, released when it ends, and by its TTL if the process
dies; the fencing token only grows, so a store can refuse writes of an older holder::

    with lock(system, "nightly-report", ttl=60, wait=5) as held:
        write_report(fence=held.token)
        held.extend(60)                         # still ours: 60 s more
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import hashlib
import inspect
import logging
import re
import string
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any, ParamSpec, Protocol, TypeVar, cast, overload

import msgspec

from corral._redis import glob_escape
from corral.errors import Conflict, InvalidMessage, Timeout, UnavailableError
from corral.manager import Asker, AsyncAsker
from corral.messages.base import MAX_NESTING, validate
from corral.messages.cache import (
    CacheDelete,
    CacheExtend,
    CacheGetOrLease,
    CacheLease,
    CacheLock,
    CacheRelease,
    CacheSet,
    CacheUnlock,
)

__all__ = [
    "AsyncCachedFunction",
    "CacheKey",
    "CachedFunction",
    "CachedStats",
    "HeldLock",
    "cached",
    "lock",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

_ASK_MARGIN = 1.0
"""Seconds an ask waits beyond ``wait``, so the manager's own Timeout answers first."""

_TUPLE = " t"
"""The key of the map that stores a tuple: ``{" t": [items]}``."""
_ESCAPED = " d"
"""The key of the map that stores a map whose only key is ``_TUPLE`` or ``_ESCAPED``."""

_VALUE_TYPES = (
    datetime.date,
    datetime.time,
    datetime.timedelta,
    decimal.Decimal,
    fractions.Fraction,
    uuid.UUID,
)
"""Argument types whose ``repr`` is their value: a default key may be made of them."""


@dataclasses.dataclass(frozen=True)
class CachedStats:
    """What the calls of one decorated function did, since it was decorated::

    CachedStats(hits=12, misses=3, refreshes=1, uncacheable=0, unkeyed=0, bypassed=1)
    """

    hits: int = 0
    """Answered from the cache (a stored value, stale or not, or one set while the
    caller waited)."""
    misses: int = 0
    """Computed under the lease and stored."""
    refreshes: int = 0
    """Computed again under the refresh lease of a value due for it, and stored."""
    uncacheable: int = 0
    """Computed, and returned uncached: the codec cannot carry the value."""
    unkeyed: int = 0
    """Computed without the cache: an argument has no stable default key."""
    bypassed: int = 0
    """Computed without the cache: it was unavailable, or the wait ran out."""


class CachedFunction(Protocol[P, T_co]):
    """A function decorated with :func:`cached`: call it, invalidate one call's value,
    read its counts."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T_co: ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Delete the value of the call with these arguments; True when there was one.
        Raises what the cache raises (``BackendUnavailable`` when it could not delete)."""
        ...

    def stats(self) -> CachedStats: ...


class AsyncCachedFunction(Protocol[P, T_co]):
    """A coroutine function decorated with :func:`cached`; ``invalidate`` is awaited."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T_co]: ...

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool: ...

    def stats(self) -> CachedStats: ...


class _Decorate(Protocol):
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> AsyncCachedFunction[P, T]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> CachedFunction[P, T]: ...


def cached(
    system: Asker,
    *,
    ttl: float | None = None,
    key: str | CacheKey | Callable[..., str] | None = None,
    backend: str = "",
    tags: Iterable[str] = (),
    lease_ttl: float = 30.0,
    wait: float = 10.0,
    stale_ttl: float | None = None,
    early_ttl: float | None = None,
) -> _Decorate:
    """Decorate a function (or coroutine function) to cache its results; see the module doc.

    ``ttl``: seconds a value is kept (None: the backend's ``default_ttl``).
    ``key``: a template naming the function's parameters (``"user:{user_id}"``), or a
    function of the call's arguments; by default, the qualified name and a digest of
    the arguments. ``backend``: the cache backend ("" for the default one).
    ``tags``: tags every stored value carries (``CacheInvalidateTags`` drops them).
    ``lease_ttl``: how long other callers wait for a computation whose caller vanished.
    ``wait``: how long a caller waits for another's computation before computing itself.
    ``stale_ttl``, ``early_ttl``: see the module doc (None: the backend's defaults).

    Settings the cache would refuse (a ``ttl`` of 0, a template naming no parameter)
    raise here, when the function is decorated.
    """
    tag_list = list(tags)
    store = CacheSet(
        key="k",
        value=None,
        ttl=ttl,
        tags=tag_list,
        backend=backend,
        stale_ttl=stale_ttl,
        early_ttl=early_ttl,
    )
    validate(store)
    validate(CacheGetOrLease(key="k", backend=backend, lease_ttl=lease_ttl, wait=wait))
    if early_ttl is not None and ttl is not None and early_ttl >= ttl:
        raise ValueError(f"cached: early_ttl ({early_ttl}) must be less than the ttl ({ttl})")

    def decorate(fn: Callable[..., Any]) -> Any:
        calls = _Calls(fn, _key_maker(fn, key), store, lease_ttl, wait)
        if inspect.iscoroutinefunction(fn):
            wrapper = _async_wrapper(fn, calls, cast(AsyncAsker, system))
        else:
            wrapper = _sync_wrapper(fn, calls, system)
        wrapper.__dict__.update(stats=calls.stats)
        return wrapper

    return cast(_Decorate, decorate)


class _Calls:
    """What the calls of one decorated function share: the requests they make, their
    counts, and the warnings already logged."""

    def __init__(
        self,
        fn: Callable[..., Any],
        make_key: Callable[..., str],
        store: CacheSet,
        lease_ttl: float,
        wait: float,
    ) -> None:
        self.name = f"{fn.__module__}.{fn.__qualname__}"
        self.make_key = make_key
        self.store = store
        self.backend = store.backend
        self.lease_ttl = lease_ttl
        self.wait = wait
        self.ask_timeout = wait + _ASK_MARGIN
        self.lock = threading.Lock()
        self.counts = dict.fromkeys((f.name for f in dataclasses.fields(CachedStats)), 0)
        self.warned: set[str] = set()

    def stats(self) -> CachedStats:
        with self.lock:
            return CachedStats(**self.counts)

    def count(self, outcome: str) -> None:
        with self.lock:
            self.counts[outcome] += 1

    def key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The call's key; None (counted, logged once) when it has none."""
        try:
            return self.make_key(*args, **kwargs)
        except _NoStableKey as exc:
            self.count("unkeyed")
            self.warn_once(
                "unkeyed",
                "cached %s: called without the cache: %s has no stable key; "
                'give the decorator a key (a template such as "user:{user_id}", or a function)',
                exc,
            )
            return None

    def stored_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The key a value of this call would be stored under; None: such calls are never
        stored."""
        try:
            return self.make_key(*args, **kwargs)
        except _NoStableKey:
            return None

    def warn_once(self, kind: str, text: str, *args: Any) -> None:
        with self.lock:
            if kind in self.warned:
                return
            self.warned.add(kind)
        log.warning(text, self.name, *args)

    def bypassed(self, key: str, exc: Exception) -> None:
        self.count("bypassed")
        log.debug("cached %s: computing without the cache: %s", key, exc)

    def not_stored(self, key: str, exc: BaseException) -> bool:
        """Count why the value of ``key`` was not stored; False when ``exc`` is no reason
        to return the value anyway (it is the caller's to raise)."""
        if isinstance(exc, InvalidMessage):
            self.count("uncacheable")
            self.warn_once(
                "uncacheable",
                "cached %s: a value the cache cannot carry is returned uncached (%s); "
                "values are msgpack: maps with string keys, lists, tuples, str, bytes, "
                "numbers, bool, None",
                exc,
            )
        elif isinstance(exc, Timeout | UnavailableError):
            self.count("bypassed")
        else:
            return False
        log.debug("cached %s: value not stored: %s", key, exc)
        return True

    def lease_request(self, key: str) -> CacheGetOrLease:
        return CacheGetOrLease(
            key=key, backend=self.backend, lease_ttl=self.lease_ttl, wait=self.wait
        )

    def store_request(self, key: str, value: Any, lease: str) -> CacheSet:
        """Raises InvalidMessage for a value nested too deep to carry."""
        return msgspec.structs.replace(self.store, key=key, value=_to_cache(value, 0), lease=lease)

    def release_request(self, key: str, lease: str) -> CacheRelease:
        return CacheRelease(key=key, lease=lease, backend=self.backend)

    def delete_request(self, key: str) -> CacheDelete:
        return CacheDelete(key=key, backend=self.backend)

    def hit(self, reply: CacheLease) -> Any:
        self.count("hits")
        return _from_cache(reply.value)


def _sync_wrapper(fn: Callable[..., Any], calls: _Calls, system: Asker) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        key = calls.key(args, kwargs)
        if key is None:
            return fn(*args, **kwargs)
        try:
            reply = system.ask(calls.lease_request(key), timeout=calls.ask_timeout)
        except (Timeout, UnavailableError) as exc:
            calls.bypassed(key, exc)
            return fn(*args, **kwargs)
        if reply.found and not reply.lease:
            return calls.hit(reply)
        try:
            value = fn(*args, **kwargs)
        except BaseException:
            _release(system, calls.release_request(key, reply.lease))
            raise
        store(key, value, reply.lease, "refreshes" if reply.found else "misses")
        return value

    def store(key: str, value: Any, lease: str, outcome: str) -> None:
        try:
            system.ask(calls.store_request(key, value, lease))
        except BaseException as exc:
            _release(system, calls.release_request(key, lease))
            if not calls.not_stored(key, exc):
                raise
        else:
            calls.count(outcome)

    def invalidate(*args: Any, **kwargs: Any) -> bool:
        key = calls.stored_key(args, kwargs)
        return key is not None and system.ask(calls.delete_request(key)).count > 0

    call.__dict__.update(invalidate=invalidate)
    return call


def _async_wrapper(
    fn: Callable[..., Coroutine[Any, Any, Any]], calls: _Calls, system: AsyncAsker
) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> Any:
        key = calls.key(args, kwargs)
        if key is None:
            return await fn(*args, **kwargs)
        try:
            reply = await system.ask_async(calls.lease_request(key), timeout=calls.ask_timeout)
        except (Timeout, UnavailableError) as exc:
            calls.bypassed(key, exc)
            return await fn(*args, **kwargs)
        if reply.found and not reply.lease:
            return calls.hit(reply)
        try:
            value = await fn(*args, **kwargs)
        except BaseException:
            await _release_async(system, calls.release_request(key, reply.lease))
            raise
        await store(key, value, reply.lease, "refreshes" if reply.found else "misses")
        return value

    async def store(key: str, value: Any, lease: str, outcome: str) -> None:
        try:
            await system.ask_async(calls.store_request(key, value, lease))
        except BaseException as exc:
            await _release_async(system, calls.release_request(key, lease))
            if not calls.not_stored(key, exc):
                raise
        else:
            calls.count(outcome)

    async def invalidate(*args: Any, **kwargs: Any) -> bool:
        key = calls.stored_key(args, kwargs)
        return key is not None and (await system.ask_async(calls.delete_request(key))).count > 0

    call.__dict__.update(invalidate=invalidate)
    return call


def _release(system: Asker, request: CacheRelease) -> None:
    """Give a lease back, so that a waiter takes it; a cache out of reach lets it expire."""
    try:
        system.ask(request)
    except (Timeout, UnavailableError) as exc:
        log.debug("cached %s: lease not released: %s", request.key, exc)


async def _release_async(system: AsyncAsker, request: CacheRelease) -> None:
    try:
        await system.ask_async(request)
    except (Timeout, UnavailableError) as exc:
        log.debug("cached %s: lease not released: %s", request.key, exc)


# -- keys ---------------------------------------------------------------------------------


class _NoStableKey(Exception):
    """An argument has no representation that is the same in every process."""


class CacheKey:
    """A key template over named values, for ``@cached(key=...)`` and for the keys and
    invalidation patterns of the same values anywhere else::

        orders = CacheKey("user:{user_id}:orders:{status}")
        orders.names                                # ('user_id', 'status')
        orders.format(user_id=42, status="open")    # 'user:42:orders:open'
        orders.pattern(user_id=42)                  # 'user:42:orders:*'

    Fields are ``str.format`` fields (``{user.id}``, ``{ids[0]}``, ``{n:05d}``). Two
    calls share a key when their fields format alike: keep the values of a field free
    of the text between fields (ids are), or let the default key (a digest) tell them
    apart.
    """

    __slots__ = ("names", "template")

    def __init__(self, template: str) -> None:
        self.template = template
        names: list[str] = []
        for _, field, _, _ in string.Formatter().parse(template):
            if field is None:
                continue
            name = re.split(r"[.\[]", field, maxsplit=1)[0]
            if name not in names:
                names.append(name)
        self.names: tuple[str, ...] = tuple(names)

    def __repr__(self) -> str:
        return f"CacheKey({self.template!r})"

    def format(self, **values: Any) -> str:
        """The key of ``values`` (one for each of :attr:`names`)."""
        return self.template.format_map(values)

    def pattern(self, **values: Any) -> str:
        """A Redis glob matching the keys of ``values``, any value standing for the names
        left out (for ``CacheInvalidate``); the values given are matched literally."""
        parts = []
        for literal, field, spec, conversion in string.Formatter().parse(self.template):
            parts.append(glob_escape(literal))
            if field is None:
                continue
            name = re.split(r"[.\[]", field, maxsplit=1)[0]
            if name not in values:
                parts.append("*")
                continue
            text = "{" + field + ("!" + conversion if conversion else "") + ":" + (spec or "") + "}"
            parts.append(glob_escape(text.format_map(values)))
        return "".join(parts)


def _key_maker(
    fn: Callable[..., Any], key: str | CacheKey | Callable[..., str] | None
) -> Callable[..., str]:
    if isinstance(key, str):
        key = CacheKey(key)
    if isinstance(key, CacheKey):
        return _template_key(fn, inspect.signature(fn), key)
    if callable(key):
        return key
    return _default_key(fn, inspect.signature(fn))


def _template_key(
    fn: Callable[..., Any], signature: inspect.Signature, template: CacheKey
) -> Callable[..., str]:
    """``template`` filled from the call's arguments by parameter name::

    _template_key(profile, signature(profile), CacheKey("user:{user_id}"))(42)  # 'user:42'
    """
    for name in template.names:
        if name not in signature.parameters:
            raise ValueError(
                f"cached {fn.__qualname__}: the key template {template.template!r} names "
                f"{name or '{}'!r}, not a parameter (parameters: "
                f"{', '.join(signature.parameters) or 'none'})"
            )

    def make_key(*args: Any, **kwargs: Any) -> str:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return template.format(**bound.arguments)

    return make_key


def _default_key(fn: Callable[..., Any], signature: inspect.Signature) -> Callable[..., str]:
    """The qualified name and a digest of the arguments' stable form (see the module doc)."""
    name = f"{fn.__module__}.{fn.__qualname__}"

    def make_key(*args: Any, **kwargs: Any) -> str:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        stable = []
        for parameter, value in bound.arguments.items():
            try:
                stable.append((parameter, _stable(value)))
            except RecursionError:
                raise _NoStableKey(f"argument {parameter!r} (nested too deep)") from None
            except _NoStableKey as exc:
                raise _NoStableKey(f"argument {parameter!r} ({exc})") from None
        return f"{name}:{hashlib.sha256(repr(stable).encode()).hexdigest()[:32]}"

    return make_key


def _stable(value: Any) -> Any:
    """``value`` as plain tuples and scalars whose ``repr`` is the same in every process
    (sets and maps sorted); raises _NoStableKey for a value without one."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str, bytes):
        return value
    if kind in (list, tuple):
        return (kind.__name__, tuple(_stable(item) for item in value))
    if kind is dict:
        items = ((_stable(k), _stable(v)) for k, v in value.items())
        return ("dict", tuple(sorted(items, key=repr)))
    if kind in (set, frozenset):
        return (kind.__name__, tuple(sorted((_stable(item) for item in value), key=repr)))
    qualified = f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(value, enum.Enum):
        return (qualified, value.name)
    if isinstance(value, _VALUE_TYPES):
        return (qualified, repr(value))
    if isinstance(value, tuple):  # a named tuple
        return (qualified, tuple(_stable(item) for item in value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [f.name for f in dataclasses.fields(value)]
    elif isinstance(value, msgspec.Struct):  # a message
        names = list(value.__struct_fields__)
    else:
        raise _NoStableKey(f"a {qualified}")
    return (qualified, tuple((name, _stable(getattr(value, name))) for name in names))


# -- values -------------------------------------------------------------------------------


def _to_cache(value: Any, depth: int) -> Any:
    """``value`` as stored: tuples as ``{" t": [items]}``, maps that would read as one
    escaped as ``{" d": map}``; anything else as it is (the codec checks it)."""
    if depth > MAX_NESTING:
        raise InvalidMessage(f"nested deeper than {MAX_NESTING} levels", path="value")
    kind = type(value)
    if kind is tuple:
        return {_TUPLE: [_to_cache(item, depth + 1) for item in value]}
    if kind is list:
        return [_to_cache(item, depth + 1) for item in value]
    if kind is dict:
        stored = {k: _to_cache(v, depth + 1) for k, v in value.items()}
        if len(stored) == 1 and next(iter(stored)) in (_TUPLE, _ESCAPED):
            return {_ESCAPED: stored}
        return stored
    return value


def _from_cache(value: Any) -> Any:
    """The value :func:`_to_cache` stored, in containers of its own."""
    kind = type(value)
    if kind is list:
        return [_from_cache(item) for item in value]
    if kind is dict:
        if len(value) == 1:
            ((tag, inner),) = value.items()
            if tag == _TUPLE and type(inner) is list:
                return tuple(_from_cache(item) for item in inner)
            if tag == _ESCAPED and type(inner) is dict:
                return {k: _from_cache(v) for k, v in inner.items()}
        return {k: _from_cache(v) for k, v in value.items()}
    return value


# -- locks --------------------------------------------------------------------------------


@dataclasses.dataclass
class HeldLock:
    """A lock :func:`lock` took: its ``name`` and fencing ``token`` (greater than any
    earlier holder's), and ways to keep it longer or let it go early."""

    system: Asker
    name: str
    token: int
    backend: str = ""

    def extend(self, ttl: float) -> bool:
        """Make the lock last ``ttl`` seconds from now; False when it is no longer held
        (it expired, and maybe has another holder)."""
        request = CacheExtend(name=self.name, token=self.token, ttl=ttl, backend=self.backend)
        return self.system.ask(request).extended

    def release(self) -> bool:
        """Let the lock go; False when it was no longer held."""
        request = CacheUnlock(name=self.name, token=self.token, backend=self.backend)
        return self.system.ask(request).released


@contextlib.contextmanager
def lock(
    system: Asker, name: str, ttl: float, *, wait: float = 0.0, backend: str = ""
) -> Iterator[HeldLock]:
    """Hold the cache lock ``name`` for the ``with`` block, or ``ttl`` seconds if the
    process dies first; ``wait``: seconds to wait for it (0: not at all).

    Raises :class:`corral.errors.Conflict` when the lock is held by another (after
    ``wait``). A block that outlives ``ttl`` loses the lock: ``extend`` it, and fence
    writes with the token."""
    request = CacheLock(name=name, ttl=ttl, wait=wait, backend=backend)
    reply = system.ask(request, timeout=wait + _ASK_MARGIN)
    if not reply.acquired:
        raise Conflict(f"the lock {name!r} is held by another", {"name": name, "wait": wait})
    held = HeldLock(system, name, reply.token, backend)
    try:
        yield held
    finally:
        held.release()
