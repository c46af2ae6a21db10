"""The system of record: users, agents, calls, campaigns and their contacts, the credit ledger, stored webhooks and
the outbox."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


@dataclass(frozen=True)
class Message:
    """A message a change announces; the unit of work writes it to the outbox in the change's own transaction."""

    message_type: str
    body: dict[str, Any]


class Base(DeclarativeBase):
    type_annotation_map = {
        dict[str, Any]: JSONB,
        uuid.UUID: UUID(as_uuid=True),
        datetime: DateTime(timezone=True),
    }


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    api_token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    credits: Mapped[int] = mapped_column(Integer)
    max_concurrent_calls: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    provider_agent_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


# The indexes over held slots: each predicate also names its index's own column, which its queries imply and the
# others' do not, so no count of one customer's (or one campaign's) held slots is served by an index over every
# customer's, as the planner did when the table was last analysed with none held (migration 0006).
USER_SLOT_HELD = "slot_held AND user_id IS NOT NULL"
CAMPAIGN_SLOT_HELD = "slot_held AND campaign_id IS NOT NULL"
SLOT_LEASE_HELD = "slot_held AND slot_lease_expires_at IS NOT NULL"
# Calls Bolna has or may have, and has not finished: the reconcile job's rows (the terminal statuses of calls/statuses).
LIVE_CALL_CONDITION = (
    "status NOT IN ('pending', 'completed', 'busy', 'no-answer', 'failed', 'canceled', 'stopped', 'error', "
    "'balance-low')"
)


DIRECT_CALL = "direct"
CAMPAIGN_CALL = "campaign"

# Server defaults (`created_at`, the JSONB columns' '{}') are read back by the INSERT's RETURNING, so a new row can
# be shown after its session closed. Not after an UPDATE (SQLAlchemy's default, kept on purpose): reading back
# `updated_at` (its `onupdate`) gave every UPDATE a RETURNING and a statement built and keyed again, row by row, and
# nothing reads it from a row this process changed.
WRITTEN_DEFAULTS_READ_BACK = "auto"


class Call(Base):
    __tablename__ = "calls"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"))
    phone_number: Mapped[str] = mapped_column(String(16))
    call_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", server_default=text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(String(32))
    execution_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_detail: Mapped[str | None] = mapped_column(Text)
    # A held slot counts against the user's concurrent-call limit until released; the lease bounds a leak.
    slot_held: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    slot_lease_expires_at: Mapped[datetime | None]
    # Provider failures on the queue path put the call back to pending until next_attempt_at, a bounded number of times.
    dispatch_attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[datetime | None]
    # When the slot was taken to ask Bolna: the search for a call whose answer was lost, and the deadline after
    # which it is given up, count from here.
    initiated_at: Mapped[datetime | None]
    # When Callflow last heard from Bolna about the call, or asked it: a live call silent for long is reconciled.
    provider_checked_at: Mapped[datetime | None]
    duration_seconds: Mapped[int | None] = mapped_column(Integer)
    credits_charged: Mapped[int | None] = mapped_column(Integer)
    transcript: Mapped[str | None] = mapped_column(Text)
    recording_url: Mapped[str | None] = mapped_column(Text)
    # The trace POST /api/calls started: dispatch, the Bolna request and every webhook continue it.
    trace_headers: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # A campaign's call: one attempt at one of its contacts. A direct call (POST /api/calls) has neither.
    campaign_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("campaigns.id"))
    contact_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("campaign_contacts.id"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

    __table_args__ = (
        Index("ix_calls_user_pending", "user_id", "created_at", postgresql_where=text("status = 'pending'")),
        Index("ix_calls_campaign", "campaign_id", "created_at", "id", postgresql_where=text("campaign_id IS NOT NULL")),
        Index("ix_calls_campaign_slot_held", "campaign_id", postgresql_where=text(CAMPAIGN_SLOT_HELD)),
        Index("ix_calls_campaign_pending", "campaign_id", "created_at", postgresql_where=text("status = 'pending'")),
        Index("ix_calls_user_slot_held", "user_id", postgresql_where=text(USER_SLOT_HELD)),
        Index("ix_calls_slot_lease", "slot_lease_expires_at", postgresql_where=text(SLOT_LEASE_HELD)),
        Index("ix_calls_live_provider_checked", "provider_checked_at", postgresql_where=text(LIVE_CALL_CONDITION)),
    )
    __mapper_args__ = {"eager_defaults": WRITTEN_DEFAULTS_READ_BACK}

    @property
    def call_type(self) -> str:
        return CAMPAIGN_CALL if self.campaign_id is not None else DIRECT_CALL

    @property
    def kind_tags(self) -> dict[str, str]:
        """What every Sentry event about the call carries, so errors can be counted by campaign."""
        tags = {"call_type": self.call_type}
        if self.campaign_id is not None:
            tags["campaign_id"] = str(self.campaign_id)
        return tags

    @property
    def messages(self) -> list[Message]:
        """What the call's changes announce, collected by the unit of work when it commits (not a column)."""
        return self.__dict__.setdefault("_messages", [])


class Campaign(Base):
    """A list of contacts one agent calls, within the customer's limit, its own concurrency cap and calling window."""

    __tablename__ = "campaigns"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    pause_reason: Mapped[str | None] = mapped_column(String(64))
    max_concurrency: Mapped[int | None] = mapped_column(Integer)
    start_at: Mapped[datetime | None]
    # The retry policy: up to `retry_max_attempts` calls per contact, again after a final status in
    # `retry_on_statuses`, waiting `retry_interval_minutes[attempt - 1]` (the last one repeats).
    retry_max_attempts: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    retry_on_statuses: Mapped[list[str]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    retry_interval_minutes: Mapped[list[float]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    # The calling window, in each contact's local time: hours [start, end) on the ISO weekdays listed (1 = Monday).
    window_start_hour: Mapped[int | None] = mapped_column(Integer)
    window_end_hour: Mapped[int | None] = mapped_column(Integer)
    window_days: Mapped[list[int] | None] = mapped_column(JSONB)
    contacts_total: Mapped[int] = mapped_column(Integer)
    # Round robin between one customer's campaigns: the one served longest ago gets the next free slot.
    last_dispatched_at: Mapped[datetime | None]
    # The trace its start request began: every call of the campaign continues it.
    trace_headers: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

    def retry_delay(self, attempts: int) -> timedelta:
        """The wait before the next attempt at a contact called `attempts` times; the last interval repeats."""
        intervals = self.retry_interval_minutes or [0]
        return timedelta(minutes=intervals[min(attempts, len(intervals)) - 1])

    __table_args__ = (
        Index("ix_campaigns_user_created", "user_id", "created_at"),
        Index("ix_campaigns_active", "user_id", postgresql_where=text("status IN ('scheduled', 'running')")),
    )
    __mapper_args__ = {"eager_defaults": WRITTEN_DEFAULTS_READ_BACK}


class CampaignContact(Base):
    """One number a campaign calls; each attempt is a call of its own."""

    __tablename__ = "campaign_contacts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    campaign_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("campaigns.id"))
    row_number: Mapped[int] = mapped_column(Integer)  # where it was in the request, for the results
    phone_number: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(200))
    variables: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # waiting (for its turn, its retry or its window), calling (an attempt is under way), done (a final result).
    state: Mapped[str] = mapped_column(String(16))
    # When it may be called next; the dispatcher takes the earliest due first.
    next_attempt_at: Mapped[datetime]
    waiting_for_window: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_call_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    final_status: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (
        UniqueConstraint("campaign_id", "phone_number", name="uq_campaign_contacts_number"),
        Index(
            "ix_campaign_contacts_due",
            "campaign_id",
            "next_attempt_at",
            "id",
            postgresql_where=text("state = 'waiting'"),
        ),
        Index("ix_campaign_contacts_calling", "campaign_id", postgresql_where=text("state = 'calling'")),
        Index("ix_campaign_contacts_row", "campaign_id", "row_number"),
    )


class IdempotencyKey(Base):
    """An `Idempotency-Key` seen on POST /api/calls or /api/campaigns: at most one call (or campaign) per key, and its
    first answer replayed."""

    __tablename__ = "idempotency_keys"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    call_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("calls.id"))
    campaign_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("campaigns.id"))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)

    @classmethod
    def expired(cls, retention: timedelta) -> ColumnElement[bool]:
        """Keys older than `retention` (IDEMPOTENCY_KEY_RETENTION_HOURS): no longer replayed, and purged."""
        return cls.created_at < func.now() - retention


class CreditLedgerEntry(Base):
    __tablename__ = "credit_ledger"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    call_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("calls.id"))
    amount: Mapped[int] = mapped_column(Integer)  # negative for a charge
    reason: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())

    # The constraint that makes "charged once" a database fact, not a hope.
    __table_args__ = (UniqueConstraint("call_id", "reason", name="uq_credit_ledger_call_reason"),)


class WebhookEvent(Base):
    __tablename__ = "webhook_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    execution_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    payload: Mapped[dict[str, Any]]
    call_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("calls.id"), index=True)
    received_at: Mapped[datetime] = mapped_column(server_default=func.now())
    applied_at: Mapped[datetime | None]
    # A failed apply is retried with growing delay; only the first failure is reported as an event.
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None]
    # Set when the retention job replaced the payload by its ids (the row stays, so duplicates are still known).
    redacted_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("execution_id", "status", "attempt", name="uq_webhook_events_execution_status"),
        Index("ix_webhook_events_unapplied", "received_at", postgresql_where=text("applied_at IS NULL")),
        Index("ix_webhook_events_unredacted", "received_at", postgresql_where=text("redacted_at IS NULL")),
    )


class OutboxMessage(Base):
    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    message_id: Mapped[uuid.UUID] = mapped_column(unique=True, default=uuid.uuid4)
    message_type: Mapped[str] = mapped_column(String(64))
    body: Mapped[dict[str, Any]]
    headers: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    published_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),
        Index("ix_outbox_published", "published_at", postgresql_where=text("published_at IS NOT NULL")),
    )
