"""Health: what every service's `GET /health` answers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from shared.core import db
from shared.core.config import Settings
from shared.messaging import topology
from shared.observability.sentry import database_recovered, sentry_status

log = logging.getLogger(__name__)


class HealthCheck:
    """Probes the service's dependencies (PostgreSQL and RabbitMQ) and says how Sentry is set up."""

    def __init__(self, service: str, settings: Settings, engine: Engine):
        self._service = service
        self._settings = settings
        self._engine = engine

    def check(self) -> tuple[dict[str, Any], int]:
        checks = {
            "database": _probe(lambda: db.ping(self._engine)),
            "rabbitmq": _probe(lambda: topology.ping(self._settings.rabbitmq_url)),
        }
        healthy = all(result == "ok" for result in checks.values())
        if checks["database"] == "ok":
            database_recovered()
        body = {
            "status": "ok" if healthy else "unavailable",
            "service": self._service,
            "sentry": sentry_status(self._settings),
            "checks": checks,
        }
        return body, 200 if healthy else 503


def _probe(probe: Callable[[], None]) -> str:
    try:
        probe()
    except Exception as exc:  # any failure makes the dependency unhealthy; the reason is shown
        log.warning("health check failed: %r", exc)
        return f"error: {type(exc).__name__}"
    return "ok"
