"""Health: what every service's `GET /health` answers."""

from __future__ import annotations

import logging
from typing import Any

from shared import db, messaging
from shared.config import Settings

log = logging.getLogger(__name__)


def check(service: str, settings: Settings) -> tuple[dict[str, Any], int]:
    checks = {
        "database": _probe(db.ping),
        "rabbitmq": _probe(lambda: messaging.ping(settings.rabbitmq_url)),
    }
    healthy = all(result == "ok" for result in checks.values())
    body = {
        "status": "ok" if healthy else "unavailable",
        "service": service,
        "sentry": {"configured": bool(settings.sentry_dsn), "environment": settings.sentry_environment},
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
