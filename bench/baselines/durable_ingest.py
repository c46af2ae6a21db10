"""`python -m bench.baselines.durable_ingest`: the least a webhook receiver must do to be durable and correct.

Plain psycopg, no ORM, one connection per server thread, and one transaction per webhook: store the event (a
duplicate stores nothing), lock its call, move the call's status forward only, mark the event applied. Same
database and tables as Callflow; what it leaves out (Sentry, billing, the outbox, kept events) is what the
figures price.
"""

from __future__ import annotations

import json
import threading

import psycopg
from flask import Flask, abort, jsonify, request

from bench.seed import conninfo
from shared.calls import statuses
from shared.core.config import load_settings
from shared.http.server import serve

DEFAULT_PORT = 8021

STORE_EVENT = """
INSERT INTO webhook_events (execution_id, status, attempt, payload) VALUES (%s, %s, 0, %s::jsonb)
ON CONFLICT ON CONSTRAINT uq_webhook_events_execution_status DO NOTHING
RETURNING id
"""
LOCK_CALL = "SELECT id, status FROM calls WHERE execution_id = %s FOR UPDATE"
MOVE_CALL = "UPDATE calls SET status = %s, updated_at = now() WHERE id = %s"
MARK_APPLIED = "UPDATE webhook_events SET applied_at = now(), call_id = %s WHERE id = %s"


def create_app(database: str) -> Flask:
    app = Flask(__name__)
    local = threading.local()  # gunicorn's threads each keep their own connection

    def connection() -> psycopg.Connection:
        if getattr(local, "connection", None) is None:
            local.connection = psycopg.connect(database, autocommit=True)
        return local.connection

    @app.get("/health")
    def health():
        connection().execute("SELECT 1")
        return jsonify(status="ok")

    @app.post("/webhooks/bolna")
    def ingest():
        raw = request.get_data(as_text=True)
        webhook = json.loads(raw)
        execution_id, status = webhook.get("id"), webhook.get("status")
        if not execution_id or not status:
            abort(400)
        conn = connection()
        with conn.transaction():
            event = conn.execute(STORE_EVENT, (execution_id, status, raw)).fetchone()
            if event is None:
                return jsonify(status="duplicate")
            call = conn.execute(LOCK_CALL, (execution_id,)).fetchone()
            if call is not None:
                call_id, current = call
                if statuses.moves_forward(current, status):
                    conn.execute(MOVE_CALL, (status, call_id))
                conn.execute(MARK_APPLIED, (call_id, event[0]))
        return jsonify(status="accepted")

    return app


if __name__ == "__main__":
    settings = load_settings()
    serve(lambda: create_app(conninfo(settings.database_url)), settings, DEFAULT_PORT)
