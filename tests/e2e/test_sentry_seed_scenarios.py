"""The seed's "Testing your Sentry integration", test by test, as a new user tries it: what each test must show in
Sentry, read from the real envelopes the services send."""

from __future__ import annotations

import uuid

import pytest

from shared.core.errors import ErrorType
from shared.observability.sentry import exception_type_name
from tests.e2e.test_campaigns import _campaign_calls, _create, _numbers, _start, _view
from tests.e2e.test_sentry import MASKED_PHONE, REFUSES_CALLS, _assert_reported, _place, _the_event
from tests.support.factories import call_row, customer
from tests.support.queue_details import expected_queue_details
from tests.support.sentry_sink import Item
from tests.support.stack import wait_until

pytestmark = pytest.mark.e2e

PHONE_DIGITS = "4155550123"


def _messages(event: Item) -> list[str]:
    return [crumb.get("message") or "" for crumb in event.payload["breadcrumbs"]["values"]]


def _title_type(event: Item) -> str:
    """The exception type Sentry titles the issue with."""
    return event.payload["exception"]["values"][-1]["type"]


def test_seed_test_1_invalid_agent_id(stack):
    owner = customer()
    unknown_agent = str(uuid.uuid4())
    request_id = uuid.uuid4().hex
    answer = _place(stack, owner, request_id, agentId=unknown_agent)
    assert answer.status_code == 404
    assert answer.json()["error_type"] == "agent_not_found" and "callId" not in answer.json()

    event = _the_event(stack.sentry, ErrorType.AGENT_NOT_FOUND, request_id=request_id)
    contexts = _assert_reported(event, ErrorType.AGENT_NOT_FOUND, "call-initiator", "/api/calls")
    assert event.tags["user_id"] == str(owner.user_id)
    assert event.tags["error_type"] == "agent_not_found"
    assert _title_type(event) == "AgentNotFound"
    details = contexts["call_details"]
    # The call id is the one the call would have had: the request was refused before any call was recorded.
    assert details == {
        "agentId": unknown_agent,
        "userId": str(owner.user_id),
        "callId": details["callId"],
        "phone": MASKED_PHONE,
    }
    assert stack.api("GET", f"/api/calls/{uuid.UUID(details['callId'])}", headers=owner.auth).status_code == 404
    crumbs = event.payload["breadcrumbs"]["values"]
    (starting,) = [i for i, crumb in enumerate(crumbs) if crumb.get("message") == "Starting call initiation"]
    assert crumbs[starting]["data"] == {"call_id": details["callId"]}
    (agent_lookup,) = [
        i for i, crumb in enumerate(crumbs) if crumb.get("category") == "query" and "JOIN agents" in crumb["message"]
    ]
    assert starting < agent_lookup, "the call initiation starts before the agent is looked up"


def test_seed_test_2_webhook_without_execution_id(stack):
    request_id = uuid.uuid4().hex
    answer = stack.webhook({"status": "completed"}, headers={"X-Request-ID": request_id})
    assert answer.status_code == 400 and answer.json()["error_type"] == "missing_execution_id"

    event = _the_event(stack.sentry, ErrorType.MISSING_EXECUTION_ID, request_id=request_id)
    contexts = _assert_reported(event, ErrorType.MISSING_EXECUTION_ID, "webhook-receiver", "/webhooks/bolna")
    assert event.tags["webhook_status"] == "completed"
    assert _title_type(event) == "MissingExecutionId"
    assert contexts["webhook_details"] == {
        "status": "completed",
        "execution_id": None,
        "agent_id": None,
        "has_transcript": False,
        "has_recording": False,
    }
    assert "Webhook received: completed" in _messages(event)


def test_seed_test_2_webhook_details_hold_no_phone_number_or_transcript(stack):
    request_id = uuid.uuid4().hex
    payload = {
        "status": "completed",
        "agent_id": "agent-7",
        "transcript": "user: call me back at +14155550123",
        "telephony_data": {"to_number": f"+1{PHONE_DIGITS}", "recording_url": "https://recordings.example/1.mp3"},
    }
    assert stack.webhook(payload, headers={"X-Request-ID": request_id}).status_code == 400
    event = _the_event(stack.sentry, ErrorType.MISSING_EXECUTION_ID, request_id=request_id)
    details = event.payload["contexts"]["webhook_details"]
    assert (details["agent_id"], details["has_transcript"], details["has_recording"]) == ("agent-7", True, True)
    everything = repr(event.payload)
    assert PHONE_DIGITS not in everything and "call me back" not in everything


def test_seed_test_3_campaign_call_failure_and_no_free_slot(sim):
    owner = customer(credits=100, max_concurrent_calls=1)
    holder = str(uuid.uuid4())
    call_row(owner, status="in-progress", execution_id=holder, slot_held=True)  # the customer's one slot
    sim.sim_config(**REFUSES_CALLS)  # Bolna refuses every call (400)
    campaign_id = _create(sim, owner, _numbers(1))
    _start(sim, owner, campaign_id)
    trace_id = _view(sim, owner, campaign_id)["traceId"]

    # The campaign's start is dispatched while no slot is free: the call waits, and that is not an error.
    wait_until(
        lambda: sim.sentry.transactions(lambda t: t.op == "queue.process" and t.trace_id == trace_id),
        30,
        "the campaign's start is dispatched",
    )
    assert _campaign_calls(campaign_id) == []
    assert sim.sentry.events(user_id=str(owner.user_id)) == []

    completed = {"id": holder, "status": "completed", "telephony_data": {"duration": "30"}}
    assert sim.webhook(completed).status_code == 200  # the slot frees: the campaign's turn
    event = _the_event(sim.sentry, ErrorType.CAMPAIGN_CALL_QUEUE_FAILURE, campaign_id=campaign_id)
    contexts = _assert_reported(event, ErrorType.CAMPAIGN_CALL_QUEUE_FAILURE, "queue-processor", "queue.initiate_call")
    assert _title_type(event) == exception_type_name(ErrorType.CAMPAIGN_CALL_QUEUE_FAILURE)
    (call,) = _campaign_calls(campaign_id)
    assert contexts["queue_details"] == expected_queue_details(call, owner, campaign_id)
    assert contexts["bolna_api"]["status_code"] == 400
    assert [e.tags["error_type"] for e in sim.sentry.events(user_id=str(owner.user_id))] == [
        "campaign_call_queue_failure"
    ]
