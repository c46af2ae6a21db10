"""Sentry: one setup every service calls at start, and `report` for the errors of the error table."""

from __future__ import annotations

import logging

import sentry_sdk
from sentry_sdk.integrations.flask import FlaskIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.integrations.sqlalchemy import SqlalchemyIntegration

from shared.config import Settings
from shared.errors import CallflowError, Capture

log = logging.getLogger(__name__)


def init_sentry(service: str, settings: Settings) -> bool:
    """Initialises the SDK for `service`; returns whether events are sent."""
    enabled = bool(settings.sentry_dsn)
    sentry_sdk.init(
        dsn=settings.sentry_dsn or None,
        environment=settings.sentry_environment,
        release=settings.sentry_release or None,
        traces_sample_rate=settings.sentry_traces_sample_rate,
        send_default_pii=settings.sentry_send_default_pii,
        integrations=[FlaskIntegration(), SqlalchemyIntegration(), LoggingIntegration()],
    )
    sentry_sdk.set_tag("service", service)
    log.info("Sentry initialized: enabled: %s", enabled)
    return enabled


def report(error: CallflowError, cause: BaseException | None = None) -> None:
    """Reports an error of the table: as an event or a breadcrumb, with its level, tags and fingerprint."""
    spec = error.spec
    if spec.capture is Capture.BREADCRUMB:
        sentry_sdk.add_breadcrumb(category=error.error_type, message=error.detail, level=spec.level)
        return
    with sentry_sdk.new_scope() as scope:
        scope.level = spec.level
        scope.set_tag("error_type", error.error_type)
        scope.set_tag("severity", spec.severity)
        for key, value in error.context.items():
            scope.set_tag(key, str(value))
        scope.fingerprint = [error.error_type]
        sentry_sdk.capture_exception(cause or error)
    log.log(
        logging.ERROR if spec.level in ("error", "fatal") else logging.WARNING,
        "%s: %s",
        error.error_type,
        error.detail,
    )
