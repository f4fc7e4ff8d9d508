"""The ``state`` manager: typed states with transitions, history, TTL and change events.

Backends: ``memory`` (this process) and ``redis`` (one Lua script call per change,
with every event also in a capped Redis Stream for durable subscribers). Config::

    [managers.state]
    backend = "redis"            # "auto" (default): redis when the system has a Redis URL
    history_limit = 100          # changes kept per state
    stream_max_len = 100000      # events kept in the durable stream
    max_data_bytes = 65536       # a state's data, msgpack-encoded
    expiry_interval = 1.0        # seconds between TTL sweeps
    partitions = 16              # Redis: states spread over this many streams and slots
    wait_replicas = 0            # a write is acknowledged once this many replicas have it
    wait_timeout = 1.0           # ...or refused as BackendUnavailable after this long

Use::

    system.ask(StateRegister(state_id="s1", state_type="Session", ttl=1800))
    system.ask(StateUpdate(state_id="s1", data={"cart": [1, 2]}, expected_version=1))
    system.subscribe("state.changed.Session.*", callback=print)
"""

from corral.actors.state._manager import StateManager
from corral.actors.state._options import StateOptions

__all__ = ["StateManager", "StateOptions"]
