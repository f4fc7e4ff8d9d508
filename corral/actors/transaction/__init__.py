"""The ``transaction`` manager: buffered state writes with savepoints, committed all or nothing.

Config::

    [managers.transaction]
    depends_on = ["state"]
    backend = "auto"         # "redis" when the system has Redis, else "memory"
    redis_url = ""           # default: the system's Redis (the bus's URL)
    idle_timeout = 30.0      # seconds without a request before a rollback
    max_writes = 1000        # buffered writes per transaction
    sweep_interval = 1.0     # memory store: seconds between idle checks

With Redis, open transactions live there, so every daemon of the namespace serves
every request of any transaction. Use it through
``corral.ext.transaction.transaction(system)`` (nested ``with`` blocks are
savepoints), or with the ``transaction.*`` messages directly::

    with transaction(system) as tx:
        tx.update("order:{7}:items", data={"n": 1})
"""

from corral.actors.transaction._manager import TransactionManager
from corral.actors.transaction._options import TransactionOptions

__all__ = ["TransactionManager", "TransactionOptions"]
