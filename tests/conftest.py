"""Every run gets its own database and vhost, created here before any Callflow code reads its settings."""

from __future__ import annotations

import os

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
    _isolation.create()
    from shared.core import migrate

    migrate.upgrade(_isolation.database_url)


def pytest_unconfigure(config: pytest.Config) -> None:
    from tests.support.components import components

    components().engine.dispose()
    _isolation.destroy()


@pytest.fixture(scope="session")
def isolation() -> Isolation:
    return _isolation
