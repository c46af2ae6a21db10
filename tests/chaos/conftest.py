"""A stack under faults: a flaky, slow provider that loses answers and webhooks, duplicates and reorders the rest;
short slot leases."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import broker
from tests.support.isolation import Isolation
from tests.support.sentry_sink import SentrySink
from tests.support.stack import FAST_CALLS, Stack, running_stack

CHAOS_ENV = {
    "BOLNA_TIMEOUT_SECONDS": "1.5",
    "BOLNA_BREAKER_COOLDOWN_SECONDS": "3",
    "SLOT_LEASE_SECONDS": "20",
    "DISPATCH_MAX_ATTEMPTS": "5",
    # Messages must place the queued calls: a sweep as frequent as the other jobs would hide a broken message path.
    "PENDING_SWEEP_INTERVAL_SECONDS": "60",
    # Bolna's silence is acted on within seconds: lost answers searched, lost completions fetched, unknowns given up.
    "SWEEP_INTERVAL_SECONDS": "2",
    "INITIATING_LEASE_SECONDS": "4",
    "RECONCILE_AFTER_SECONDS": "3",
    # An unconfirmed call is given up at its first search that finds nothing: a quarter of the calls end so, each
    # holding its slot meanwhile, and a customer with a limit of 2 gets over 60 calls.
    "OUTCOME_UNKNOWN_AFTER_SECONDS": "4",
}
FLAKY_PROVIDER = {
    **FAST_CALLS,
    "error_rate": 0.20,
    "timeout_rate": 0.05,
    "timeout_seconds": 2.5,
    "duplicate_rate": 0.30,
    "reorder_rate": 0.20,
    # Bolna placed the call, but its answer never arrives; and a completion's webhook that never comes.
    "lost_answer_rate": 0.10,
    "lost_answer_mode": "reset",
    "dropped_webhooks": {"completed": 0.10},
    # Bolna failing when asked about a call (its record, the agent's executions) or told to stop one.
    "other_requests_error_rate": 0.15,
    # A `completed` before Bolna wrote its duration, which Callflow must ask Bolna for before billing.
    "completed_without_duration_rate": 0.10,
    # Besides the callee's answers and the carrier's failure, Bolna's own ends: its fault, its account out of credit.
    "outcomes": {"completed": 0.66, "busy": 0.1, "no-answer": 0.1, "failed": 0.08, "error": 0.03, "balance-low": 0.03},
}


@pytest.fixture(scope="package")
def chaos_stack(isolation: Isolation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    sink = SentrySink().start()
    try:
        with running_stack(sink, tmp_path_factory.mktemp("chaos-logs"), CHAOS_ENV, FLAKY_PROVIDER) as stack:
            yield stack
    finally:
        sink.stop()


@pytest.fixture
def broker_restored() -> Iterator[None]:
    """Whatever a test does to RabbitMQ, it is running again afterwards."""
    yield
    broker.start_broker()


@pytest.fixture(scope="session", autouse=True)
def _own_database_and_vhost(isolation: Isolation) -> Isolation:
    """Every test here talks to this run's PostgreSQL database and RabbitMQ vhost."""
    return isolation
