"""The ``pool`` manager: per-service HTTP connection pools with retries, breakers and probes.

::

    from corral.actors.pool import PoolManager
    from corral.messages.pool import HttpRequest

    options = {"services": {"billing": {"base_urls": ["http://127.0.0.1:8001"]}}}
    with System(managers=[ChildSpec(name="pool", manager=PoolManager, options=options)]) as system:
        system.ask(HttpRequest(service="billing", path="/invoices")).status

See :mod:`corral.actors.pool._manager` for how a call travels, and docs/pool.md.
"""

from corral.actors.pool._manager import PoolManager
from corral.actors.pool._options import PoolOptions, ServiceOptions

__all__ = ["PoolManager", "PoolOptions", "ServiceOptions"]
