"""Bolna's status webhooks: `POST /webhooks/bolna?token=<WEBHOOK_SECRET>`."""

from __future__ import annotations

import hmac

from flask import Blueprint, Flask, jsonify, request

from shared import webhooks
from shared.config import get_settings, require
from shared.errors import CallflowError, ErrorType
from shared.web import create_service_app, json_body

SERVICE = "webhook-receiver"
hooks = Blueprint("webhooks", __name__, url_prefix="/webhooks")


@hooks.post("/bolna")
def bolna_webhook():
    # Bolna does not sign webhooks: a long secret in the URL, compared in constant time, is the defence.
    token = request.args.get("token", "")
    if not hmac.compare_digest(token.encode(), get_settings().webhook_secret.encode()):
        raise CallflowError(ErrorType.WEBHOOK_AUTH_FAILED, "Missing or wrong webhook token.")
    receipt = webhooks.store(json_body())
    if receipt.event_id is not None:
        webhooks.process(receipt.event_id)
    return jsonify(
        {
            "status": "accepted" if receipt.event_id is not None else "duplicate",
            "executionId": receipt.execution_id,
            "eventStatus": receipt.status,
        }
    )


def create_app() -> Flask:
    require("webhook_secret")
    app = create_service_app(SERVICE)
    app.register_blueprint(hooks)
    return app
