"""Bolna's status webhooks: `POST /webhooks/bolna?token=<WEBHOOK_SECRET>`."""

from __future__ import annotations

from flask import Blueprint, Flask, jsonify, request
from werkzeug.middleware.proxy_fix import ProxyFix

from services.webhook_receiver.source_checks import SourceChecks
from shared.bootstrap import Components
from shared.calls import provider_events
from shared.http.app import create_http_app
from shared.http.bodies import provider_json_body

SERVICE = "webhook-receiver"
# A long call's transcript runs to megabytes, and a webhook refused for its size would be retried until Bolna gives
# up on it. Far above any real execution object, and still a bound on what one request can make a worker hold.
WEBHOOK_MAX_BODY_BYTES = 16 * 1024 * 1024
WEBHOOK_PATH = "/webhooks/bolna"
# Each webhook's work is traced as `webhook.process` in its call's trace, sampled with the call; its other routes are
# probes. So no request is a transaction of its own (shared/observability/sentry.py, `init_sentry`).
HTTP_TRANSACTIONS = False


def create_app(components: Components, checks: SourceChecks) -> Flask:
    app = create_http_app(SERVICE, components.health(SERVICE))
    if components.settings.trusted_proxy_count:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=components.settings.trusted_proxy_count)
    app.register_blueprint(_webhooks(components, checks))
    return app


def _webhooks(components: Components, checks: SourceChecks) -> Blueprint:
    hooks = Blueprint("webhooks", __name__)

    @hooks.post(WEBHOOK_PATH)
    def bolna_webhook():
        request.max_content_length = WEBHOOK_MAX_BODY_BYTES  # a signature is checked over the raw body: set first
        checks.check_source()
        checks.authenticate()  # before the body is parsed
        receipt = provider_events.ingest(components.uow, provider_json_body())
        return jsonify(
            {
                "status": "accepted" if receipt.event_id is not None else "duplicate",
                "executionId": receipt.execution_id,
                "eventStatus": receipt.status,
            }
        )

    return hooks
