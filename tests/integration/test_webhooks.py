"""Webhooks: stored once, applied once, never backwards, and kept until their call is known."""

import uuid

import pytest

from shared.bolna.client import PlacedCall
from shared.calls import provider_events, statuses
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import WebhookEvent
from tests.support.components import components
from tests.support.factories import call_row, credits_of, customer, ledger_total, load_call


def _event(execution_id: str, status: str, **fields) -> dict:
    return {"id": execution_id, "status": status, **fields}


def _deliver(payload: dict) -> provider_events.Receipt:
    receipt = provider_events.store(components().uow, payload)
    if receipt.event_id is not None:
        provider_events.apply_stored(components().uow, receipt.event_id)
    return receipt


@pytest.mark.parametrize(
    ("payload", "error_type"),
    [
        ({}, ErrorType.EMPTY_WEBHOOK_PAYLOAD),
        (None, ErrorType.EMPTY_WEBHOOK_PAYLOAD),
        ([1, 2], ErrorType.EMPTY_WEBHOOK_PAYLOAD),
        ({"status": "completed"}, ErrorType.MISSING_EXECUTION_ID),
        ({"id": "x"}, ErrorType.VALIDATION_ERROR),
    ],
)
def test_invalid_webhooks_are_refused(payload, error_type):
    with pytest.raises(CallflowError) as raised:
        provider_events.store(components().uow, payload)
    assert raised.value.error_type is error_type


def test_duplicate_is_stored_once():
    execution_id = str(uuid.uuid4())
    uow = components().uow
    assert provider_events.store(uow, _event(execution_id, "ringing")).event_id is not None
    assert provider_events.store(uow, _event(execution_id, "ringing")).event_id is None
    assert provider_events.store(uow, _event(execution_id, "ringing", retry_count=1)).event_id is not None


def test_out_of_order_and_duplicate_events_leave_one_final_state_and_one_charge():
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="queued", execution_id=execution_id, slot_held=True)
    completed = _event(
        execution_id,
        "completed",
        telephony_data={"duration": "61", "recording_url": "https://rec.example/1"},
        transcript="assistant: hi\nuser: hello",
    )
    for payload in [
        _event(execution_id, "ringing"),
        completed,
        _event(execution_id, "in-progress"),
        completed,
        _event(execution_id, "call-disconnected"),
        _event(execution_id, "ringing"),
    ]:
        _deliver(payload)

    final = load_call(call.id)
    assert final.status == "completed"
    assert final.credits_charged == 2
    assert final.duration_seconds == 61
    assert final.transcript == "assistant: hi\nuser: hello"
    assert final.recording_url == "https://rec.example/1"
    assert not final.slot_held
    assert ledger_total(owner.user_id) == (1, -2)
    assert credits_of(owner.user_id) == 8


def test_event_for_an_unknown_execution_is_kept_and_applied_when_the_call_is_linked():
    owner = customer()
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status=statuses.INITIATING, slot_held=True)
    uow = components().uow
    receipt = provider_events.store(uow, _event(execution_id, "ringing"))
    assert provider_events.apply_stored(uow, receipt.event_id) is False
    assert load_call(call.id).status == statuses.INITIATING

    components().placer.link_execution(call.id, PlacedCall(execution_id, "queued", 1.0))
    linked = load_call(call.id)
    assert linked.execution_id == execution_id
    assert linked.status == "ringing"
    with uow() as reading:
        kept = reading.session.get_one(WebhookEvent, receipt.event_id)
    assert kept.applied_at is not None and kept.call_id == call.id, "the kept event is applied to the linked call"


def test_event_links_its_call_through_our_id_in_context_details():
    owner = customer()
    call = call_row(owner, status=statuses.INITIATING, slot_held=True)
    execution_id = str(uuid.uuid4())
    _deliver(_event(execution_id, "busy", context_details={"recipient_data": {"callflow_call_id": str(call.id)}}))
    final = load_call(call.id)
    assert final.execution_id == execution_id
    assert final.status == "busy"
    assert not final.slot_held
    assert ledger_total(owner.user_id) == (0, 0)
