"""The e2e suite shares one stack of real processes, reporting to one Sentry sink."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.isolation import Isolation
from tests.support.sentry_sink import SentrySink
from tests.support.stack import FAST_CALLS, Stack, running_stack

E2E_ENV = {
    # Tests make Bolna fail on purpose, often: the breaker has its own test, with its own process.
    "BOLNA_BREAKER_THRESHOLD": "1000000",
    "DISPATCH_MAX_ATTEMPTS": "2",
    # Bolna's silence is acted on in seconds, not minutes (BOLNA_TIMEOUT_SECONDS is 3 here).
    "INITIATING_LEASE_SECONDS": "8",
    "RECONCILE_AFTER_SECONDS": "4",
    "OUTCOME_UNKNOWN_AFTER_SECONDS": "10",
}


@pytest.fixture(scope="package")
def sentry() -> Iterator[SentrySink]:
    sink = SentrySink().start()
    yield sink
    sink.stop()


@pytest.fixture(scope="package")
def stack(isolation: Isolation, sentry: SentrySink, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(sentry, tmp_path_factory.mktemp("service-logs"), E2E_ENV, FAST_CALLS) as stack:
        yield stack


@pytest.fixture
def sim(stack: Stack) -> Iterator[Stack]:
    """The stack with the simulator back at fast, clean defaults after the test, whatever it changed."""
    yield stack
    stack.sim_config(**FAST_CALLS)


@pytest.fixture(scope="session", autouse=True)
def _own_database_and_vhost(isolation: Isolation) -> Isolation:
    """Every test here talks to this run's PostgreSQL database and RabbitMQ vhost."""
    return isolation
