"""What Callflow does with each answer Bolna can give, or fail to give, against the real processes and a simulator
that produces them: an ambiguous answer is never redialled, a lost webhook or a lost `completed` is still applied
and billed once, and a call nobody can find gives its slot back within the bound.

The e2e stack runs with INITIATING_LEASE_SECONDS=8, RECONCILE_AFTER_SECONDS=4, OUTCOME_UNKNOWN_AFTER_SECONDS=10
(tests/e2e/conftest.py), so each story plays out in seconds.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from shared.core.errors import ErrorType
from tests.support.factories import Customer, customer, ledger_total, load_call
from tests.support.stack import Stack, wait_until

PHONE = "+14155550123"
SETTLED = 60  # seconds: the lease (8) + the reconcile rounds (sweep 5) + the bound (10), with room to spare


def _place(stack: Stack, owner: Customer) -> dict[str, Any]:
    response = stack.api(
        "POST", "/api/calls", headers=owner.auth, json={"agentId": str(owner.agent_id), "phoneNumber": PHONE}
    )
    assert response.status_code in (201, 202), response.text
    if response.status_code == 202:
        assert set(response.json()) == {"callId", "status"}
    return {**response.json(), "http_status": response.status_code}


def _call_posts(stack: Stack, call_id: str) -> int:
    return sum(
        1
        for request in stack.sim_requests()
        if request["path"] == "/call"
        and (request["body"] or {}).get("user_data", {}).get("callflow_call_id") == call_id
    )


def _completed_and_billed_once(owner: Customer, call_id: str) -> None:
    wait_until(lambda: load_call(uuid.UUID(call_id)).status == "completed", SETTLED, "the call completes")
    call = load_call(uuid.UUID(call_id))
    assert (call.slot_held, call.error_type) == (False, None)
    assert call.credits_charged and ledger_total(owner.user_id) == (1, -call.credits_charged)


class TestAmbiguousAnswers:
    @pytest.mark.parametrize(("mode", "step_seconds"), [("reset", 1.0), ("timeout", 4.0)])
    def test_a_lost_answer_is_202_initiating_never_redialled_and_linked_by_its_webhooks(
        self, sim: Stack, mode, step_seconds
    ):
        owner = customer(max_concurrent_calls=1)
        # The first webhook Callflow sees comes after its answer to the client (a step after the 3 s timeout).
        sim.sim_config(
            lost_answer_rate=1.0,
            lost_answer_mode=mode,
            timeout_seconds=6,
            dropped_webhooks={"queued": 1.0},
            step_delay_seconds=step_seconds,
        )
        placed = _place(sim, owner)
        assert (placed["http_status"], placed["status"]) == (202, "initiating")
        sim.sim_config(lost_answer_rate=0.0)
        _completed_and_billed_once(owner, placed["callId"])
        assert load_call(uuid.UUID(placed["callId"])).execution_id
        assert (_call_posts(sim, placed["callId"]), sim.sim_dials(placed["callId"])) == (1, 1)

    def test_a_lost_answer_whose_webhooks_never_come_is_found_by_searching_bolna(self, sim: Stack):
        owner = customer(max_concurrent_calls=1)
        sim.sim_config(lost_answer_rate=1.0, lost_answer_mode="reset", webhook_drop_rate=1.0)
        placed = _place(sim, owner)
        assert placed["status"] == "initiating"
        sim.sim_config(lost_answer_rate=0.0)
        _completed_and_billed_once(owner, placed["callId"])
        searches = [r for r in sim.sim_requests() if r["path"] == f"/v2/agent/{owner.provider_agent_id}/executions"]
        assert searches, "the call was found through Bolna's execution list"
        assert sim.sim_dials(placed["callId"]) == 1

    def test_a_5xx_holds_the_slot_until_the_call_is_given_up_and_nothing_is_redialled(self, sim: Stack):
        owner = customer(max_concurrent_calls=1)
        sim.sim_config(error_rate=1.0)  # a 5xx, and (unknown to Callflow) nothing placed
        first = _place(sim, owner)
        assert (first["http_status"], first["status"]) == (202, "initiating")
        sim.sim_config(error_rate=0.0)
        second = _place(sim, owner)
        assert (second["http_status"], second["status"]) == (202, "pending"), "the first call still holds the slot"

        wait_until(lambda: load_call(uuid.UUID(first["callId"])).status == "failed", SETTLED, "the first is given up")
        given_up = load_call(uuid.UUID(first["callId"]))
        assert (given_up.error_type, given_up.slot_held) == (ErrorType.BOLNA_OUTCOME_UNKNOWN, False)
        _completed_and_billed_once(owner, second["callId"])
        assert _call_posts(sim, first["callId"]) == 1, "an ambiguous call is never redialled"

        events = sim.sentry.wait_for_events(error_type=str(ErrorType.BOLNA_OUTCOME_UNKNOWN), call_id=first["callId"])
        assert len(events) == 1
        assert (events[0].tags["severity"], events[0].payload["level"]) == ("high", "error")

    def test_a_queued_call_whose_answer_is_lost_is_not_redialled(self, sim: Stack):
        owner = customer(max_concurrent_calls=1)
        sim.sim_config(talk_seconds=3)
        assert _place(sim, owner)["http_status"] == 201
        # No webhook names the queued call before a retry would come due (2–3 s): only its own rule keeps it from
        # being dialled again.
        sim.sim_config(
            lost_answer_rate=1.0, lost_answer_mode="reset", dropped_webhooks={"queued": 1.0}, step_delay_seconds=5
        )
        queued = _place(sim, owner)
        assert queued["status"] == "pending"
        wait_until(lambda: _call_posts(sim, queued["callId"]) == 1, SETTLED, "the queued call is dispatched")
        sim.sim_config(lost_answer_rate=0.0)
        wait_until(lambda: load_call(uuid.UUID(queued["callId"])).status == "completed", SETTLED, "it completes")
        assert (_call_posts(sim, queued["callId"]), sim.sim_dials(queued["callId"])) == (1, 1)


def _completed_without_its_webhook(sim: Stack) -> tuple[Customer, dict[str, Any], str]:
    """A call Bolna completed whose `completed` webhook never came: its owner, the API's answer, its execution."""
    owner = customer(max_concurrent_calls=1)
    sim.sim_config(dropped_webhooks={"completed": 1.0})
    placed = _place(sim, owner)
    assert placed["http_status"] == 201
    execution_id = placed["executionId"]
    wait_until(lambda: sim.sim_execution(execution_id)["status"] == "completed", 30, "Bolna completes the call")
    return owner, placed, execution_id


def _asked(sim: Stack, execution_id: str) -> int:
    """How often Callflow asked Bolna for this execution's record."""
    return sum(1 for request in sim.sim_requests() if request["path"] == f"/executions/{execution_id}")


class TestLostWebhooks:
    def test_a_lost_completed_is_fetched_from_bolna_and_billed_once(self, sim: Stack):
        owner, placed, execution_id = _completed_without_its_webhook(sim)
        _completed_and_billed_once(owner, placed["callId"])
        fetched = [r for r in sim.sim_requests() if r["path"] == f"/executions/{execution_id}"]
        assert fetched, "the completion came from GET /executions/{id}"

    def test_a_completed_sent_before_its_duration_is_billed_from_bolnas_record(self, sim: Stack):
        owner = customer(max_concurrent_calls=1)
        sim.sim_config(completed_without_duration_rate=1.0)
        placed = _place(sim, owner)
        assert placed["http_status"] == 201
        _completed_and_billed_once(owner, placed["callId"])
        record = sim.sim_execution(placed["executionId"])
        assert load_call(uuid.UUID(placed["callId"])).duration_seconds == int(record["conversation_duration"])
        fetched = [r for r in sim.sim_requests() if r["path"] == f"/executions/{placed['executionId']}"]
        assert fetched, "the duration came from GET /executions/{id}"

    def test_a_completed_whose_duration_bolnas_record_lacks_for_a_while_is_billed_once_it_has_it(self, sim: Stack):
        owner = customer(max_concurrent_calls=1)
        sim.sim_config(completed_without_duration_rate=1.0, duration_lag_seconds=6.0)
        placed = _place(sim, owner)
        _completed_and_billed_once(owner, placed["callId"])
        record = sim.sim_execution(placed["executionId"])
        assert load_call(uuid.UUID(placed["callId"])).duration_seconds == int(record["conversation_duration"])
        assert sim.sentry.events(error_type=str(ErrorType.BILLING_DURATION_MISSING), call_id=placed["callId"]) == []

    def test_a_completed_before_its_duration_waits_while_bolna_cannot_be_asked(self, sim: Stack):
        owner = customer(max_concurrent_calls=1)
        sim.sim_config(completed_without_duration_rate=1.0, other_requests_error_rate=1.0)
        placed = _place(sim, owner)
        execution_id = placed["executionId"]
        wait_until(lambda: _asked(sim, execution_id) >= 2, SETTLED, "Callflow asks Bolna, again after a failure")
        waiting = load_call(uuid.UUID(placed["callId"]))
        assert (waiting.credits_charged, waiting.error_type) == (None, None), "nothing decided without Bolna's word"

        sim.sim_config(other_requests_error_rate=0.0)
        _completed_and_billed_once(owner, placed["callId"])
        record = sim.sim_execution(execution_id)
        assert load_call(uuid.UUID(placed["callId"])).duration_seconds == int(record["conversation_duration"])
        assert sim.sentry.events(error_type=str(ErrorType.BILLING_DURATION_MISSING), call_id=placed["callId"]) == []

    def test_a_completed_nobody_can_give_a_duration_is_reported_not_billed_zero(self, sim: Stack):
        owner, placed, execution_id = _completed_without_its_webhook(sim)
        sim.http.post(f"{sim.simulator.url}/_sim/reset")  # Bolna forgets the execution: nothing to ask
        record = {"id": execution_id, "status": "completed", "conversation_duration": None, "telephony_data": {}}
        assert sim.webhook(record).status_code == 200
        events = sim.sentry.wait_for_events(
            error_type=str(ErrorType.BILLING_DURATION_MISSING), call_id=placed["callId"], timeout=SETTLED
        )
        assert len(events) == 1
        call = load_call(uuid.UUID(placed["callId"]))
        assert (call.status, call.error_type, call.credits_charged) == ("completed", "billing_duration_missing", None)
        assert ledger_total(owner.user_id) == (0, 0)


class TestBolnaEndsTheCall:
    @pytest.mark.parametrize(
        ("outcome", "reported_as"),
        [
            ("error", ErrorType.BOLNA_CALL_ERROR),
            ("balance-low", ErrorType.BOLNA_BALANCE_LOW),
            ("canceled", None),
            ("stopped", None),
        ],
    )
    def test_the_call_takes_bolnas_end_unbilled_and_frees_its_slot(self, sim: Stack, outcome, reported_as):
        owner = customer(max_concurrent_calls=1)
        sim.sim_config(outcomes={outcome: 1.0}, step_delay_seconds=3.0)  # time to queue the next call behind it
        ended = _place(sim, owner)
        assert ended["http_status"] == 201
        sim.sim_config(outcomes={"completed": 1.0}, step_delay_seconds=0.1)
        waiting = _place(sim, owner)
        assert waiting["status"] == "pending", "the first call holds the only slot"

        _completed_and_billed_once(owner, waiting["callId"])
        over = load_call(uuid.UUID(ended["callId"]))
        assert (over.status, over.slot_held, over.credits_charged, over.error_type) == (outcome, False, None, None)
        bolna_failures = (ErrorType.BOLNA_CALL_ERROR, ErrorType.BOLNA_BALANCE_LOW)
        if reported_as is not None:
            (event,) = sim.sentry.wait_for_events(error_type=str(reported_as), call_id=ended["callId"])
            assert event.payload["contexts"]["bolna_failure_details"]["error_message"]
            assert event.tags["service"] == "webhook-receiver"
        for error_type in bolna_failures:
            if error_type != reported_as:
                assert sim.sentry.events(error_type=str(error_type), call_id=ended["callId"]) == []
