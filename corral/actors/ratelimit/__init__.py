"""The ``ratelimit`` manager: named rules per level, sliding window and GCRA, bans.

Configure rules per level (``ip``, ``user``, ``api_key`` or any custom level)
and ask with all the identifiers of one call; every level is decided in one
Redis round trip, and a refused call charges no level::

    [managers.ratelimit]
    ban_after = 20                      # 20 refusals within ban_window ban for ban_duration
    rules.ip = "100/minute"
    rules.user_burst = { level = "user", limit = "10/second", algorithm = "token_bucket",
                         burst = 20, on_backend_error = "closed" }

    decision = system.ask(RatelimitCheck(ip="10.0.0.7", user="ada", endpoint="/search"))
    decision.allowed, decision.exceeded, decision.headers()

With no Redis (``backend = "memory"``, or no ``bus.url``), the same rules are
kept in this process. When Redis fails, each rule's ``on_backend_error`` says
what to do (``open``: allow, ``closed``: refuse, ``local``: count in memory)
and health reports ``degraded`` until Redis answers again.
"""

from corral.actors.ratelimit._manager import RatelimitManager
from corral.actors.ratelimit._options import RatelimitOptions, parse_limit

__all__ = ["RatelimitManager", "RatelimitOptions", "parse_limit"]
