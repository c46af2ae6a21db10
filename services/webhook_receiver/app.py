"""Bolna's status webhooks: `POST /webhooks/bolna?token=<WEBHOOK_SECRET>`."""

from __future__ import annotations

from flask import Blueprint, Flask, jsonify
from werkzeug.middleware.proxy_fix import ProxyFix

from services.webhook_receiver.source_checks import SourceChecks
from shared.bootstrap import Components
from shared.calls import provider_events
from shared.http.app import create_http_app
from shared.http.bodies import json_body

SERVICE = "webhook-receiver"


def create_app(components: Components, checks: SourceChecks) -> Flask:
    app = create_http_app(SERVICE, components.health(SERVICE))
    if components.settings.trusted_proxy_count:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=components.settings.trusted_proxy_count)
    app.register_blueprint(_webhooks(components, checks))
    return app


def _webhooks(components: Components, checks: SourceChecks) -> Blueprint:
    hooks = Blueprint("webhooks", __name__, url_prefix="/webhooks")

    @hooks.post("/bolna")
    def bolna_webhook():
        checks.check_source()
        checks.authenticate()
        receipt = provider_events.ingest(components.uow, json_body())
        return jsonify(
            {
                "status": "accepted" if receipt.event_id is not None else "duplicate",
                "executionId": receipt.execution_id,
                "eventStatus": receipt.status,
            }
        )

    return hooks
