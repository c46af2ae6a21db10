"""Phase 3 of the seed: what the alerts of deploy/sentry watch, produced by the real services.

- a failing credit deduction: an event tagged `error_type:credit_deduction_failed`, `severity:critical`, with the
  call and user (tests/e2e/test_sentry.py::test_failed_credit_deduction_is_reported_and_charged_exactly_once_later);
- a database connection error: one `database_error` event per outage, `severity:critical`
  (tests/e2e/test_sentry.py::test_database_outage_is_reported_once_not_per_request);
- a slow provider: the `http.client` span of Bolna's `POST /call`, with its duration (below).
"""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.e2e.test_sentry import _place
from tests.support.factories import customer
from tests.support.stack import wait_until

pytestmark = pytest.mark.e2e

LATENCY_MS = 1500


def _seconds(span: dict) -> float:
    return (datetime.fromisoformat(span["timestamp"]) - datetime.fromisoformat(span["start_timestamp"])).total_seconds()


def test_a_slow_provider_shows_as_the_duration_of_its_http_client_span(sim):
    owner = customer()
    sim.sim_config(latency_ms=LATENCY_MS)
    placed = _place(sim, owner)
    assert placed.status_code == 201
    trace_id = sim.call(owner.auth, placed.json()["callId"])["traceId"]

    (request,) = wait_until(
        lambda: sim.sentry.transactions(lambda t: t.op == "http.server" and t.trace_id == trace_id),
        30,
        "the request's transaction",
    )
    spans = request.payload["spans"]
    (bolna,) = [span for span in spans if span["op"] == "http.client" and span["description"].endswith("/call")]
    assert bolna["description"] == f"POST {sim.simulator.url}/call"
    assert bolna["data"]["http.method"] == "POST"
    assert bolna["data"]["http.response.status_code"] == 200
    # The simulator waits LATENCY_MS before it answers: the span lasts at least that long.
    assert _seconds(bolna) >= LATENCY_MS / 1000
    (initiate,) = [span for span in spans if span["op"] == "call.initiate"]
    assert bolna["parent_span_id"] == initiate["span_id"], "Bolna's request belongs to the call's initiation"
