"""`python -m bench.baselines.echo`: a bare Flask app that answers every POST with the body it got (JSON parsed and
serialised again, anything else, such as a CSV upload, as it came).

What serving a request costs on its own under the services' gunicorn setup: no database, no broker, no Sentry.
"""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

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
        if request.is_json:
            return jsonify(request.get_json())
        return Response(request.get_data(), mimetype=request.mimetype)

    return app


if __name__ == "__main__":
    serve(create_app, load_settings(), DEFAULT_PORT)
