"""The built-in managers: one package per manager, each a :class:`corral.Manager`."""

BUILTIN: dict[str, str] = {
    "system": "corral.actors.system:SystemManager",
    "websocket": "corral.actors.websocket:WebSocketManager",
    "auth": "corral.actors.auth:AuthManager",
    "cache": "corral.actors.cache:CacheManager",
    "pool": "corral.actors.pool:PoolManager",
    "ratelimit": "corral.actors.ratelimit:RatelimitManager",
    "state": "corral.actors.state:StateManager",
    "transaction": "corral.actors.transaction:TransactionManager",
}
"""Built-in managers by name, as import paths (loaded only when configured)."""

__all__ = ["BUILTIN"]
