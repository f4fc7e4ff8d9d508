"""``cached``: keep a function's results in the cache manager, computing each one once.

::

    system = corral.System(config, managers=[CacheManager]).start()

    @cached(system, ttl=60)
    def profile(user_id: int) -> dict[str, Any]:
        return load_profile(user_id)           # runs once per user per minute

    @cached(system, ttl=60, key=lambda user_id: f"profile:{user_id}", tags=["profiles"])
    async def profile_async(user_id: int) -> dict[str, Any]:
        return await fetch_profile(user_id)

``system`` is anything with ``ask`` (and ``ask_async`` for coroutine functions): a
:class:`corral.System` or a remote client. Concurrent callers that miss the same
key make one computation: the first gets a lease and computes, the others wait for
its value (``CacheGetOrLease``). A cache that is down, or a wait that times out,
makes the caller compute the value itself: the cache never fails the function.
Results must be msgpack values; they come back as msgpack gives them (tuples as lists).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ParamSpec, Protocol, TypeVar, cast

from corral.errors import Timeout, UnavailableError
from corral.messages.base import Reply, Request
from corral.messages.cache import CacheGetOrLease, CacheLease, CacheRelease, CacheSet

__all__ = ["Asker", "cached"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R", bound=Reply)

_ASK_MARGIN = 1.0
"""Seconds an ask waits beyond ``wait``, so the manager's own Timeout answers first."""


class Asker(Protocol):
    def ask(self, message: Request[R], *, timeout: float | None = None) -> R: ...


class AsyncAsker(Asker, Protocol):
    async def ask_async(self, message: Request[R], *, timeout: float | None = None) -> R: ...


def cached(
    system: Asker,
    *,
    ttl: float | None = None,
    key: Callable[..., str] | None = None,
    backend: str = "",
    tags: Iterable[str] = (),
    lease_ttl: float = 30.0,
    wait: float = 10.0,
) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorate a function (or coroutine function) to cache its results; see the module doc.

    ``key``: builds the cache key from the call's arguments; the default is the
    function's qualified name and a digest of ``repr()`` of the arguments.
    ``lease_ttl``: how long other callers wait for a computation whose caller vanished.
    ``wait``: how long a caller waits for another's computation before computing itself.
    """
    tag_list = list(tags)

    def decorate(fn: Callable[P, T]) -> Callable[P, T]:
        make_key = key or _default_key(fn)

        def lease_request(cache_key: str) -> CacheGetOrLease:
            return CacheGetOrLease(key=cache_key, backend=backend, lease_ttl=lease_ttl, wait=wait)

        def store(cache_key: str, value: Any, lease: str) -> CacheSet:
            return CacheSet(
                key=cache_key, value=value, ttl=ttl, tags=tag_list, backend=backend, lease=lease
            )

        def release(cache_key: str, lease: str) -> CacheRelease:
            return CacheRelease(key=cache_key, lease=lease, backend=backend)

        if inspect.iscoroutinefunction(fn):
            asker = cast(AsyncAsker, system)
            async_fn = cast(Callable[P, Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                cache_key = make_key(*args, **kwargs)
                try:
                    reply = await asker.ask_async(
                        lease_request(cache_key), timeout=wait + _ASK_MARGIN
                    )
                except (Timeout, UnavailableError) as exc:
                    log.debug("cached %s: computing without the cache: %s", cache_key, exc)
                    return await async_fn(*args, **kwargs)
                if reply.found:
                    return reply.value
                try:
                    value = await async_fn(*args, **kwargs)
                except BaseException:
                    if reply.lease:
                        await _quietly_async(asker, release(cache_key, reply.lease))
                    raise
                if reply.lease:
                    await _store_async(asker, store(cache_key, value, reply.lease), release)
                return value

            return cast(Callable[P, T], async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            cache_key = make_key(*args, **kwargs)
            try:
                reply: CacheLease = system.ask(lease_request(cache_key), timeout=wait + _ASK_MARGIN)
            except (Timeout, UnavailableError) as exc:
                log.debug("cached %s: computing without the cache: %s", cache_key, exc)
                return fn(*args, **kwargs)
            if reply.found:
                return cast(T, reply.value)
            try:
                value = fn(*args, **kwargs)
            except BaseException:
                if reply.lease:
                    _quietly(system, release(cache_key, reply.lease))
                raise
            if reply.lease:
                _store(system, store(cache_key, value, reply.lease), release)
            return value

        return wrapper

    return decorate


def _default_key(fn: Callable[..., Any]) -> Callable[..., str]:
    name = f"{fn.__module__}.{fn.__qualname__}"

    def make_key(*args: Any, **kwargs: Any) -> str:
        arguments = repr((args, sorted(kwargs.items()))).encode()
        return f"{name}:{hashlib.sha256(arguments).hexdigest()[:32]}"

    return make_key


def _store(system: Asker, request: CacheSet, release: Callable[[str, str], CacheRelease]) -> None:
    """Set the computed value; an unencodable one releases the lease and raises."""
    try:
        system.ask(request)
    except (Timeout, UnavailableError) as exc:
        log.debug("cached %s: value not stored: %s", request.key, exc)
    except BaseException:
        _quietly(system, release(request.key, request.lease))
        raise


async def _store_async(
    system: AsyncAsker, request: CacheSet, release: Callable[[str, str], CacheRelease]
) -> None:
    try:
        await system.ask_async(request)
    except (Timeout, UnavailableError) as exc:
        log.debug("cached %s: value not stored: %s", request.key, exc)
    except BaseException:
        await _quietly_async(system, release(request.key, request.lease))
        raise


def _quietly(system: Asker, request: CacheRelease) -> None:
    try:
        system.ask(request)
    except (Timeout, UnavailableError) as exc:
        log.debug("cached %s: lease not released: %s", request.key, exc)


async def _quietly_async(system: AsyncAsker, request: CacheRelease) -> None:
    try:
        await system.ask_async(request)
    except (Timeout, UnavailableError) as exc:
        log.debug("cached %s: lease not released: %s", request.key, exc)
