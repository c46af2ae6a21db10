"""Webhooks: stored once, applied once, never backwards, and kept until their call is known; never refused for
what they hold once authenticated."""

import json
import uuid

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, text

from services.webhook_receiver.app import WEBHOOK_MAX_BODY_BYTES, create_app
from services.webhook_receiver.source_checks import SourceChecks
from shared.bolna.client import PlacedCall
from shared.calls import provider_events, statuses
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import OutboxMessage, WebhookEvent
from shared.core.storable import MAX_JSON_DEPTH
from shared.observability.sentry import FirstTimes
from tests.conftest import WEBHOOK_SECRET
from tests.support.components import components
from tests.support.engine_events import statements_run, transactions_begun
from tests.support.factories import call_row, credits_of, customer, ledger_total, load_call, load_event
from tests.support.faults import failing_writes


def _event(execution_id: str, status: str, **fields) -> dict:
    return {"id": execution_id, "status": status, **fields}


def _deliver(payload: dict) -> provider_events.Receipt:
    return provider_events.ingest(components().uow, payload)


@pytest.mark.parametrize(
    ("payload", "error_type"),
    [
        ({}, ErrorType.EMPTY_WEBHOOK_PAYLOAD),
        (None, ErrorType.EMPTY_WEBHOOK_PAYLOAD),
        ([1, 2], ErrorType.EMPTY_WEBHOOK_PAYLOAD),
        ({"status": "completed"}, ErrorType.MISSING_EXECUTION_ID),
        ({"id": "x"}, ErrorType.INVALID_WEBHOOK_PAYLOAD),
    ],
)
def test_invalid_webhooks_are_refused(payload, error_type):
    with pytest.raises(CallflowError) as raised:
        _deliver(payload)
    assert raised.value.error_type is error_type


def test_duplicate_is_stored_once():
    execution_id = str(uuid.uuid4())
    assert _deliver(_event(execution_id, "ringing")).event_id is not None
    assert _deliver(_event(execution_id, "ringing")).event_id is None
    assert _deliver(_event(execution_id, "ringing", retry_count=1)).event_id is not None


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
    receipt = _deliver(_event(execution_id, "ringing"))
    assert receipt.event_id is not None
    assert load_call(call.id).status == statuses.INITIATING

    with statements_run() as run:
        components().placer.link_execution(call.id, PlacedCall(execution_id, "queued", 1.0))
    assert len(_call_updates(run)) == 1, "the link and the kept event's change are one UPDATE of the call"
    linked = load_call(call.id)
    assert linked.execution_id == execution_id
    assert linked.status == "ringing"
    kept = load_event(receipt.event_id)
    assert kept.applied_at is not None and kept.call_id == call.id, "the kept event is applied to the linked call"


def test_a_status_callflow_does_not_know_is_kept_for_a_later_version_and_reported_once_per_status(monkeypatch):
    reported: list[str] = []
    monkeypatch.setattr(provider_events, "report", lambda error, place=None: reported.append(error.detail))
    monkeypatch.setattr(provider_events, "_UNKNOWN_STATUSES", FirstTimes())
    owner = customer()
    calls = [call_row(owner, status="ringing", execution_id=str(uuid.uuid4()), slot_held=True) for _ in range(2)]
    receipts = [_deliver(_event(call.execution_id, "voicemail-detected")) for call in calls]
    # One kept before its call was linked waits likewise once linked.
    unlinked = call_row(owner, status=statuses.INITIATING, slot_held=True)
    execution_id = str(uuid.uuid4())
    kept = _deliver(_event(execution_id, "voicemail-detected"))
    components().placer.link_execution(unlinked.id, PlacedCall(execution_id, "queued", 1.0))

    for call, receipt in zip(calls, receipts, strict=True):
        event = load_event(receipt.event_id)
        assert (event.applied_at, event.attempts, event.next_attempt_at is not None) == (None, 1, True)
        assert "voicemail-detected" in event.last_error
        assert (load_call(call.id).status, load_call(call.id).slot_held) == ("ringing", True)
    assert load_event(kept.event_id).applied_at is None and load_call(unlinked.id).status == "queued"
    assert len(reported) == 1 and "voicemail-detected" in reported[0]


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


def test_a_webhook_for_a_known_call_is_stored_and_applied_in_one_transaction():
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="queued", execution_id=execution_id, slot_held=True)
    with transactions_begun() as begun:
        _deliver(_event(execution_id, "ringing"))
    assert (len(begun), load_call(call.id).status) == (1, "ringing")
    with transactions_begun() as begun:
        _deliver(_event(execution_id, "completed", telephony_data={"duration": "30"}))
    assert len(begun) == 1, "billed, and its slot.released message written, in the same transaction"
    assert (load_call(call.id).status, ledger_total(owner.user_id)) == ("completed", (1, -1))


def test_a_webhook_for_a_known_call_is_stored_already_applied_and_written_once():
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="queued", execution_id=execution_id, slot_held=True)
    with statements_run() as run:
        receipt = _deliver(_event(execution_id, "ringing"))
    writes = [statement for statement in run if "webhook_events" in statement.split("(")[0]]
    assert [statement.split(" (")[0] for statement in writes] == ["INSERT INTO webhook_events"], run
    stored = load_event(receipt.event_id)
    applied = load_call(call.id)
    assert (stored.call_id, applied.status) == (call.id, "ringing")
    assert stored.applied_at == applied.provider_checked_at, "applied at the transaction's now, as the call heard"


def test_a_webhook_that_links_its_call_by_our_echoed_id_is_stored_already_applied():
    """Bolna's webhook can come before its answer to POST /call: the call is found by our id, linked, and the event
    stored applied, as for a call found by its execution id."""
    owner = customer()
    call = call_row(owner, status=statuses.INITIATING, slot_held=True)
    execution_id = str(uuid.uuid4())
    echoed = {"recipient_data": {"callflow_call_id": str(call.id)}}
    with statements_run() as run:
        receipt = _deliver(_event(execution_id, "ringing", context_details=echoed))
    writes = [statement for statement in run if "webhook_events" in statement.split("(")[0]]
    assert [statement.split(" (")[0] for statement in writes] == ["INSERT INTO webhook_events"], run
    [update] = _call_updates(run)
    assert "now() +" not in update and "RETURNING" not in update, update
    stored, linked = load_event(receipt.event_id), load_call(call.id)
    assert (linked.execution_id, linked.status, stored.call_id) == (execution_id, "ringing", call.id)
    assert stored.applied_at == linked.provider_checked_at


def test_a_webhook_whose_echoed_link_cannot_be_written_is_kept_for_a_retry():
    owner = customer()
    call = call_row(owner, status=statuses.INITIATING, slot_held=True)
    execution_id = str(uuid.uuid4())
    ringing = _event(execution_id, "ringing", context_details={"recipient_data": {"callflow_call_id": str(call.id)}})
    with failing_writes("calls", f"NEW.id = '{call.id}' AND NEW.execution_id IS NOT NULL"):
        receipt = _deliver(ringing)
    stored = load_event(receipt.event_id)
    assert (stored.applied_at, stored.call_id, stored.attempts) == (None, None, 1), "stored, kept for a retry"
    assert "injected fault" in stored.last_error
    assert load_call(call.id).execution_id is None

    provider_events.process(components().uow, receipt.event_id)  # the sweep's retry
    assert (load_call(call.id).execution_id, load_call(call.id).status) == (execution_id, "ringing")
    assert load_event(receipt.event_id).applied_at is not None


def _call_updates(run: list[object]) -> list[str]:
    return [str(statement) for statement in run if str(statement).startswith("UPDATE calls SET")]


def test_a_call_is_updated_with_plain_values_by_one_statement_that_reads_nothing_back():
    """A call's UPDATE, on a webhook and on Bolna's answer to POST /call, carries its times as values (read with the
    lock) and reads nothing back: an SQL expression among its values, or a RETURNING of `updated_at`, makes the ORM
    build and key the statement again for every row it writes."""
    owner = customer()
    execution_id = str(uuid.uuid4())
    answered = call_row(owner, status=statuses.INITIATING, slot_held=True)
    with statements_run() as run:
        components().placer.link_execution(answered.id, PlacedCall(execution_id, "queued", 1.0))
        _deliver(_event(execution_id, "ringing"))
    updates = _call_updates(run)
    assert len(updates) == 2, run
    for update in updates:
        assert "RETURNING" not in update, update
        assert "now() +" not in update, f"a time written as an SQL expression: {update}"
    linked = load_call(answered.id)
    assert (linked.execution_id, linked.status) == (execution_id, "ringing")
    assert linked.slot_lease_expires_at > linked.provider_checked_at, "the lease runs from the transaction's now"


def _webhook_receiver() -> FlaskClient:
    return create_app(components(), SourceChecks(components().settings)).test_client()


def _post(raw: bytes, token: str = WEBHOOK_SECRET):
    return _webhook_receiver().post(
        "/webhooks/bolna", query_string={"token": token}, data=raw, content_type="application/json"
    )


def test_an_authenticated_webhook_postgresql_cannot_store_is_stored_sanitized_and_applied():
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="in-progress", execution_id=execution_id, slot_held=True)
    talk = "user: hello " * 250_000  # 3 MB: a long call's transcript
    completed = _event(
        execution_id,
        "completed",
        telephony_data={"duration": "61"},
        total_cost=float("nan"),
        extracted_data={"score": float("inf"), "floor": float("-inf")},
        transcript="assistant: hi\u0000 \ud800there\n" + talk,
    )
    raw = json.dumps(completed).encode()  # NaN, Infinity, "\\u0000" and "\\ud800" as Python writes them
    assert len(raw) > 3_000_000

    answer = _post(raw)
    assert (answer.status_code, answer.json["status"]) == (200, "accepted"), answer.json

    final = load_call(call.id)
    assert (final.status, final.credits_charged, final.slot_held) == ("completed", 2, False)
    assert final.transcript == "assistant: hi \ufffdthere\n" + talk
    assert ledger_total(owner.user_id) == (1, -2)
    with components().uow() as uow:
        stored = uow.session.scalars(select(WebhookEvent).where(WebhookEvent.execution_id == execution_id)).one()
    assert stored.payload["total_cost"] is None
    assert stored.payload["extracted_data"] == {"score": None, "floor": None}


def test_a_webhook_nested_too_deep_or_with_a_number_too_long_for_python_is_stored_with_nulls_there():
    execution_id = str(uuid.uuid4())
    deep = "[" * 40 + "]" * 40
    raw = f'{{"id": "{execution_id}", "status": "queued", "extracted_data": {deep}, "cost": {"9" * 5000}}}'
    assert _post(raw.encode()).status_code == 200
    with components().uow() as uow:
        stored = uow.session.scalars(select(WebhookEvent).where(WebhookEvent.execution_id == execution_id)).one()
    assert stored.payload["cost"] is None
    nested, levels = stored.payload["extracted_data"], 2  # the body is level 1
    while nested:
        [nested], levels = nested, levels + 1
    assert (nested, levels) == (None, MAX_JSON_DEPTH + 1)


def test_a_completed_with_a_number_past_a_floats_range_is_billed_from_the_usable_duration():
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="in-progress", execution_id=execution_id, slot_held=True)
    raw = (
        f'{{"id": "{execution_id}", "status": "completed", "telephony_data": {{"duration": "61"}}, '
        f'"conversation_duration": {"9" * 400}}}'
    )
    assert _post(raw.encode()).status_code == 200
    billed = load_call(call.id)
    assert (billed.status, billed.duration_seconds, billed.slot_held) == ("completed", 61, False)
    assert ledger_total(owner.user_id) == (1, -2)


def test_a_webhook_is_authenticated_before_its_body_is_parsed():
    raw = b'{"id": "x", "status": ' + b" " * 3_000_000  # parsed, it would be a 400
    answer = _post(raw, token="wrong")
    assert (answer.status_code, answer.json["error_type"]) == (401, "webhook_auth_failed")


def test_a_webhook_body_over_the_limit_is_413():
    answer = _post(b"{" + b" " * WEBHOOK_MAX_BODY_BYTES + b"}")
    assert (answer.status_code, answer.json["error_type"]) == (413, "payload_too_large")


def test_a_webhook_that_is_not_json_is_still_400():
    answer = _post(b'{"id": "x", "status": ')
    assert (answer.status_code, answer.json["error_type"]) == (400, "invalid_webhook_payload")


def test_a_webhook_whose_apply_fails_is_stored_with_its_failure_and_nothing_it_announced_goes_out():
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="in-progress", execution_id=execution_id, slot_held=True)
    completed = _event(execution_id, "completed", telephony_data={"duration": "30"})
    with failing_writes("credit_ledger", f"NEW.user_id = '{owner.user_id}'", timing="BEFORE INSERT"):
        receipt = _deliver(completed)
    with components().uow() as uow:
        stored = uow.session.get_one(WebhookEvent, receipt.event_id)
        announced = uow.session.scalars(
            select(OutboxMessage).where(OutboxMessage.body["user_id"].astext == str(owner.user_id))
        ).all()
    assert (stored.applied_at, stored.attempts) == (None, 1), "the receipt names the stored row, kept for a retry"
    assert "Charging 1 credits" in stored.last_error
    assert announced == [], "the rolled-back slot.released is not written"
    assert (load_call(call.id).status, ledger_total(owner.user_id)) == ("in-progress", (0, 0))

    assert _deliver(completed).event_id is None, "a retry by Bolna is a duplicate of the stored event..."
    assert (load_call(call.id).status, ledger_total(owner.user_id)) == ("completed", (1, -1)), "...and applies it"


def test_a_webhook_whose_call_cannot_be_looked_for_is_stored_and_applied_when_a_second_look_succeeds(monkeypatch):
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="queued", execution_id=execution_id, slot_held=True)
    find_call = provider_events._find_call
    looks: list[str] = []

    def first_look_fails(uow, webhook):
        looks.append(webhook.status)
        if len(looks) == 1:
            uow.session.execute(text("SELECT 1 / 0"))  # an error of PostgreSQL, which aborts the transaction
        return find_call(uow, webhook)

    monkeypatch.setattr(provider_events, "_find_call", first_look_fails)
    receipt = _deliver(_event(execution_id, "ringing"))
    stored = load_event(receipt.event_id)
    assert len(looks) == 2, "looked for again once the event was stored"
    assert (stored.call_id, stored.attempts, load_call(call.id).status) == (call.id, 0, "ringing")


def test_a_webhook_whose_call_can_never_be_looked_for_is_stored_with_the_failure(monkeypatch):
    execution_id = str(uuid.uuid4())

    looks: list[str] = []

    def every_look_fails(uow, webhook):
        looks.append(webhook.status)
        uow.session.execute(text("SELECT 1 / 0"))

    monkeypatch.setattr(provider_events, "_find_call", every_look_fails)
    receipt = _deliver(_event(execution_id, "ringing"))
    stored = load_event(receipt.event_id)
    assert len(looks) == 2, "looked for again once the event was stored"
    assert (stored.applied_at, stored.attempts) == (None, 1)
    assert "DivisionByZero" in stored.last_error


def test_a_completed_webhook_without_a_duration_for_a_known_call_is_stored_unapplied_for_the_queue_processor():
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="in-progress", execution_id=execution_id, slot_held=True)
    receipt = _deliver(_event(execution_id, "completed"))
    stored = load_event(receipt.event_id)
    assert (stored.applied_at, stored.call_id, stored.attempts) == (None, None, 1)
    assert "waiting to ask Bolna" in stored.last_error
    assert (load_call(call.id).status, ledger_total(owner.user_id)) == ("in-progress", (0, 0))
