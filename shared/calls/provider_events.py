"""Bolna's status events (its webhooks, or its answer to GET /executions/{id}): stored and applied to their call
exactly once, in one transaction. When applying fails, the event is stored on its own, with the failure, and the
queue-processor's sweep retries it.

Dedupe is by (execution id, status, attempt), never by execution id alone. An event whose call is not known
yet (Bolna answered `POST /call` after its first webhook) is kept and applied when the call is linked.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sentry_sdk
from sqlalchemy import BindParameter, Select, Update, bindparam, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import make_transient_to_detached

from shared.bolna.client import BolnaClient, BolnaError
from shared.bolna.execution import AgentExecution
from shared.calls import lifecycle, statuses
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Call, WebhookEvent
from shared.core.storable import storable
from shared.core.uow import UnitOfWork, UnitOfWorkFactory
from shared.observability import tracing
from shared.observability.sentry import FirstTimes, report

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_SECONDS = 600
# An event of a status Callflow does not know is tried again hourly: only a new release can apply it, and one a new
# status of Bolna's brings on every call must not crowd the sweep.
UNKNOWN_STATUS_RETRY_SECONDS = 3600
PROCESS_OP = "webhook.process"
PROCESS_NAME = "Process Bolna Webhook"
KEPT_EVENT_RETENTION = timedelta(days=1)
# Bolna writes a call's record as the call goes: while a `completed` that came without its duration is younger than
# this, a record that is still live is asked for again later, not taken as Bolna's last word.
BOLNA_RECORD_LAG = timedelta(minutes=2)
# A `completed` without its duration waits this long for a Bolna that cannot be asked (down, or refusing Callflow's
# key): well within KEPT_EVENT_RETENTION, past which the sweep no longer applies an event at all.
BOLNA_UNREACHABLE_LIMIT = timedelta(hours=12)
# The breadcrumb that opens the handling of an event says where it came from.
WEBHOOK_RECEIVED = "Webhook received"
EXECUTION_FETCHED = "Bolna execution fetched"  # Bolna's answer to GET /executions/{id} (reconciling)
KEPT_EVENT_RETRIED = "Kept Bolna event retried"  # a stored event the sweep applies again


@dataclass(frozen=True)
class Receipt:
    event_id: int | None  # None: a duplicate of an event already stored
    execution_id: str
    status: str
    attempt: int


def ingest(
    uow_factory: UnitOfWorkFactory, payload: Any, bolna: BolnaClient | None = None, *, fetched: bool = False
) -> Receipt:
    """Stores one execution object (a webhook, or with `fetched` Bolna's answer to GET /executions/{id}) and
    applies it to its call, in one transaction. Once this returns, the event cannot be lost: when applying fails,
    the event is stored on its own, kept for a retry.

    Without `bolna` (the webhook-receiver never waits on Bolna), a `completed` that lacks its duration is kept for
    the queue-processor, which asks Bolna for it before billing.
    """
    payload = storable(payload)  # before anything reads it: what is noted of it must be storable too
    status = AgentExecution(payload).status if isinstance(payload, dict) else None
    _note(EXECUTION_FETCHED if fetched else WEBHOOK_RECEIVED, status)
    webhook = _validated(payload)
    started = time.monotonic()
    with uow_factory() as uow:
        lookup = _look_for_call(uow, webhook)
        # What looking changed on the call (a link by our echoed id) is written with what applying changes, in one
        # UPDATE at the commit, where a failure keeps the event for a retry.
        with uow.session.no_autoflush:
            event = _insert(uow, payload, webhook, _applied_values(uow, lookup, webhook))
            event_id = event.id if event is not None else None
            if event is None:  # already stored: apply it now if it is still waiting
                event = uow.session.scalar(waiting_duplicate_query(webhook))
                if event is not None and _lacks_duration(event) and not _completed_without_duration(webhook):
                    event.payload = payload  # Bolna sent it again, with the duration the stored copy waits for
        outcome = _apply_and_commit(uow, event, started, lookup=lookup) if event is not None else None
        if outcome is None:
            uow.commit()
        elif event_id is not None:
            event_id = outcome.event_id
    if bolna is not None and outcome is not None and outcome.waits_for_duration:
        _process(uow_factory, outcome.event_id, bolna, noted=True)
    return Receipt(event_id, webhook.execution_id, webhook.status, webhook.attempt)


def _validated(payload: Any) -> AgentExecution:
    if not isinstance(payload, dict) or not payload:
        raise CallflowError(ErrorType.EMPTY_WEBHOOK_PAYLOAD, "The webhook body is empty or not a JSON object.")
    webhook = AgentExecution(payload)
    if webhook.execution_id is None:
        raise CallflowError(
            ErrorType.MISSING_EXECUTION_ID,
            "The webhook has no execution id ('id').",
            sentry_contexts={"webhook_details": _webhook_details(webhook)},
        )
    if webhook.status is None:
        raise CallflowError(
            ErrorType.INVALID_WEBHOOK_PAYLOAD,
            "The webhook has no status (a string in 'status').",
            sentry_contexts={"webhook_details": _webhook_details(webhook)},
            execution_id=webhook.execution_id,
        )
    return webhook


# The webhook path's statements are built once: SQLAlchemy keeps a statement's cache key on the statement, so one
# built per request is coerced and keyed again each time, a large share of a webhook's CPU.
_STORE_EVENT = (
    pg_insert(WebhookEvent.__table__)
    .on_conflict_do_nothing(constraint="uq_webhook_events_execution_status")
    .returning(WebhookEvent.__table__.c.id)
)


@dataclass(frozen=True)
class _CallLookup:
    """An event's call, looked for (and locked) before the event is stored."""

    call: Call | None = None  # None: not known (yet)
    failed: bool = False  # looking failed (and was rolled back): applying the stored event looks again


def _look_for_call(uow: UnitOfWork, webhook: AgentExecution) -> _CallLookup:
    try:
        return _CallLookup(_find_call(uow, webhook))
    except Exception:
        # The event is stored all the same; applying it looks again, and a failure that lasts is stored with it.
        log.warning("looking for the call of webhook %s %s failed", webhook.execution_id, webhook.status, exc_info=True)
        uow.rollback()
        return _CallLookup(failed=True)


def _applied_values(uow: UnitOfWork, lookup: _CallLookup, webhook: AgentExecution) -> dict[str, Any]:
    """What applying the event to its call writes on the event (`lifecycle.apply_provider_event`: the call and the
    transaction's now), when it is applied in this transaction: stored with the row itself, the ORM has no UPDATE
    of it to write. Anything else the lifecycle sets is written as usual."""
    if lookup.call is None or _completed_without_duration(webhook):
        return {"call_id": None, "applied_at": None}
    return {"call_id": lookup.call.id, "applied_at": uow.calls.now()}  # a value: the call's lock read it


def _insert(
    uow: UnitOfWork, payload: dict[str, Any], webhook: AgentExecution, applied: dict[str, Any]
) -> WebhookEvent | None:
    """The new event, as a row of this transaction; None when it is a duplicate of one already stored."""
    key = {"execution_id": webhook.execution_id, "status": webhook.status, "attempt": webhook.attempt}
    event_id = uow.session.scalar(_STORE_EVENT, {**key, **applied, "payload": payload})
    if event_id is None:
        return None
    # Everything it holds is known here: it joins the session as if loaded, without reading its payload back.
    event = WebhookEvent(
        id=event_id,
        **key,
        **applied,
        payload=payload,
        attempts=0,
        last_error=None,
        next_attempt_at=None,
        redacted_at=None,
    )
    make_transient_to_detached(event)
    uow.session.add(event)
    return event


def process(uow_factory: UnitOfWorkFactory, event_id: int, bolna: BolnaClient | None = None) -> None:
    """Applies a stored event that is still waiting (the sweep's retry). A `completed` without its duration first
    gets it from Bolna, outside any transaction."""
    _process(uow_factory, event_id, bolna, noted=False)


def _process(uow_factory: UnitOfWorkFactory, event_id: int, bolna: BolnaClient | None, noted: bool) -> None:
    """Applies the event as `process` says. `noted`: `ingest` stored it just now and noted it already, and the
    isolation scope opened here inherits that breadcrumb, so it is not noted twice."""
    started = time.monotonic()
    with uow_factory() as uow:
        event = uow.session.get(WebhookEvent, event_id)
    if event is None or event.applied_at is not None or event.redacted_at is not None:
        return
    if _lacks_duration(event) and not _complete_duration(uow_factory, event, bolna):
        return  # Bolna cannot be asked now; the sweep comes back later
    with uow_factory() as uow, sentry_sdk.isolation_scope():  # what is noted of this event stays with it
        event = uow.session.scalar(waiting_event_query(event_id))
        if event is not None:  # not applied meanwhile, nor being applied by another process right now
            if not noted:
                _note(KEPT_EVENT_RETRIED, event.status)
            _apply_and_commit(uow, event, started, duration_asked=bolna is not None)


def _note(what: str, status: str | None) -> None:
    """Marks what follows as the handling of an event of this status, from where `what` says: before it is
    validated, so an event refused as invalid is reported with it too."""
    sentry_sdk.add_breadcrumb(category="webhook", message=f"{what}: {status or 'no status'}")
    if status is not None:
        sentry_sdk.set_tag("webhook_status", status)


@dataclass(frozen=True)
class _Outcome:
    event_id: int  # the row the event is stored in (a new one when a failure rolled the first away)
    waits_for_duration: bool = False


def _apply_and_commit(
    uow: UnitOfWork,
    event: WebhookEvent,
    started: float,
    duration_asked: bool = False,
    lookup: _CallLookup | None = None,
) -> _Outcome:
    """Applies a stored event (locked by this transaction) to its call, in the call's trace, and commits. `lookup`:
    the call, already looked for (and locked) in this transaction.

    When anything fails (finding the call included), the transaction is rolled back and the event stored again with
    the failure, in a transaction of its own; the failure is reported when it first appears and only logged when a
    retry fails the same way, so a stuck event cannot flood Sentry.
    """
    kept = _KeptEvent.of(event)
    try:
        looked_up = lookup is not None and not lookup.failed
        call = lookup.call if looked_up else _find_call(uow, AgentExecution(event.payload))
    except Exception as exc:
        return _keep_failed(uow, kept, exc, {}, started)
    with tracing.call_transaction(
        call.trace_headers if call else None, op=PROCESS_OP, name=PROCESS_NAME, tags=call.kind_tags if call else None
    ) as span:
        span.set_data("status", event.status)
        span.set_data("execution_id", event.execution_id)
        ids = {"call_id": call.id, "user_id": call.user_id, "agent_id": call.agent_id} if call else {}
        try:
            if call is None:  # not known (yet): applied when the call is linked, or by the sweep
                _defer(event, "no call for this execution yet")
                uow.commit()
                return _Outcome(event.id)
            if event.status not in statuses.PROVIDER_STATUSES:  # kept until Callflow knows it: applied then
                _defer(event, f"status {event.status!r} is not one Callflow knows", UNKNOWN_STATUS_RETRY_SECONDS)
                uow.commit()
                _report_unknown_status(call, event)
                return _Outcome(event.id)
            if _lacks_duration(event) and not duration_asked:
                _defer(event, "completed without a duration: waiting to ask Bolna for it")
                uow.commit()
                return _Outcome(event.id, waits_for_duration=True)
            already_unbilled = call.error_type == ErrorType.BILLING_DURATION_MISSING
            lifecycle.apply_provider_event(uow.calls, call, event)
            unbilled = not already_unbilled and call.error_type == ErrorType.BILLING_DURATION_MISSING
            uow.commit()
        except Exception as exc:
            span.set_status("internal_error")
            return _keep_failed(uow, kept, exc, ids, started)
        if unbilled:
            _report_unbilled(call, event)
        report_applied(call, [event])
        return _Outcome(event.id)


def _keep_failed(uow: UnitOfWork, kept: _KeptEvent, exc: Exception, ids: dict[str, Any], started: float) -> _Outcome:
    uow.rollback()
    event_id, attempts = kept.store_failed(uow, repr(exc))
    if attempts is None:  # applied meanwhile, by another delivery of it: nothing is left failing
        log.warning("webhook %s %s failed, then another delivery applied it: %r", kept.execution_id, kept.status, exc)
    elif kept.last_error != repr(exc)[:2000]:
        _report_failure(exc, kept, ids, attempts, started)
    else:
        log.warning("webhook %s still failing after %d attempts: %r", kept.execution_id, attempts, exc)
    return _Outcome(event_id)


@dataclass(frozen=True)
class _KeptEvent:
    """What an event holds, read before applying it, so it can be stored again once a failure rolled it back."""

    execution_id: str
    status: str
    attempt: int
    payload: dict[str, Any]
    last_error: str | None

    @classmethod
    def of(cls, event: WebhookEvent) -> _KeptEvent:
        return cls(event.execution_id, event.status, event.attempt, event.payload, event.last_error)

    def store_failed(self, uow: UnitOfWork, reason: str) -> tuple[int, int | None]:
        """Stores the event (unless it was stored before this transaction) with one more failed attempt, due for
        a retry later and later; returns its id and the attempts so far (None when it has been applied since)."""
        events = WebhookEvent.__table__
        key = {"execution_id": self.execution_id, "status": self.status, "attempt": self.attempt}
        uow.session.execute(
            pg_insert(events)
            .values(**key, payload=self.payload)
            .on_conflict_do_nothing(constraint="uq_webhook_events_execution_status")
        )
        event_id = uow.session.scalar(select(events.c.id).where(*(events.c[n] == v for n, v in key.items())))
        attempts = uow.session.scalar(_retry_later(event_id, reason).returning(events.c.attempts))
        uow.commit()
        return event_id, attempts


def _report_failure(exc: Exception, event: _KeptEvent, ids: dict[str, Any], attempts: int, started: float) -> None:
    webhook = AgentExecution(event.payload)
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
        **_webhook_details(webhook),
        "processing_time_ms": round((time.monotonic() - started) * 1000, 1),
        "attempts": attempts,
    }
    report(error, cause=exc if error is not exc else None, place=PROCESS_OP)


def _webhook_details(webhook: AgentExecution) -> dict[str, object]:
    """What a report says of a webhook: what it is about and what it holds, never its transcript or numbers."""
    return {
        "status": webhook.status,
        "execution_id": webhook.execution_id,
        "agent_id": webhook.payload.get("agent_id"),
        "has_transcript": webhook.transcript is not None,
        "has_recording": webhook.recording_url is not None,
    }


def _lacks_duration(event: WebhookEvent) -> bool:
    return (
        event.applied_at is None
        and event.redacted_at is None
        and _completed_without_duration(AgentExecution(event.payload))
    )


def _completed_without_duration(execution: AgentExecution) -> bool:
    """A `completed` of the dial Callflow placed, without its duration (a redial's is never billed: none is waited
    for)."""
    return execution.status == statuses.COMPLETED and execution.attempt == 0 and not execution.duration_seconds


def _complete_duration(uow_factory: UnitOfWorkFactory, event: WebhookEvent, bolna: BolnaClient | None) -> bool:
    """Asks Bolna for a `completed` event's execution and keeps its answer when it has the duration. False while the
    event waits: Bolna cannot be asked now, or its record is still live and the event is younger than
    BOLNA_RECORD_LAG, or its record is completed without the duration yet and the event is that young. Otherwise
    the event is applied: a call Bolna has no duration for either (its record is final without one past that lag,
    it does not know the execution, or its record stayed live) is completed unbilled and reported."""
    if bolna is None:
        return False
    try:
        execution = bolna.get_execution(event.execution_id)
    except BolnaError as exc:
        if not exc.refused:  # tried again later and later, not on every round of the sweep while Bolna is down
            log.warning("completed %s lacks its duration and Bolna cannot be asked now: %s", event.execution_id, exc)
            events = WebhookEvent.__table__
            young = events.c.received_at > func.now() - BOLNA_UNREACHABLE_LIMIT
            # Past the limit it waits no more: applied as it came, which reports the call unbilled, to bill by hand.
            return not _put_off(uow_factory, event, f"Bolna cannot be asked for the duration now: {exc}", young)
        return True  # Bolna does not know it: applied as it came, which reports the missing duration
    record = AgentExecution(execution)
    if record.status not in statuses.TERMINAL:
        return not _put_off_for_record(uow_factory, event, f"Bolna's record is still {record.status!r}")
    # Bolna's redials share the execution id: a record of another dial (its retry count) bills nothing of this one.
    completed = record.status == statuses.COMPLETED and record.attempt == event.attempt
    if completed and not record.duration_seconds:  # its post-processing writes the duration after the status
        return not _put_off_for_record(uow_factory, event, "Bolna's record is completed without its duration yet")
    if completed:
        with uow_factory() as uow:
            uow.session.execute(
                update(WebhookEvent).where(WebhookEvent.id == event.id).values(payload=storable(execution))
            )
            uow.commit()
    return True


def _put_off_for_record(uow_factory: UnitOfWorkFactory, event: WebhookEvent, reason: str) -> bool:
    """Sets when a `completed` without its duration is tried next, later and later, while it is younger than
    BOLNA_RECORD_LAG by the database's clock; False when it is not (or was applied meanwhile): it waits no more."""
    events = WebhookEvent.__table__
    put_off = _put_off(uow_factory, event, reason, events.c.received_at > func.now() - BOLNA_RECORD_LAG)
    if not put_off:
        log.warning(
            "completed %s: %s; waiting no more (past %s, or applied meanwhile)",
            event.execution_id,
            reason,
            BOLNA_RECORD_LAG,
        )
    return put_off


def _put_off(uow_factory: UnitOfWorkFactory, event: WebhookEvent, reason: str, *conditions: Any) -> bool:
    """Counts one more try at a stored event, which failed for `reason`, and sets its next, later and later, unless
    it was applied meanwhile or fails `conditions`; whether it did."""
    with uow_factory() as uow:
        put_off = uow.session.execute(_retry_later(event.id, reason).where(*conditions)).rowcount
        uow.commit()
    return bool(put_off)


def _retry_later(event_id: int, reason: str) -> Update:
    """The statement counting one more try at a stored event not applied yet, which failed for `reason`, and setting
    its next try, later and later."""
    events = WebhookEvent.__table__
    return (
        update(events)
        .where(events.c.id == event_id, events.c.applied_at.is_(None))
        .values(
            attempts=events.c.attempts + 1,
            last_error=reason[:2000],
            next_attempt_at=_next_try_at(events.c.attempts + 1),
        )
    )


def _defer(event: WebhookEvent, reason: str, delay_seconds: int | None = None) -> None:
    """Counts one more attempt at an event (locked by the caller) and sets when the sweep tries it next: later and
    later, or `delay_seconds` from now. A deferred event is not applied, whatever its row was stored with."""
    event.call_id = event.applied_at = None
    event.attempts = (event.attempts or 0) + 1
    event.last_error = reason[:2000]
    if delay_seconds is None:
        event.next_attempt_at = _next_try_at(event.attempts)
    else:
        event.next_attempt_at = func.now() + timedelta(seconds=delay_seconds)


def _next_try_at(attempts: Any) -> Any:
    """When the sweep tries an event again after `attempts` failed ones (a number, or the column's expression):
    2^attempts seconds from now, at most MAX_RETRY_DELAY_SECONDS."""
    delay = func.least(func.power(2, attempts), MAX_RETRY_DELAY_SECONDS)
    return func.now() + func.make_interval(0, 0, 0, 0, 0, 0, delay)


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
        place=PROCESS_OP,
    )


def _report_redial(call: Call, event: WebhookEvent) -> None:
    """Bolna dialled the call again on its own, though Callflow asks it never to (`retry_config.enabled=false`): the
    person may be called twice, outside the customer's limit, and nothing a redial does is applied or billed
    (`lifecycle.apply_provider_event`). Each status of it that reaches its call is reported, all in one issue; a
    completed redial carries its duration, to bill by hand."""
    stop_requested = lifecycle.redial_is_stopped(event.status)
    report(
        CallflowError(
            ErrorType.BOLNA_REDIALLED,
            f"Bolna dialled call {call.id} again on its own (retry {event.attempt}, {event.status}); "
            + ("Callflow asked it to stop." if stop_requested else "the redial was neither applied nor billed."),
            sentry_contexts={
                "redial_details": {
                    "execution_id": event.execution_id,
                    "retry_count": event.attempt,
                    "status": event.status,
                    "stop_requested": stop_requested,
                    "duration_seconds": AgentExecution(event.payload).duration_seconds,
                }
            },
            call_id=call.id,
            user_id=call.user_id,
            agent_id=call.agent_id,
            execution_id=event.execution_id,
        ),
        place=PROCESS_OP,
    )


_UNKNOWN_STATUSES = FirstTimes()  # a status Bolna adds may come with every call: reported once


def _report_unknown_status(call: Call, event: WebhookEvent) -> None:
    if not _UNKNOWN_STATUSES.first(event.status):
        log.warning("webhook %s with unknown status %r kept for call %s", event.execution_id, event.status, call.id)
        return
    report(
        CallflowError(
            ErrorType.INVALID_WEBHOOK_PAYLOAD,
            f"Bolna sent a status Callflow does not know ({event.status!r}); its events are kept, not applied, and "
            "retried for a day: a version of Callflow that knows it applies them.",
            sentry_contexts={"webhook_details": _webhook_details(AgentExecution(event.payload))},
            call_id=call.id,
            user_id=call.user_id,
            agent_id=call.agent_id,
            execution_id=event.execution_id,
        ),
        place=PROCESS_OP,
    )


def apply_kept_events(uow: UnitOfWork, call: Call) -> list[WebhookEvent]:
    """Applies the events kept for the call's execution (the caller holds the call's row lock). Returns those
    applied, for `report_applied` once the caller committed."""
    with uow.session.no_autoflush:  # what the caller changed on the call is written once, with what they change
        kept = uow.session.scalars(kept_events_query(call.execution_id)).all()
    applied = []
    known = (event for event in kept if event.status in statuses.PROVIDER_STATUSES)  # the rest wait for the sweep
    for event in sorted(known, key=lambda e: statuses.rank(e.status)):
        if not _lacks_duration(event):  # that one waits for the queue-processor to ask Bolna for its duration
            lifecycle.apply_provider_event(uow.calls, call, event)
            applied.append(event)
    return applied


MAX_BOLNA_MESSAGE = 500  # of Bolna's `error_message` in a report
# Bolna's own ends of a call that are failures of Bolna's rather than the callee's answer or the carrier's.
_BOLNA_FAILURES = {"error": ErrorType.BOLNA_CALL_ERROR, "balance-low": ErrorType.BOLNA_BALANCE_LOW}


def report_applied(call: Call, events: list[WebhookEvent]) -> None:
    """Reports what events applied to their call (and committed) showed: Bolna redialling it on its own, or ending
    it in a failure of its own, whichever way the event reached the call (its own request, a fetch of Bolna's
    record, or kept until the call was linked)."""
    for event in events:
        if lifecycle.is_redial(event):
            _report_redial(call, event)
        elif event.status in _BOLNA_FAILURES and call.status == event.status:
            _report_bolna_failure(call, event)


def _report_bolna_failure(call: Call, event: WebhookEvent) -> None:
    """Bolna ended the call itself: `error` (a fault of Bolna's or its telephony), or `balance-low` (Bolna's account
    has no credit left, so every call ends so until it is topped up). The call is over, unbilled, its slot free."""
    message = event.payload.get("error_message")
    message = message[:MAX_BOLNA_MESSAGE] if isinstance(message, str) and message else None
    report(
        CallflowError(
            _BOLNA_FAILURES[event.status],
            f"Bolna ended call {call.id} as {event.status}: {message or 'no message'}",
            sentry_contexts={
                "bolna_failure_details": {
                    "execution_id": event.execution_id,
                    "status": event.status,
                    "error_message": message,
                    "campaign_id": str(call.campaign_id) if call.campaign_id else None,
                }
            },
            call_id=call.id,
            user_id=call.user_id,
            agent_id=call.agent_id,
            execution_id=event.execution_id,
        ),
        place=PROCESS_OP,
    )


def unapplied_event_ids(uow_factory: UnitOfWorkFactory, min_age_seconds: float, limit: int = 500) -> list[int]:
    """Events not applied yet, old enough that their own request is done with them, due for a retry, and not so
    old that their call can no longer appear (those stay stored, for the record)."""
    with uow_factory() as uow:
        return list(uow.session.scalars(unapplied_events_query(min_age_seconds, limit)))


def _find_call(uow: UnitOfWork, webhook: AgentExecution) -> Call | None:
    """The call for an execution: by execution id, else by our call id echoed back in context_details."""
    found = uow.session.execute(_LINKED_CALL, {"execution_id": webhook.execution_id}).one_or_none()
    echoed = found is None and webhook.context_call_id is not None
    if echoed:
        parameters = {"call_id": webhook.context_call_id, "execution_id": webhook.execution_id}
        found = uow.session.execute(_ECHOED_CALL, parameters).one_or_none()
    if found is None:
        return None
    call, now = found
    uow.calls.note_now(now)
    if echoed:
        lifecycle.link_execution(uow.calls, call, webhook.execution_id)
    return call


# The statements, built apart from running them so tests/integration/test_query_plans.py can EXPLAIN each one.


def waiting_event_query(event_id: int) -> Select[tuple[WebhookEvent]]:
    """A stored event not applied yet, locked; skipped while another process applies it."""
    return (
        select(WebhookEvent)
        .where(WebhookEvent.id == event_id, WebhookEvent.applied_at.is_(None), WebhookEvent.redacted_at.is_(None))
        .with_for_update(skip_locked=True, key_share=True)
    )


def waiting_duplicate_query(webhook: AgentExecution) -> Select[tuple[WebhookEvent]]:
    """The stored copy of a duplicate, locked, if it is still waiting (past its retention it is no longer an
    event to apply)."""
    return (
        select(WebhookEvent)
        .where(
            WebhookEvent.execution_id == webhook.execution_id,
            WebhookEvent.status == webhook.status,
            WebhookEvent.attempt == webhook.attempt,
            WebhookEvent.applied_at.is_(None),
            WebhookEvent.redacted_at.is_(None),
        )
        .with_for_update(skip_locked=True, key_share=True)
    )


def linked_call_query(execution_id: str | BindParameter[str] | None) -> Select[tuple[Call, datetime]]:
    """The call, locked, and the transaction's now() (`SqlCallStore.now`)."""
    return select(Call, func.now()).where(Call.execution_id == execution_id).with_for_update(key_share=True)


_LINKED_CALL = linked_call_query(bindparam("execution_id"))  # built once: see _STORE_EVENT


def echoed_call_query(
    call_id: uuid.UUID | BindParameter[uuid.UUID], execution_id: str | BindParameter[str]
) -> Select[tuple[Call, datetime]]:
    """Our call named in context_details, unless another execution is linked to it already, locked, and the
    transaction's now() (`SqlCallStore.now`)."""
    return (
        select(Call, func.now())
        .where(Call.id == call_id, or_(Call.execution_id.is_(None), Call.execution_id == execution_id))
        .with_for_update(key_share=True)
    )


_ECHOED_CALL = echoed_call_query(bindparam("call_id"), bindparam("execution_id"))  # built once: see _STORE_EVENT


def call_and_kept_events_query(
    call_id: uuid.UUID | BindParameter[uuid.UUID], execution_id: str | BindParameter[str]
) -> Select[tuple[Call, bool, datetime]]:
    """The call, locked, whether events are kept for the execution Bolna named for it, and the transaction's now()
    (`SqlCallStore.now`): one round trip."""
    kept = (
        select(WebhookEvent.id)
        .where(
            WebhookEvent.execution_id == execution_id,
            WebhookEvent.applied_at.is_(None),
            WebhookEvent.redacted_at.is_(None),
        )
        .exists()
    )
    return select(Call, kept, func.now()).where(Call.id == call_id).with_for_update(of=Call, key_share=True)


# Built once: each call Bolna accepts runs it (see _STORE_EVENT).
CALL_AND_KEPT_EVENTS = call_and_kept_events_query(bindparam("call_id"), bindparam("execution_id"))


def kept_events_query(execution_id: str | None) -> Select[tuple[WebhookEvent]]:
    return (
        select(WebhookEvent)
        .where(
            WebhookEvent.execution_id == execution_id,
            WebhookEvent.applied_at.is_(None),
            WebhookEvent.redacted_at.is_(None),
        )
        .order_by(WebhookEvent.id)
        .with_for_update(skip_locked=True, key_share=True)
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
