"""The cache API with corral running inside the Flask process.

Run: ``.venv/bin/flask --app examples.flask_embedded run`` then
``curl -X PUT localhost:5000/cache/a -d '{"value": 1}'`` and ``curl localhost:5000/cache/a``.
"""

from __future__ import annotations

import atexit

import corral
from corral.config import ManagerSection
from examples.cache_api import create_app

config = corral.load_config()  # $CORRAL_CONFIG and CORRAL_* variables apply
if "cache" not in config.managers:
    config = config.replace(managers={**config.managers, "cache": ManagerSection()})
system = corral.System(config).start()
atexit.register(system.stop)

app = create_app(system)
