"""Health: what every service's `GET /health` answers."""

from __future__ import annotations

import logging
from typing import Any

from shared import db, messaging
from shared.config import Settings
from shared.observability import database_recovered, sentry_status

log = logging.getLogger(__name__)


def check(service: str, settings: Settings) -> tuple[dict[str, Any], int]:
    checks = {
        "database": _probe(db.ping),
        "rabbitmq": _probe(lambda: messaging.ping(settings.rabbitmq_url)),
    }
    healthy = all(result == "ok" for result in checks.values())
    if checks["database"] == "ok":
        database_recovered()
    body = {
        "status": "ok" if healthy else "unavailable",
        "service": service,
        "sentry": sentry_status(settings),
        "checks": checks,
    }
    return body, 200 if healthy else 503


def _probe(probe) -> str:
    try:
        probe()
    except Exception as exc:  # any failure makes the dependency unhealthy; the reason is shown
        log.warning("health check failed: %r", exc)
        return f"error: {type(exc).__name__}"
    return "ok"
