"""A small HTTP cache API written once against corral's interface.

``create_app(corral_system)`` takes anything with ``ask``: an in-process
``corral.System`` or a ``corral.connect(url)`` client. The two entry points,
``flask_embedded.py`` and ``flask_remote.py``, differ only in which they pass.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from corral.errors import CorralError
from corral.messages.cache import CacheDelete, CacheGet, CacheSet
from corral.messages.system import SystemHealthCheck


def create_app(corral_system: Any) -> Flask:
    app = Flask(__name__)

    @app.get("/cache/<key>")
    def get(key: str) -> ResponseReturnValue:
        reply = corral_system.ask(CacheGet(key=key))
        if not reply.found:
            return jsonify(error=f"no value for {key!r}"), 404
        return jsonify(key=key, value=reply.value)

    @app.put("/cache/<key>")
    def put(key: str) -> ResponseReturnValue:
        body = request.get_json(force=True, silent=True) or {}
        ttl = body.get("ttl")
        corral_system.ask(CacheSet(key=key, value=body.get("value"), ttl=ttl))
        return jsonify(key=key, stored=True), 201

    @app.delete("/cache/<key>")
    def delete(key: str) -> ResponseReturnValue:
        return jsonify(deleted=corral_system.ask(CacheDelete(key=key)).count)

    @app.get("/health")
    def health() -> ResponseReturnValue:
        status = corral_system.ask(SystemHealthCheck()).status
        return jsonify(status=status), 503 if status == "unhealthy" else 200

    @app.errorhandler(CorralError)
    def corral_error(exc: CorralError) -> ResponseReturnValue:
        status = 503 if exc.code in ("manager_unavailable", "backend_unavailable") else 400
        return jsonify(error=exc.code, message=str(exc)), status

    return app
