"""The webhook-receiver's composition root: its secrets are checked before anything starts."""

from __future__ import annotations

from flask import Flask

from services.webhook_receiver.app import HTTP_TRANSACTIONS, SERVICE, create_app
from services.webhook_receiver.source_checks import SourceChecks
from shared.bootstrap import start_service
from shared.core.config import Settings, require


def source_checks(settings: Settings) -> SourceChecks:
    """Fails at start, naming the variable, without WEBHOOK_SECRET or with a malformed signing secret."""
    return SourceChecks(require(settings, "webhook_secret"))


def bootstrap(settings: Settings) -> Flask:
    checks = source_checks(settings)
    return create_app(start_service(SERVICE, settings, HTTP_TRANSACTIONS), checks)
