"""`python -m bench.baselines.echo`: a bare Flask app that answers every POST with the JSON it got.

What serving a JSON request costs on its own under the services' gunicorn setup: no database, no broker, no Sentry.
"""

from __future__ import annotations

from flask import Flask, jsonify, request

from shared.core.config import load_settings
from shared.http.server import serve

DEFAULT_PORT = 8020


def create_app() -> Flask:
    app = Flask(__name__)

    @app.get("/health")
    def health():
        return jsonify(status="ok")

    @app.post("/<path:path>")
    def echo(path: str):
        return jsonify(request.get_json())

    return app


if __name__ == "__main__":
    serve(create_app, load_settings(), DEFAULT_PORT)
