"""Is this webhook from Bolna? The source address (allow-list), then a Standard Webhooks signature or the secret
token in the URL."""

from __future__ import annotations

import hmac
import ipaddress

from flask import request
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook, WebhookVerificationError

from shared.core.config import Settings, invalid
from shared.core.errors import CallflowError, ErrorType


class SourceChecks:
    def __init__(self, settings: Settings):
        self._allowed = settings.webhook_allowed_ips
        self._secret = settings.webhook_secret.encode()
        try:
            self._verifier = Webhook(settings.webhook_signing_secret) if settings.webhook_signing_secret else None
        except (ValueError, EmptyWebhookSecretError) as exc:
            raise invalid(f"WEBHOOK_SIGNING_SECRET: not a Standard Webhooks secret ({exc})") from exc

    def check_source(self) -> None:
        if not self._allowed:
            return
        try:
            source = ipaddress.ip_address(request.remote_addr or "")
        except ValueError:
            source = None
        if isinstance(source, ipaddress.IPv6Address) and source.ipv4_mapped is not None:
            source = source.ipv4_mapped  # an IPv4 client seen through a dual-stack socket or proxy
        if source is None or not any(source in network for network in self._allowed):
            raise CallflowError(ErrorType.WEBHOOK_SOURCE_FORBIDDEN, f"Webhooks are not accepted from {source}.")

    def authenticate(self) -> None:
        """A Standard Webhooks signature over the raw body when the sender signs; else the secret in the URL.

        Bolna does not sign: a long secret in the URL, compared in constant time, is its documented defence.
        """
        if self._verifier is not None and "webhook-signature" in request.headers:
            try:
                self._verifier.verify(request.get_data(cache=True), dict(request.headers))
            except (WebhookVerificationError, ValueError) as exc:
                raise CallflowError(ErrorType.WEBHOOK_AUTH_FAILED, f"Webhook signature rejected: {exc}") from exc
            return
        token = request.args.get("token", "")
        if not hmac.compare_digest(token.encode(), self._secret):
            raise CallflowError(ErrorType.WEBHOOK_AUTH_FAILED, "Missing or wrong webhook token.")
