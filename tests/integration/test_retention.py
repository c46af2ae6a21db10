"""Retention: published outbox rows, webhook payloads and idempotency keys are deleted or redacted once past their
periods and never before; a redacted webhook still turns away its duplicate; each table's step stands alone."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any
from unittest.mock import Mock

import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from services.call_initiator import idempotency
from services.call_initiator.app import create_app
from services.queue_processor import retention
from services.queue_processor.jobs import PeriodicJobs
from services.queue_processor.retention import Retention, RetentionPeriods
from shared.calls import provider_events
from shared.core.config import Settings, load_settings
from shared.core.models import IdempotencyKey, OutboxMessage, WebhookEvent
from tests.support.components import components
from tests.support.factories import Customer, call_row, customer, load_event

# The documented defaults (README Configuration, docs/reliability.md "Retention").
DEFAULT_OUTBOX = timedelta(hours=24)
DEFAULT_WEBHOOK_PAYLOADS = timedelta(days=30)
DEFAULT_IDEMPOTENCY_KEYS = timedelta(hours=24)
MARGIN = timedelta(minutes=5)  # rows this far on either side of a period's end


@pytest.fixture
def outbox_rows() -> Iterator[list[int]]:
    """Ids of the outbox rows a test made; deleted after it, so no later test's relay publishes them."""
    ids: list[int] = []
    yield ids
    with components().uow() as uow:
        uow.session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(ids)))
        uow.commit()


def _retention(**overrides: Any) -> Retention:
    return Retention(components().uow, RetentionPeriods.from_settings(components().settings), **overrides)


def _outbox_row(ids: list[int], published_ago: timedelta | None, created_ago: timedelta) -> int:
    with components().uow() as uow:
        row = OutboxMessage(
            message_type="retention.test",
            body={"phone_number": "+14155550123"},
            created_at=func.now() - created_ago,
            published_at=None if published_ago is None else func.now() - published_ago,
        )
        uow.session.add(row)
        uow.session.flush()
        ids.append(row.id)
        uow.commit()
    return row.id


def _outbox_ids_left(ids: list[int]) -> set[int]:
    with components().uow() as uow:
        return set(uow.session.scalars(select(OutboxMessage.id).where(OutboxMessage.id.in_(ids))))


def _payload(execution_id: str, status: str = "ringing") -> dict[str, Any]:
    return {
        "id": execution_id,
        "status": status,
        "transcript": "user: call me back on +14155550123",
        "telephony_data": {"to_number": "+14155550123", "duration": "42"},
        "context_details": {"recipient_data": {"first_name": "Ada"}},
    }


def _webhook(owner: Customer, received_ago: timedelta, applied: bool) -> tuple[int, dict[str, Any]]:
    """A webhook stored as the receiver stores it, applied to its call or kept unapplied, received `received_ago`."""
    execution_id = str(uuid.uuid4())
    payload = _payload(execution_id)
    if applied:
        call_row(owner, status="queued", execution_id=execution_id, slot_held=True)
    event_id = provider_events.ingest(components().uow, payload).event_id
    with components().uow() as uow:
        uow.session.execute(
            update(WebhookEvent).where(WebhookEvent.id == event_id).values(received_at=func.now() - received_ago)
        )
        uow.commit()
    return event_id, payload


def _key(owner: Customer, created_ago: timedelta, body: Any = None, **answer: Any) -> str:
    """A key claimed `created_ago` by a request with this body (its answer stored when given)."""
    key = f"key-{uuid.uuid4()}"
    request_hash = idempotency.claim_for(owner.user_id, key, body).request_hash
    with components().uow() as uow:
        uow.session.execute(
            pg_insert(IdempotencyKey).values(
                user_id=owner.user_id, key=key, request_hash=request_hash, created_at=func.now() - created_ago, **answer
            )
        )
        uow.commit()
    return key


def _keys_left(owner: Customer) -> set[str]:
    with components().uow() as uow:
        return set(uow.session.scalars(select(IdempotencyKey.key).where(IdempotencyKey.user_id == owner.user_id)))


def test_the_documented_defaults_are_the_settings_defaults():
    assert RetentionPeriods.from_settings(Settings.model_construct()) == RetentionPeriods(
        DEFAULT_OUTBOX, DEFAULT_WEBHOOK_PAYLOADS, DEFAULT_IDEMPOTENCY_KEYS
    )


def test_published_outbox_rows_past_the_period_are_deleted_and_unpublished_rows_never(outbox_rows):
    old = DEFAULT_OUTBOX + MARGIN
    published_old = _outbox_row(outbox_rows, published_ago=old, created_ago=old)
    published_fresh = _outbox_row(outbox_rows, published_ago=DEFAULT_OUTBOX - MARGIN, created_ago=old)
    unpublished_old = _outbox_row(outbox_rows, published_ago=None, created_ago=timedelta(days=365))

    _retention().run()

    assert _outbox_ids_left(outbox_rows) == {published_fresh, unpublished_old}
    assert published_old not in _outbox_ids_left(outbox_rows)


def test_webhook_payloads_past_the_period_are_redacted_to_their_ids_and_younger_ones_kept_whole():
    owner = customer()
    old, fresh = DEFAULT_WEBHOOK_PAYLOADS + MARGIN, DEFAULT_WEBHOOK_PAYLOADS - MARGIN
    applied_old, applied_old_payload = _webhook(owner, old, applied=True)
    unapplied_old, _ = _webhook(owner, old, applied=False)
    applied_fresh, applied_fresh_payload = _webhook(owner, fresh, applied=True)
    unapplied_fresh, unapplied_fresh_payload = _webhook(owner, fresh, applied=False)
    applied_at = load_event(applied_old).applied_at

    _retention().run()

    for event_id in (applied_old, unapplied_old):
        event = load_event(event_id)
        assert event.payload == {"id": event.execution_id, "status": "ringing", "retry_count": 0}
        assert event.redacted_at is not None
    assert load_event(applied_old).applied_at == applied_at, "redaction does not pretend to apply anything"
    assert load_event(unapplied_old).applied_at is None
    for event_id, payload in ((applied_fresh, applied_fresh_payload), (unapplied_fresh, unapplied_fresh_payload)):
        event = load_event(event_id)
        assert (event.payload, event.redacted_at) == (payload, None)

    duplicate = provider_events.ingest(components().uow, applied_old_payload)
    assert duplicate.event_id is None, "the row stays: a late duplicate of a redacted event is still turned away"
    kept_for_the_sweep = provider_events.unapplied_event_ids(components().uow, 0, limit=1_000_000)
    assert unapplied_old not in kept_for_the_sweep, "nothing applies a redacted event"


def test_expired_idempotency_keys_are_deleted_and_fresh_ones_kept():
    owner = customer()
    _key(owner, DEFAULT_IDEMPOTENCY_KEYS + MARGIN)
    fresh = _key(owner, DEFAULT_IDEMPOTENCY_KEYS - MARGIN)

    _retention().run()

    assert _keys_left(owner) == {fresh}


def test_short_periods_set_through_the_settings_take_effect(monkeypatch, outbox_rows):
    for name, value in {
        "OUTBOX_RETENTION_HOURS": "1",
        "WEBHOOK_PAYLOAD_RETENTION_DAYS": "0.25",  # 6 h: shorter than the day a kept event may still be applied
        "IDEMPOTENCY_KEY_RETENTION_HOURS": "1",
        "RETENTION_INTERVAL_SECONDS": "7",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    short_lived = replace(components(), settings=settings)
    owner = customer()
    two_hours, half_an_hour = timedelta(hours=2), timedelta(minutes=30)
    published_2h = _outbox_row(outbox_rows, published_ago=two_hours, created_ago=two_hours)
    published_30min = _outbox_row(outbox_rows, published_ago=half_an_hour, created_ago=two_hours)
    key_30min = _key(owner, half_an_hour)
    answered_2h = _key(owner, two_hours, response_status=201, response_body={"callId": str(uuid.uuid4())})
    applied_7h, _ = _webhook(owner, timedelta(hours=7), applied=True)
    applied_5h, _ = _webhook(owner, timedelta(hours=5), applied=True)
    still_applicable_7h, _ = _webhook(owner, timedelta(hours=7), applied=False)
    past_its_day, _ = _webhook(owner, timedelta(hours=25), applied=False)

    # The API forgets the key at once: the request runs again instead of replaying (the agent it names is not
    # configured, so running it is a 422, where a replay would be the stored 201).
    unconfigured = customer(configured=False)
    request = {"agentId": str(unconfigured.agent_id), "phoneNumber": "+14155550123"}
    answered = _key(unconfigured, two_hours, request, response_status=201, response_body={"callId": "x"})
    again = (
        create_app(short_lived)
        .test_client()
        .post("/api/calls", json=request, headers={**unconfigured.auth, "Idempotency-Key": answered})
    )
    assert "Idempotent-Replayed" not in again.headers
    assert (again.status_code, again.get_json()["error_type"]) == (422, "agent_not_configured")

    # The job as the queue-processor registers it (the dispatcher and the reconciler are no part of it).
    (job,) = [job for job in PeriodicJobs(short_lived, Mock(), Mock()).all() if job.name == "enforce_retention"]
    assert job.interval_seconds == 7
    job.run()

    assert _outbox_ids_left(outbox_rows) == {published_30min}
    assert published_2h not in _outbox_ids_left(outbox_rows)
    assert _keys_left(owner) == {key_30min}
    assert answered_2h not in _keys_left(owner)
    assert load_event(applied_7h).redacted_at is not None
    assert load_event(past_its_day).redacted_at is not None
    assert load_event(applied_5h).redacted_at is None
    assert load_event(still_applicable_7h).redacted_at is None, "the sweep may still apply it: it stays whole"


def test_a_backlog_is_worked_off_in_batches_up_to_a_cap_per_run(outbox_rows):
    # Older than anything the other tests make, so only these rows are past this period.
    ancient = RetentionPeriods(timedelta(days=999), timedelta(days=9999), timedelta(days=999))
    for _ in range(5):
        _outbox_row(outbox_rows, published_ago=timedelta(days=1000), created_ago=timedelta(days=1000))

    capped = Retention(components().uow, ancient, batch_size=2, max_batches=2).run()
    assert capped["delete_published_outbox"] == 4
    assert len(_outbox_ids_left(outbox_rows)) == 1

    assert Retention(components().uow, ancient, batch_size=2, max_batches=2).run()["delete_published_outbox"] == 1
    assert _outbox_ids_left(outbox_rows) == set()


def test_a_failing_step_is_reported_on_its_own_and_the_other_tables_still_run(monkeypatch, outbox_rows):
    reported = []
    monkeypatch.setattr(retention, "report", lambda error, cause=None, place=None: reported.append((error, place)))

    def broken_batch(self):
        raise RuntimeError("the webhook table is locked")

    monkeypatch.setattr(Retention, "_webhook_payloads_batch", broken_batch)
    owner = customer()
    published_old = _outbox_row(outbox_rows, published_ago=DEFAULT_OUTBOX + MARGIN, created_ago=DEFAULT_OUTBOX)
    _key(owner, DEFAULT_IDEMPOTENCY_KEYS + MARGIN)

    touched = _retention().run()

    assert touched["redact_webhook_payloads"] is None
    assert published_old not in _outbox_ids_left(outbox_rows), "the step before the failing one ran"
    assert _keys_left(owner) == set(), "the step after the failing one ran"
    ((error, place),) = reported
    assert error.error_type == "internal_error"
    assert "the webhook table is locked" in error.detail
    assert place == "retention.redact_webhook_payloads"
