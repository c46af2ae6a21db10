"""The simulator's `SIM_*` settings, the fixed facts of a simulated call, and the body of `POST /call`."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

import phonenumbers
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# How a placed call ends: the callee's answer, the carrier's failure, or Bolna's own end of it: `error` (its fault),
# `balance-low` (the account has no credit left: nothing is dialled), `canceled` and `stopped` (from its dashboard).
OUTCOMES = ("completed", "busy", "no-answer", "failed", "error", "balance-low", "canceled", "stopped")
# The outcomes after which Bolna's auto-retry dials again (`redial_rate`): its `retry_on_statuses` may name these.
REDIALLED_OUTCOMES = frozenset({"busy", "no-answer", "failed", "error"})
# Every status Bolna gives an execution (its spec's list), including those the simulator never plays.
Status = Literal[
    "scheduled",
    "queued",
    "rescheduled",
    "initiated",
    "ringing",
    "in-progress",
    "call-disconnected",
    "completed",
    "balance-low",
    "busy",
    "no-answer",
    "canceled",
    "failed",
    "stopped",
    "error",
]
STATUSES: tuple[str, ...] = get_args(Status)
TERMINAL_STATUSES = frozenset(
    {"completed", "busy", "no-answer", "failed", "canceled", "stopped", "error", "balance-low"}
)
# The line is free once the callee hangs up, minutes before Bolna's post-processing sends `completed`.
LINE_RELEASING_STATUSES = TERMINAL_STATUSES | {"call-disconnected"}
STOPPABLE_STATUSES = frozenset({"scheduled", "queued", "initiated"})

WEBHOOK_TIMEOUT_SECONDS = 10.0
WEBHOOK_RETRIES = 5
WEBHOOK_BACKOFF_SECONDS = 0.2

# What a call placed but answered with an error gets: Bolna's own 500, or a gateway's 502/504 in front of it.
ERRORS_AFTER_PLACING = (500, 502, 504)
MAX_PAGE_SIZE = 50  # of `GET /v2/agent/{agent_id}/executions`

SIMULATED_FROM_NUMBER = "+918035735888"
COST_CENTS_PER_MINUTE = {"llm": 1.2, "network": 1.5, "platform": 2.0, "synthesizer": 3.0, "transcriber": 0.8}
TRANSCRIPT = (
    "assistant: Hello! This is Maya calling from Callflow. Is this a good time to talk?\n"
    "user: Yes, go ahead.\n"
    "assistant: I am calling to confirm your appointment for tomorrow at 11 am. Does that still work?\n"
    "user: Yes, that works for me.\n"
    "assistant: Great, you are all set. Thank you and have a nice day!\n"
)
ERROR_MESSAGES = {
    "failed": "Call failed: the carrier rejected the call (SIP 503 Service Unavailable)",
    "error": "Call errored: the telephony provider could not be reached",
    "balance-low": "Call not placed: the account balance is too low",
}


def without_duration(record: dict[str, Any]) -> dict[str, Any]:
    """An execution object as Bolna sends it before its post-processing wrote the duration."""
    return {**record, "conversation_duration": None, "telephony_data": {**record["telephony_data"], "duration": None}}


_E164 = re.compile(r"\+[1-9]\d{1,14}")


class SimulatorConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIM_", extra="forbid", case_sensitive=False)

    webhook_url: str = "http://127.0.0.1:8002/webhooks/bolna"
    api_key: str = ""
    step_delay_seconds: float = Field(0.5, ge=0)
    talk_seconds: float = Field(2.0, ge=0)
    completed_delay_seconds: float = Field(1.0, ge=0)
    duration_min_seconds: int = Field(20, ge=0)
    duration_max_seconds: int = Field(180, ge=0)
    outcomes: Annotated[dict[str, Annotated[float, Field(ge=0)]], NoDecode] = Field(
        default_factory=lambda: {"completed": 1.0, "busy": 0.0, "no-answer": 0.0, "failed": 0.0}
    )
    error_rate: float = Field(0.0, ge=0, le=1)
    # Share of POST /call refused with a 400 about the request (nothing placed), as Bolna refuses what it will not do.
    refusal_rate: float = Field(0.0, ge=0, le=1)
    # Share of POST /call answered 429, with `Retry-After: retry_after_seconds` when that is set.
    rate_limit_rate: float = Field(0.0, ge=0, le=1)
    retry_after_seconds: int | None = Field(2, ge=0)
    timeout_rate: float = Field(0.0, ge=0, le=1)
    timeout_seconds: float = Field(30.0, ge=0)
    latency_ms: int = Field(0, ge=0)
    duplicate_rate: float = Field(0.0, ge=0, le=1)
    reorder_rate: float = Field(0.0, ge=0, le=1)
    # Share of calls whose webhooks are never delivered (the call still runs; GET /executions/{id} shows it).
    webhook_drop_rate: float = Field(0.0, ge=0, le=1)
    # Share of POST /call that place the call and then lose its answer: held `timeout_seconds` ("timeout") or cut
    # by a TCP reset with no HTTP answer at all ("reset").
    lost_answer_rate: float = Field(0.0, ge=0, le=1)
    lost_answer_mode: Literal["timeout", "reset"] = "timeout"
    # Share of POST /call that place the call and then answer a 5xx, as Bolna or a gateway in front of it can.
    error_after_placing_rate: float = Field(0.0, ge=0, le=1)
    # Per status, the share of its webhooks never delivered (nor retried); the call's state still moves on.
    dropped_webhooks: Annotated[dict[str, Annotated[float, Field(ge=0, le=1)]], NoDecode] = Field(default_factory=dict)
    # Share of Bolna's other requests (GET /executions/{id}, the executions list, POST /call/{id}/stop) answered 500
    # without acting: Bolna cannot be asked about a call, or told to stop one.
    other_requests_error_rate: float = Field(0.0, ge=0, le=1)
    # Share of `completed` webhooks sent before Bolna's post-processing wrote the duration (no
    # `conversation_duration`, no `telephony_data.duration`); `GET /executions/{id}` has it `duration_lag_seconds`
    # after the webhook (until then the record is `completed` without it too).
    completed_without_duration_rate: float = Field(0.0, ge=0, le=1)
    duration_lag_seconds: float = Field(0.0, ge=0)
    # Share of calls ending busy, no-answer, failed or error that Bolna's auto-retry dials again, whatever the request's
    # `retry_config` said: the execution comes back `scheduled` with `retry_count` 1, stays so for
    # `redial_delay_seconds` (the retry's interval), then plays again (an outcome drawn when the call was placed)
    # unless it was stopped meanwhile.
    redial_rate: float = Field(0.0, ge=0, le=1)
    redial_delay_seconds: float = Field(1.0, ge=0)
    seed: int | None = None

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("outcomes", "dropped_webhooks", mode="before")
    @classmethod
    def _mapping_from_text(cls, value: Any) -> Any:
        """Reads the environment's `completed=0.7,busy=0.3` form; mappings pass through."""
        if not isinstance(value, str):
            return value
        pairs = (item.partition("=") for item in value.split(",") if item.strip())
        return {name.strip(): weight.strip() for name, _, weight in pairs}

    @field_validator("outcomes")
    @classmethod
    def _known_outcomes(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(OUTCOMES))
        if unknown:
            raise ValueError(f"unknown outcomes {unknown}, expected some of {list(OUTCOMES)}")
        if sum(value.values()) <= 0:
            raise ValueError("at least one outcome needs a positive weight")
        return {outcome: value.get(outcome, 0.0) for outcome in OUTCOMES}

    @field_validator("dropped_webhooks")
    @classmethod
    def _known_statuses(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(STATUSES))
        if unknown:
            raise ValueError(f"unknown statuses {unknown}, expected some of {list(STATUSES)}")
        return value

    @model_validator(mode="after")
    def _duration_range(self) -> SimulatorConfig:
        if self.duration_min_seconds > self.duration_max_seconds:
            raise ValueError("duration_min_seconds must not exceed duration_max_seconds")
        return self


def _e164(value: str) -> str:
    if not _E164.fullmatch(value):
        raise ValueError("must be an E.164 number such as +14155550123")
    if not phonenumbers.is_valid_number(phonenumbers.parse(value, None)):
        raise ValueError("is not a valid phone number")
    return value


PhoneNumber = Annotated[str, AfterValidator(_e164)]


class CallRequest(BaseModel):
    """The body of `POST /call`; Bolna's other options (agent_data, bypass_call_guardrails) pass unchecked."""

    model_config = ConfigDict(extra="allow")

    agent_id: uuid.UUID
    recipient_phone_number: PhoneNumber
    from_phone_number: PhoneNumber | None = None
    user_data: dict[str, Any] = Field(default_factory=dict)
    scheduled_at: datetime | None = None
    retry_config: dict[str, Any] | None = None


class ExecutionsQuery(BaseModel):
    """The query of `GET /v2/agent/{agent_id}/executions`; the spec's other filters (call_type, provider,
    answered_by_voice_mail, batch_id) are not simulated."""

    model_config = ConfigDict(extra="ignore")

    page_number: int = Field(1, ge=1)
    page_size: int = Field(20, ge=1, le=MAX_PAGE_SIZE)
    status: Status | None = None
    # Bolna asks for UTC "with UTC indication": a time without an offset is refused rather than guessed.
    created_from: AwareDatetime | None = Field(None, alias="from")
    created_to: AwareDatetime | None = Field(None, alias="to")
