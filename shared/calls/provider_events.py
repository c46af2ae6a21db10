"""Bolna's status events (its webhooks, or its answer to GET /executions/{id}): stored durably first, then applied
to their call exactly once.

Dedupe is by (execution id, status, attempt), never by execution id alone. An event whose call is not known
yet (Bolna answered `POST /call` after its first webhook) is kept and applied when the call is linked.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sentry_sdk
from sqlalchemy import Select, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError

from shared.bolna.client import BolnaClient, BolnaError
from shared.bolna.execution import AgentExecution
from shared.calls import lifecycle, statuses
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Call, WebhookEvent
from shared.core.storable import storable
from shared.core.uow import UnitOfWork, UnitOfWorkFactory
from shared.observability import tracing
from shared.observability.sentry import report, report_database_error

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_SECONDS = 600
KEPT_EVENT_RETENTION = timedelta(days=1)


@dataclass(frozen=True)
class Receipt:
    event_id: int | None  # None: a duplicate of an event already stored
    execution_id: str
    status: str
    attempt: int


def store(uow_factory: UnitOfWorkFactory, payload: Any) -> Receipt:
    """Validates and durably stores one webhook. Once this returns, the event cannot be lost."""
    if not isinstance(payload, dict) or not payload:
        raise CallflowError(ErrorType.EMPTY_WEBHOOK_PAYLOAD, "The webhook body is empty or not a JSON object.")
    payload = storable(payload)
    webhook = AgentExecution(payload)
    if webhook.execution_id is None:
        raise CallflowError(ErrorType.MISSING_EXECUTION_ID, "The webhook has no execution id ('id').")
    if webhook.status is None:
        raise CallflowError(ErrorType.VALIDATION_ERROR, "The webhook has no status.", execution_id=webhook.execution_id)
    with uow_factory() as uow:
        event_id = uow.session.scalar(
            pg_insert(WebhookEvent)
            .values(
                execution_id=webhook.execution_id,
                status=webhook.status,
                attempt=webhook.attempt,
                payload=payload,
            )
            .on_conflict_do_nothing(constraint="uq_webhook_events_execution_status")
            .returning(WebhookEvent.id)
        )
        uow.commit()
    return Receipt(event_id, webhook.execution_id, webhook.status, webhook.attempt)


def ingest(uow_factory: UnitOfWorkFactory, payload: Any, bolna: BolnaClient | None = None) -> Receipt:
    """Stores one execution object (a webhook, or Bolna's answer to GET /executions/{id}) and applies it.

    Without `bolna` (the webhook-receiver never waits on Bolna), a `completed` that lacks its duration is kept for
    the queue-processor, which asks Bolna for it before billing.
    """
    receipt = store(uow_factory, payload)
    event_id = receipt.event_id
    if event_id is None:  # already stored: apply it now if it is still waiting
        with uow_factory() as uow:
            event_id = uow.session.scalar(
                select(WebhookEvent.id).where(
                    WebhookEvent.execution_id == receipt.execution_id,
                    WebhookEvent.status == receipt.status,
                    WebhookEvent.attempt == receipt.attempt,
                    WebhookEvent.applied_at.is_(None),
                    WebhookEvent.redacted_at.is_(None),  # past its retention: no longer an event to apply
                )
            )
    if event_id is not None:
        process(uow_factory, event_id, bolna)
    return receipt


def process(uow_factory: UnitOfWorkFactory, event_id: int, bolna: BolnaClient | None = None) -> None:
    """Applies a stored event in its call's trace. A failure leaves the event for a later retry; it is reported when
    it first appears and only logged when a retry fails the same way, so a stuck event cannot flood Sentry."""
    started = time.monotonic()
    with uow_factory() as uow:
        event = uow.session.get_one(WebhookEvent, event_id)
        webhook = AgentExecution(event.payload)
        call = uow.session.scalar(event_call_query(webhook))
    ids = {"call_id": call.id, "user_id": call.user_id, "agent_id": call.agent_id} if call else {}
    call_trace = call.trace_headers if call else None
    with tracing.call_transaction(call_trace, op="webhook.process", name="Process Bolna Webhook") as span:
        span.set_data("status", event.status)
        span.set_data("execution_id", event.execution_id)
        sentry_sdk.add_breadcrumb(category="webhook", message=f"Webhook received: {event.status}")
        try:
            if _lacks_duration(event) and not _complete_duration(uow_factory, event, bolna):
                _defer(uow_factory, event_id, "completed without a duration: waiting to ask Bolna for it")
            elif not apply_stored(uow_factory, event_id):
                # Its call is not known (yet): look again later, less and less often.
                _defer(uow_factory, event_id, "no call for this execution yet")
        except Exception as exc:
            span.set_status("internal_error")
            try:
                attempts, previous = _defer(uow_factory, event_id, repr(exc))
            except DBAPIError as db_exc:  # the event stays stored and unapplied; the sweep retries it
                report_database_error(db_exc, place="webhook.process")
                return
            error = (
                exc
                if isinstance(exc, CallflowError)
                else CallflowError(
                    ErrorType.WEBHOOK_PROCESSING_FAILED,
                    f"Applying webhook {event.status} failed: {type(exc).__name__}",
                    execution_id=event.execution_id,
                    **ids,
                )
            )
            error.sentry_contexts["webhook_details"] = {
                "status": event.status,
                "execution_id": event.execution_id,
                "agent_id": event.payload.get("agent_id"),
                "has_transcript": webhook.transcript is not None,
                "has_recording": webhook.recording_url is not None,
                "processing_time_ms": round((time.monotonic() - started) * 1000, 1),
                "attempts": attempts,
            }
            if previous != repr(exc)[:2000]:  # a failure is reported when it first appears, not at every retry
                report(error, cause=exc if error is not exc else None, place="webhook.process")
            else:
                log.warning("webhook %s still failing after %d attempts: %r", event_id, attempts, exc)


def _lacks_duration(event: WebhookEvent) -> bool:
    return (
        event.status == statuses.COMPLETED
        and event.applied_at is None
        and event.redacted_at is None
        and not AgentExecution(event.payload).duration_seconds
    )


def _complete_duration(uow_factory: UnitOfWorkFactory, event: WebhookEvent, bolna: BolnaClient | None) -> bool:
    """Asks Bolna for a `completed` event's execution and keeps its answer when it has the duration; False when
    Bolna cannot be asked now. When Bolna has no duration either, the call is completed unbilled and reported."""
    if bolna is None:
        return False
    try:
        execution = bolna.get_execution(event.execution_id)
    except BolnaError as exc:
        if exc.transient:
            log.warning("completed %s lacks its duration and Bolna cannot be asked now: %s", event.execution_id, exc)
            return False
        return True  # Bolna does not know it: billed as it came, which reports the missing duration
    if execution.get("status") == statuses.COMPLETED and AgentExecution(execution).duration_seconds:
        with uow_factory() as uow:
            uow.session.execute(
                update(WebhookEvent).where(WebhookEvent.id == event.id).values(payload=storable(execution))
            )
            uow.commit()
    return True


def _defer(uow_factory: UnitOfWorkFactory, event_id: int, reason: str) -> tuple[int, str | None]:
    """Counts one more attempt at an event and sets when the sweep tries it next.

    Returns the attempts so far and the reason the previous attempt failed.
    """
    with uow_factory() as uow:
        previous = uow.session.scalar(
            select(WebhookEvent.last_error).where(WebhookEvent.id == event_id).with_for_update()
        )
        attempts = uow.session.scalar(
            update(WebhookEvent)
            .where(WebhookEvent.id == event_id, WebhookEvent.applied_at.is_(None))
            .values(
                attempts=WebhookEvent.attempts + 1,
                last_error=reason[:2000],
                next_attempt_at=func.now()
                + func.make_interval(
                    0, 0, 0, 0, 0, 0, func.least(func.power(2, WebhookEvent.attempts + 1), MAX_RETRY_DELAY_SECONDS)
                ),
            )
            .returning(WebhookEvent.attempts)
        )
        uow.commit()
    return attempts or 0, previous


def apply_stored(uow_factory: UnitOfWorkFactory, event_id: int) -> bool:
    """Applies one stored event to its call; False when its call is not known yet (kept for later)."""
    with uow_factory() as uow:
        event = uow.session.execute(
            select(WebhookEvent).where(WebhookEvent.id == event_id).with_for_update(skip_locked=True)
        ).scalar_one_or_none()
        if event is None or event.applied_at is not None or event.redacted_at is not None:
            return True  # applied already, being applied by another process right now, or past its retention
        call = _find_call(uow, AgentExecution(event.payload))
        if call is None:
            return False
        already_unbilled = call.error_type == ErrorType.BILLING_DURATION_MISSING
        lifecycle.apply_provider_event(uow.calls, call, event)
        unbilled = not already_unbilled and call.error_type == ErrorType.BILLING_DURATION_MISSING
        uow.commit()
    if unbilled:
        _report_unbilled(call, event)
    return True


def _report_unbilled(call: Call, event: WebhookEvent) -> None:
    execution = AgentExecution(event.payload)
    report(
        CallflowError(
            ErrorType.BILLING_DURATION_MISSING,
            f"Call {call.id} completed without a usable duration; it was not charged.",
            sentry_contexts={
                "billing_details": {
                    "execution_id": event.execution_id,
                    "telephony_duration": execution.telephony.get("duration"),
                    "conversation_duration": event.payload.get("conversation_duration"),
                    "conversation_time": event.payload.get("conversation_time"),
                }
            },
            call_id=call.id,
            user_id=call.user_id,
            agent_id=call.agent_id,
            execution_id=event.execution_id,
        ),
        place="webhook.process",
    )


def apply_kept_events(uow: UnitOfWork, call: Call) -> None:
    """Applies the events kept for the call's execution (the caller holds the call's row lock)."""
    kept = uow.session.scalars(kept_events_query(call.execution_id)).all()
    for event in sorted(kept, key=lambda e: statuses.rank(e.status) if e.status in statuses.PROVIDER_STATUSES else -1):
        if not _lacks_duration(event):  # that one waits for the queue-processor to ask Bolna for its duration
            lifecycle.apply_provider_event(uow.calls, call, event)


def unapplied_event_ids(uow_factory: UnitOfWorkFactory, min_age_seconds: float, limit: int = 500) -> list[int]:
    """Events not applied yet, old enough that their own request is done with them, due for a retry, and not so
    old that their call can no longer appear (those stay stored, for the record)."""
    with uow_factory() as uow:
        return list(uow.session.scalars(unapplied_events_query(min_age_seconds, limit)))


def _find_call(uow: UnitOfWork, webhook: AgentExecution) -> Call | None:
    """The call for an execution: by execution id, else by our call id echoed back in context_details."""
    call = uow.session.scalar(linked_call_query(webhook.execution_id))
    if call is None and webhook.context_call_id is not None:
        call = uow.session.scalar(echoed_call_query(webhook.context_call_id, webhook.execution_id))
        if call is not None:
            lifecycle.link_execution(uow.calls, call, webhook.execution_id)
    return call


# The statements, built apart from running them so tests/integration/test_query_plans.py can EXPLAIN each one.


def event_call_query(webhook: AgentExecution) -> Select[tuple[Call]]:
    """The event's call, unlocked (its trace is continued): by execution id, or by our call id echoed back."""
    return select(Call).where(or_(Call.execution_id == webhook.execution_id, Call.id == webhook.context_call_id))


def linked_call_query(execution_id: str | None) -> Select[tuple[Call]]:
    return select(Call).where(Call.execution_id == execution_id).with_for_update()


def echoed_call_query(call_id: uuid.UUID, execution_id: str | None) -> Select[tuple[Call]]:
    """Our call named in context_details, unless another execution is linked to it already."""
    return (
        select(Call)
        .where(Call.id == call_id, or_(Call.execution_id.is_(None), Call.execution_id == execution_id))
        .with_for_update()
    )


def kept_events_query(execution_id: str | None) -> Select[tuple[WebhookEvent]]:
    return (
        select(WebhookEvent)
        .where(
            WebhookEvent.execution_id == execution_id,
            WebhookEvent.applied_at.is_(None),
            WebhookEvent.redacted_at.is_(None),
        )
        .order_by(WebhookEvent.id)
        .with_for_update(skip_locked=True)
    )


def unapplied_events_query(min_age_seconds: float, limit: int) -> Select[tuple[int]]:
    return (
        select(WebhookEvent.id)
        .where(
            WebhookEvent.applied_at.is_(None),
            WebhookEvent.received_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, min_age_seconds),
            or_(WebhookEvent.next_attempt_at.is_(None), WebhookEvent.next_attempt_at <= func.now()),
            WebhookEvent.received_at > func.now() - KEPT_EVENT_RETENTION,
        )
        .order_by(WebhookEvent.id)
        .limit(limit)
    )
