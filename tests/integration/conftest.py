"""Every test here talks to this run's PostgreSQL database and RabbitMQ vhost."""

from __future__ import annotations

import pytest

from tests.support.isolation import Isolation


@pytest.fixture(scope="session", autouse=True)
def _own_database_and_vhost(isolation: Isolation) -> Isolation:
    return isolation
