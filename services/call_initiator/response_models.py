"""The bodies the public API answers with, as pydantic models: their JSON schemas are the responses of
`/openapi.json`. The views build plain dicts; these models only describe them (the e2e schema test checks that the
live answers match)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from shared.calls import statuses
from shared.campaigns import states
from shared.core.errors import ErrorType

CallStatus = Annotated[str, Field(json_schema_extra={"enum": sorted(statuses.RANKED)})]
CampaignStatus = Annotated[
    str,
    Field(
        json_schema_extra={
            "enum": [states.DRAFT, states.SCHEDULED, states.RUNNING, states.PAUSED, states.COMPLETED, states.CANCELED]
        }
    ),
]


class _ApiAnswer(BaseModel):
    """The API's own answers: camelCase members, and nothing but the members listed."""

    model_config = ConfigDict(alias_generator=to_camel, extra="forbid")


class CallQueued(_ApiAnswer):
    """202: the call waits in Callflow's queue (the customer is at their limit, or Bolna is held back)."""

    call_id: uuid.UUID
    status: CallStatus


class CallPlaced(CallQueued):
    """201: a slot was free and Bolna accepted the call."""

    execution_id: str


class CallView(_ApiAnswer):
    call_id: uuid.UUID
    status: CallStatus
    execution_id: str | None
    agent_id: uuid.UUID
    campaign_id: uuid.UUID | None
    phone_number: str
    duration_seconds: int | None
    credits_charged: int | None
    transcript: str | None
    recording_url: str | None
    error_type: str | None
    trace_id: str | None
    created_at: datetime
    updated_at: datetime


class RejectedContact(_ApiAnswer):
    row: int
    phone_number: str | None
    reason: str


class CampaignCreated(_ApiAnswer):
    campaign_id: uuid.UUID
    status: CampaignStatus
    contacts: int = Field(description="Contacts stored (valid and not duplicated).")
    duplicates: int
    rejected: list[RejectedContact] = Field(description="The first 1,000 rejected contacts.")
    rejected_count: int


class CampaignSummary(_ApiAnswer):
    campaign_id: uuid.UUID
    name: str
    agent_id: uuid.UUID
    status: CampaignStatus
    pause_reason: str | None
    contacts_total: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ContactCounts(_ApiAnswer):
    waiting: int
    calling: int
    done: int
    total: int
    waiting_for_window: int


class RetryView(_ApiAnswer):
    max_attempts: int
    on_statuses: list[str]
    interval_minutes: list[float]


class CallingWindowView(_ApiAnswer):
    start_hour: int
    end_hour: int
    days: list[int] | None


class CampaignSettingsView(_ApiAnswer):
    max_concurrency: int | None
    start_at: datetime | None
    retry: RetryView
    calling_window: CallingWindowView | None


class CampaignDetail(CampaignSummary):
    contacts: ContactCounts
    results: dict[str, int] = Field(description="Contacts per final status.")
    calls: dict[str, int] = Field(description="Calls per status.")
    attempts: int
    credits_charged: int
    settings: CampaignSettingsView
    trace_id: str | None


class CampaignList(_ApiAnswer):
    campaigns: list[CampaignSummary]


class CampaignCallsPage(_ApiAnswer):
    calls: list[CallView]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class FieldError(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem: every error answer. The optional members appear with the errors that carry them."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: str = Field(pattern="^urn:callflow:problem:")
    title: str
    status: int
    detail: str
    error_type: ErrorType
    request_id: str
    errors: list[FieldError] | None = Field(None, description="validation_error: each field that failed.")
    call_id: str | None = Field(None, alias="callId", description="The call the error concerns.")
    rejected: list[RejectedContact] | None = Field(None, description="A campaign with no valid contact.")
    rejected_count: int | None = Field(None, alias="rejectedCount")
    campaign_id: str | None = Field(None, alias="campaignId", description="The campaign the error concerns.")
    campaign_status: CampaignStatus | None = Field(
        None, alias="campaignStatus", description="invalid_campaign_transition: the campaign's status."
    )


class SentryStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    configured: bool
    enabled: bool
    environment: str
    release: str | None
    traces_sample_rate: float
    profiles_sample_rate: float


class DependencyChecks(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database: str = Field(description="`ok`, or `error: <exception>`.")
    rabbitmq: str = Field(description="`ok`, or `error: <exception>`.")


class Live(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["ok"]
    service: str


class Ready(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["ok", "unavailable"]
    service: str
    checks: DependencyChecks


class Health(Ready):
    sentry: SentryStatus
