"""The ``cache`` manager: memory, Redis and tiered backends behind one actor.

::

    from corral.actors.cache import CacheManager
    from corral.messages.cache import CacheGet, CacheSet

    with System(managers=[CacheManager]) as system:
        system.ask(CacheSet(key="greeting", value="hello", ttl=60))
        system.ask(CacheGet(key="greeting")).value      # 'hello'

See docs/cache.md for the options and messages.
"""

from corral.actors.cache._manager import CacheManager
from corral.actors.cache._options import BackendOptions, CacheOptions

__all__ = ["BackendOptions", "CacheManager", "CacheOptions"]
