"""corral: an event-driven actor system for Python services.

Managers run as supervised pykka actors and talk through typed messages::

    import corral
    from corral.messages.system import Ping

    with corral.System() as system:
        assert system.ask(Ping(payload=b"hi")).payload == b"hi"

Define your own messages and managers with :func:`message` and :class:`Manager`,
and pass them to ``System(managers=[...])``.
"""

from corral import errors
from corral.client import Client, connect
from corral.config import Config, load_config
from corral.manager import Asker, AsyncAsker, Manager, handles
from corral.messages.base import Event, Message, Reply, Request, message
from corral.supervisor import ChildSpec
from corral.system import System

__version__ = "0.1.0"

__all__ = [
    "Asker",
    "AsyncAsker",
    "ChildSpec",
    "Client",
    "Config",
    "Event",
    "Manager",
    "Message",
    "Reply",
    "Request",
    "System",
    "__version__",
    "connect",
    "errors",
    "handles",
    "load_config",
    "message",
]
