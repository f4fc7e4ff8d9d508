"""The ``auth`` manager (JWT tokens, denylist, API keys): see docs/auth.md.

::

    from corral.actors.auth import AuthManager
    from corral.messages.auth import AuthIssue, AuthValidate

    with corral.System(managers=[AuthManager]) as system:
        tokens = system.ask(AuthIssue(subject="user:42"))
        system.ask(AuthValidate(token=tokens.access_token)).subject    # 'user:42'
"""

from corral.actors.auth._manager import AuthManager
from corral.actors.auth._options import AuthOptions

__all__ = ["AuthManager", "AuthOptions"]
