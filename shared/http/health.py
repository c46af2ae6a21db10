"""Health: what every service's `GET /health`, `GET /health/live` and `GET /health/ready` answer.

`/health/live` is the process alone (a liveness probe must never restart a pod because a dependency is down);
`/health/ready` and `/health` probe PostgreSQL and RabbitMQ, at most once per READY_CACHE_SECONDS, so probes from
every replica, however frequent, cannot load them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from shared.core import db
from shared.core.config import Settings
from shared.messaging import topology
from shared.observability.sentry import database_recovered, sentry_status

log = logging.getLogger(__name__)


READY_CACHE_SECONDS = 2.0


class HealthCheck:
    """Probes the service's dependencies (PostgreSQL and RabbitMQ) and says how Sentry is set up."""

    def __init__(self, service: str, settings: Settings, engine: Engine):
        self._service = service
        self._settings = settings
        self._engine = engine
        self._lock = threading.Lock()
        self._checked: tuple[float, dict[str, str]] | None = None

    def check(self) -> tuple[dict[str, Any], int]:
        """`/health`: the dependencies and Sentry's settings; 503 naming a dependency that is down."""
        checks = self._dependencies()
        healthy = all(result == "ok" for result in checks.values())
        body = {
            "status": "ok" if healthy else "unavailable",
            "service": self._service,
            "sentry": sentry_status(self._settings),
            "checks": checks,
        }
        return body, 200 if healthy else 503

    def ready(self) -> tuple[dict[str, Any], int]:
        """`/health/ready`: whether the service can do its work (its database and broker answer)."""
        checks = self._dependencies()
        healthy = all(result == "ok" for result in checks.values())
        return {"status": "ok" if healthy else "unavailable", "service": self._service, "checks": checks}, (
            200 if healthy else 503
        )

    def live(self) -> tuple[dict[str, Any], int]:
        """`/health/live`: the process answers; no dependency is asked."""
        return {"status": "ok", "service": self._service}, 200

    def _dependencies(self) -> dict[str, str]:
        """Each dependency's state, probed at most once per READY_CACHE_SECONDS (one probe at a time)."""
        with self._lock:
            if self._checked is not None and time.monotonic() - self._checked[0] < READY_CACHE_SECONDS:
                return self._checked[1]
            started = time.monotonic()  # the age of the oldest probe: a slow broker probe does not extend it
            checks = {
                "database": _probe(lambda: db.ping(self._engine)),
                "rabbitmq": _probe(lambda: topology.ping(self._settings.rabbitmq_url)),
            }
            self._checked = (started, checks)
        if checks["database"] == "ok":
            database_recovered()
        return checks


def _probe(probe: Callable[[], None]) -> str:
    try:
        probe()
    except Exception as exc:  # any failure makes the dependency unhealthy; the reason is shown
        log.warning("health check failed: %r", exc)
        return f"error: {type(exc).__name__}"
    return "ok"
