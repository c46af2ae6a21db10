"""Bolna's status webhooks: `POST /webhooks/bolna?token=<WEBHOOK_SECRET>`."""

from __future__ import annotations

import hmac
import ipaddress

from flask import Blueprint, Flask, current_app, jsonify, request
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook, WebhookVerificationError
from werkzeug.middleware.proxy_fix import ProxyFix

from shared import webhooks
from shared.config import get_settings, invalid, require
from shared.errors import CallflowError, ErrorType
from shared.web import create_service_app, json_body

SERVICE = "webhook-receiver"
VERIFIER = "callflow.webhook_verifier"
hooks = Blueprint("webhooks", __name__, url_prefix="/webhooks")


@hooks.post("/bolna")
def bolna_webhook():
    _check_source()
    _authenticate()
    receipt = webhooks.ingest(json_body())
    return jsonify(
        {
            "status": "accepted" if receipt.event_id is not None else "duplicate",
            "executionId": receipt.execution_id,
            "eventStatus": receipt.status,
        }
    )


def _check_source() -> None:
    allowed = get_settings().webhook_allowed_ips
    if not allowed:
        return
    try:
        source = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        source = None
    if source is None or not any(source in network for network in allowed):
        raise CallflowError(ErrorType.WEBHOOK_SOURCE_FORBIDDEN, f"Webhooks are not accepted from {source}.")


def _authenticate() -> None:
    """A Standard Webhooks signature over the raw body when the sender signs; else the secret in the URL.

    Bolna does not sign: a long secret in the URL, compared in constant time, is its documented defence.
    """
    settings = get_settings()
    verifier: Webhook | None = current_app.extensions[VERIFIER]
    if verifier is not None and "webhook-signature" in request.headers:
        try:
            verifier.verify(request.get_data(cache=True), dict(request.headers))
        except (WebhookVerificationError, ValueError) as exc:
            raise CallflowError(ErrorType.WEBHOOK_AUTH_FAILED, f"Webhook signature rejected: {exc}") from exc
        return
    token = request.args.get("token", "")
    if not hmac.compare_digest(token.encode(), settings.webhook_secret.encode()):
        raise CallflowError(ErrorType.WEBHOOK_AUTH_FAILED, "Missing or wrong webhook token.")


def create_app() -> Flask:
    settings = require("webhook_secret")
    try:
        verifier = Webhook(settings.webhook_signing_secret) if settings.webhook_signing_secret else None
    except (ValueError, EmptyWebhookSecretError) as exc:
        raise invalid(f"WEBHOOK_SIGNING_SECRET: not a Standard Webhooks secret ({exc})") from exc
    app = create_service_app(SERVICE)
    app.extensions[VERIFIER] = verifier
    if settings.trusted_proxy_count:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_count)
    app.register_blueprint(hooks)
    return app
