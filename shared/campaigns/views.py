"""Reading campaigns back: one campaign's progress, a customer's campaigns, its calls page by page, and its results
as rows streamed from a server-side cursor."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.orm import Session

from shared.campaigns import states
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Call, Campaign, CampaignContact
from shared.observability import tracing

MAX_PAGE = 100
RESULT_COLUMNS = (
    "row",
    "phone_number",
    "name",
    "final_status",
    "attempts",
    "duration_seconds",
    "credits_charged",
    "call_id",
)


def contact_counts_query(campaign_id: uuid.UUID) -> Select[tuple[str, int, int, int]]:
    contacts = CampaignContact
    return (
        select(
            contacts.state,
            func.count(),
            func.coalesce(func.sum(contacts.attempts), 0),
            func.count().filter(contacts.waiting_for_window),
        )
        .where(contacts.campaign_id == campaign_id)
        .group_by(contacts.state)
    )


def final_results_query(campaign_id: uuid.UUID) -> Select[tuple[str, int]]:
    contacts = CampaignContact
    return (
        select(contacts.final_status, func.count())
        .where(contacts.campaign_id == campaign_id, contacts.state == states.DONE)
        .group_by(contacts.final_status)
    )


def call_counts_query(campaign_id: uuid.UUID) -> Select[tuple[str, int, int]]:
    return (
        select(Call.status, func.count(), func.coalesce(func.sum(Call.credits_charged), 0))
        .where(Call.campaign_id == campaign_id)
        .group_by(Call.status)
    )


def campaign_view(session: Session, campaign: Campaign) -> dict[str, Any]:
    """The campaign's settings and progress: contacts per state, calls per status, attempts and credits."""
    contacts = {states.WAITING: 0, states.CALLING: 0, states.DONE: 0}
    attempts = waiting_for_window = 0
    for state, count, state_attempts, windowed in session.execute(contact_counts_query(campaign.id)):
        contacts[state] = count
        attempts += state_attempts
        waiting_for_window += windowed
    calls: dict[str, int] = {}
    credits = 0
    for status, count, charged in session.execute(call_counts_query(campaign.id)):
        calls[status] = count
        credits += charged
    results = {status: count for status, count in session.execute(final_results_query(campaign.id))}
    return {
        **summary_view(campaign),
        "contacts": {**contacts, "total": campaign.contacts_total, "waitingForWindow": waiting_for_window},
        "results": results,
        "calls": calls,
        "attempts": attempts,
        "creditsCharged": credits,
        "settings": {
            "maxConcurrency": campaign.max_concurrency,
            "startAt": _iso(campaign.start_at),
            "retry": {
                "maxAttempts": campaign.retry_max_attempts,
                "onStatuses": campaign.retry_on_statuses,
                "intervalMinutes": campaign.retry_interval_minutes,
            },
            "callingWindow": None
            if campaign.window_start_hour is None
            else {
                "startHour": campaign.window_start_hour,
                "endHour": campaign.window_end_hour,
                "days": campaign.window_days,
            },
        },
        "traceId": tracing.trace_id_of(campaign.trace_headers),
    }


def summary_view(campaign: Campaign) -> dict[str, Any]:
    return {
        "campaignId": str(campaign.id),
        "name": campaign.name,
        "agentId": str(campaign.agent_id),
        "status": campaign.status,
        "pauseReason": campaign.pause_reason,
        "contactsTotal": campaign.contacts_total,
        "createdAt": _iso(campaign.created_at),
        "startedAt": _iso(campaign.started_at),
        "finishedAt": _iso(campaign.finished_at),
    }


def campaigns_of_query(user_id: uuid.UUID, limit: int) -> Select[tuple[Campaign]]:
    return select(Campaign).where(Campaign.user_id == user_id).order_by(Campaign.created_at.desc()).limit(limit)


def campaign_calls_query(
    campaign_id: uuid.UUID, status: str | None, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> Select[tuple[Call]]:
    """A page of the campaign's calls in the order they were made (keyset pagination on ix_calls_campaign)."""
    query = select(Call).where(Call.campaign_id == campaign_id)
    if status is not None:
        query = query.where(Call.status == status)
    if after is not None:
        query = query.where(tuple_(Call.created_at, Call.id) > tuple_(*after))
    return query.order_by(Call.created_at, Call.id).limit(limit)


def calls_page(
    session: Session, campaign_id: uuid.UUID, status: str | None, cursor: str | None, limit: int
) -> tuple[list[Call], str | None]:
    calls = list(session.scalars(campaign_calls_query(campaign_id, status, _decoded(cursor), limit)))
    next_cursor = _encoded(calls[-1]) if len(calls) == limit else None
    return calls, next_cursor


def results_query(campaign_id: uuid.UUID) -> Select[Any]:
    contacts = CampaignContact
    return (
        select(
            contacts.row_number,
            contacts.phone_number,
            contacts.name,
            func.coalesce(contacts.final_status, contacts.state),
            contacts.attempts,
            Call.duration_seconds,
            Call.credits_charged,
            contacts.last_call_id,
        )
        .outerjoin(Call, Call.id == contacts.last_call_id)
        .where(contacts.campaign_id == campaign_id)
        .order_by(contacts.campaign_id, contacts.row_number)
    )


def result_rows(session: Session, campaign_id: uuid.UUID, batch: int = 1_000) -> Iterator[tuple[Any, ...]]:
    """One row per contact (only the contact's last call can be billed: only a final status ends its attempts),
    read `batch` rows at a time from a server-side cursor."""
    result = session.execute(results_query(campaign_id), execution_options={"yield_per": batch})
    for row in result:
        yield tuple(row)


def _encoded(call: Call) -> str:
    raw = f"{call.created_at.isoformat()}|{call.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decoded(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, call_id = raw.partition("|")
        return datetime.fromisoformat(created), uuid.UUID(call_id)
    except ValueError as exc:
        raise CallflowError(ErrorType.VALIDATION_ERROR, "The cursor is not one this API gave.") from exc


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
