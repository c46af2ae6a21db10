"""What a customer (over the API) or an operator (with `callctl`) does to a campaign: create it, start, pause,
resume or cancel it. Every change takes the customer's row lock first, as the dispatcher does, so a campaign never
changes under a dispatch in progress."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, func, insert, select, update

from shared.calls import lifecycle, statuses
from shared.campaigns import states
from shared.campaigns.spec import CampaignSettings, ContactList
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Agent, Call, Campaign, CampaignContact
from shared.core.uow import UnitOfWork, UnitOfWorkFactory
from shared.messaging.topology import MessageType
from shared.observability import tracing
from shared.observability.sentry import report

INSERT_BATCH = 2_000
# A new contact is due from the start: the queue-processor's clock decides when it is called, whatever the clock of
# the host that stored it says.
FIRST_ATTEMPT_DUE = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class CreatedCampaign:
    campaign: Campaign
    contacts: ContactList


def create_campaign(
    uow: UnitOfWork, user_id: uuid.UUID, settings: CampaignSettings, contacts: ContactList
) -> CreatedCampaign:
    """Stores a draft campaign and its contacts in the caller's unit of work (the caller commits)."""
    tags = {"user_id": user_id, "agent_id": settings.agent_id}
    agent = uow.session.get(Agent, settings.agent_id)
    if agent is None:
        raise CallflowError(ErrorType.AGENT_NOT_FOUND, f"Agent {settings.agent_id} does not exist.", **tags)
    if agent.user_id != user_id:
        raise CallflowError(ErrorType.UNAUTHORIZED_AGENT_ACCESS, "The agent belongs to another user.", **tags)
    if not agent.provider_agent_id:
        raise CallflowError(ErrorType.AGENT_NOT_CONFIGURED, "The agent has no provider agent id configured.", **tags)
    if not contacts.contacts:
        raise CallflowError(
            ErrorType.VALIDATION_ERROR,
            "The campaign has no valid contact.",
            problem_fields={"rejected": contacts.rejected[:100], "rejectedCount": contacts.rejected_count},
            **tags,
        )
    retry, window = settings.retry, settings.calling_window
    campaign = Campaign(
        id=uuid.uuid4(),
        user_id=user_id,
        agent_id=agent.id,
        name=settings.name,
        status=states.DRAFT,
        max_concurrency=settings.max_concurrency,
        start_at=settings.start_at,
        retry_max_attempts=retry.max_attempts,
        retry_on_statuses=list(retry.on_statuses),
        retry_interval_minutes=list(retry.interval_minutes),
        window_start_hour=window.start_hour if window else None,
        window_end_hour=window.end_hour if window else None,
        window_days=sorted(set(window.days)) if window and window.days else None,
        contacts_total=len(contacts.contacts),
    )
    uow.session.add(campaign)
    uow.session.flush()
    # Plain multi-row inserts: ten thousand contacts are a few statements, not ten thousand ORM objects.
    table = CampaignContact.__table__
    rows = [
        {
            "campaign_id": campaign.id,
            "row_number": contact.row,
            "phone_number": contact.phone_number,
            "name": contact.name,
            "variables": contact.variables,
            "state": states.WAITING,
            "next_attempt_at": FIRST_ATTEMPT_DUE,
        }
        for contact in contacts.contacts
    ]
    for start in range(0, len(rows), INSERT_BATCH):
        uow.session.execute(insert(table), rows[start : start + INSERT_BATCH])
    return CreatedCampaign(campaign, contacts)


def change_status(
    uow_factory: UnitOfWorkFactory, user_id: uuid.UUID, campaign_id: str, action: states.Action
) -> Campaign:
    """Starts, pauses, resumes or cancels the customer's campaign; 409 for a move its status does not allow."""
    with uow_factory() as uow:
        # Another customer's campaign is refused before anything is locked: the owner's lock always comes first.
        owned = _owned(uow, user_id, campaign_id, lock=False)
        uow.calls.lock_user(user_id)
        campaign = uow.session.scalars(campaign_query(owned.id, lock=True)).one()
        if campaign.status not in states.ALLOWED_FROM[action]:
            raise CallflowError(
                ErrorType.INVALID_CAMPAIGN_TRANSITION,
                f"A {campaign.status} campaign cannot {action}.",
                problem_fields={"campaignId": str(campaign.id), "campaignStatus": campaign.status},
                user_id=user_id,
                campaign_id=campaign.id,
            )
        if action is states.Action.START:
            # The campaign is one trace from here: each of its calls continues it.
            campaign.trace_headers = tracing.current_trace_headers()
            _go(uow, campaign)
        elif action is states.Action.RESUME:
            campaign.pause_reason = None
            _go(uow, campaign)
        elif action is states.Action.PAUSE:
            campaign.status = states.PAUSED
        else:
            cancel(uow, campaign)
        uow.commit()
    return campaign


def _go(uow: UnitOfWork, campaign: Campaign) -> None:
    """Scheduled until its startAt, running from then on; the dispatcher of its customer is woken."""
    now = uow.session.scalar(select(func.now()))
    if campaign.start_at is not None and campaign.start_at > now:
        campaign.status = states.SCHEDULED
    else:
        campaign.status = states.RUNNING
        campaign.started_at = campaign.started_at or now
    uow.emit(MessageType.CAMPAIGN_STARTED, {"user_id": str(campaign.user_id), "campaign_id": str(campaign.id)})


def cancel(uow: UnitOfWork, campaign: Campaign) -> None:
    """No contact is called again: those waiting end `canceled`, and so do the campaign's calls waiting in the queue.
    Calls already with Bolna finish normally and are billed."""
    campaign.status = states.CANCELED
    campaign.pause_reason = None
    campaign.finished_at = uow.session.scalar(select(func.now()))  # a value: the caller reads it after commit
    contacts = CampaignContact.__table__
    uow.session.execute(
        update(contacts)
        .where(contacts.c.campaign_id == campaign.id, contacts.c.state == states.WAITING)
        .values(state=states.DONE, final_status=statuses.CANCELED, waiting_for_window=False)
    )
    queued = uow.session.scalars(
        select(Call)
        .where(Call.campaign_id == campaign.id, Call.status == statuses.PENDING)
        .with_for_update(key_share=True)
    )
    for call in queued:
        lifecycle.cancel_queued(call, "The campaign was canceled before the call was placed.")


def find_campaign(uow_factory: UnitOfWorkFactory, user_id: uuid.UUID, campaign_id: str) -> Campaign:
    with uow_factory() as uow:
        return owned_campaign(uow.reads_only(), user_id, campaign_id)


def owned_campaign(uow: UnitOfWork, user_id: uuid.UUID, campaign_id: str) -> Campaign:
    """The customer's campaign, read in the caller's unit of work (404 for another customer's)."""
    return _owned(uow, user_id, campaign_id, lock=False)


def _owned(uow: UnitOfWork, user_id: uuid.UUID, campaign_id: str, *, lock: bool) -> Campaign:
    """The customer's campaign; another customer's is reported as a security event and answered as missing."""
    try:
        parsed: uuid.UUID | None = uuid.UUID(campaign_id)
    except ValueError:
        parsed = None
    campaign = uow.session.scalar(campaign_query(parsed, lock)) if parsed else None
    if campaign is not None and campaign.user_id != user_id:
        report(
            CallflowError(
                ErrorType.UNAUTHORIZED_CAMPAIGN_ACCESS,
                "A user asked for another user's campaign.",
                user_id=user_id,
                campaign_id=campaign.id,
            )
        )
        campaign = None
    if campaign is None:
        raise CallflowError(ErrorType.CAMPAIGN_NOT_FOUND, f"No campaign {campaign_id}.", user_id=user_id)
    return campaign


def campaign_query(campaign_id: uuid.UUID, lock: bool) -> Select[tuple[Campaign]]:
    query = select(Campaign).where(Campaign.id == campaign_id)
    # Locked, it is read afresh: the row may have changed since the session first loaded it, before the lock.
    return query.with_for_update(key_share=True).execution_options(populate_existing=True) if lock else query


def created_answer(created: CreatedCampaign) -> dict[str, Any]:
    return {
        "campaignId": str(created.campaign.id),
        "status": created.campaign.status,
        "contacts": len(created.contacts.contacts),
        "duplicates": created.contacts.duplicates,
        "rejected": created.contacts.rejected,
        "rejectedCount": created.contacts.rejected_count,
    }
