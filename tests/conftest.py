"""Every run gets its own database and vhost. Their names go into the environment before any Callflow code reads
its settings; they are created only when a test needs them, so `pytest tests/unit` needs neither PostgreSQL nor
RabbitMQ."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.isolation import Isolation

WEBHOOK_SECRET = "test-webhook-secret-0123456789abcdef"
_isolation = Isolation.new()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.update(
        DATABASE_URL=_isolation.database_url,
        RABBITMQ_URL=_isolation.rabbitmq_url,
        WEBHOOK_SECRET=WEBHOOK_SECRET,
        SENTRY_DSN="",
        SWEEP_INTERVAL_SECONDS="1",
    )


@pytest.fixture(scope="session")
def isolation() -> Iterator[Isolation]:
    """This run's database (migrated) and vhost, dropped at the end of the run."""
    from shared.core import migrate
    from tests.support.components import components

    _isolation.create()
    try:
        migrate.upgrade(_isolation.database_url)
        yield _isolation
    finally:
        components().engine.dispose()
        _isolation.destroy()
