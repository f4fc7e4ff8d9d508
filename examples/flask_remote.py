"""The same cache API, talking to a running daemon (``corral run`` with the bus on Redis).

Run: ``CORRAL_URL=redis://127.0.0.1:6379/0 .venv/bin/flask --app examples.flask_remote run``
against a daemon started with ``CORRAL_BUS_BACKEND=redis CORRAL_MANAGERS_CACHE_ENABLED=true
.venv/bin/corral run``.
"""

from __future__ import annotations

import atexit
import os

import corral
from examples.cache_api import create_app

client = corral.connect(
    os.environ.get("CORRAL_URL", "redis://127.0.0.1:6379/0"),
    namespace=os.environ.get("CORRAL_NAMESPACE", "corral"),
)
atexit.register(client.close)

app = create_app(client)
