"""What a campaign is created from: its settings and its contacts, as JSON or CSV, checked.

A contact with a number that is not valid E.164 is rejected (and reported back), not fatal; a number given twice
is called once.
"""

from __future__ import annotations

import csv
import io
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.core.phones import normalised_e164
from shared.core.storable import bounded_user_data

MAX_CONTACTS = 50_000
MAX_REJECTED_LISTED = 1_000  # an upload of garbage gets the first rejections and their count, not a copy of itself
MAX_START_AHEAD = timedelta(days=366)
PHONE_COLUMN = "phone_number"
NAME_COLUMN = "name"
_PLAIN_QUERY_SETTINGS = ("name", "agentId", "maxConcurrency", "startAt")
_QUERY_SETTINGS = {
    *_PLAIN_QUERY_SETTINGS,
    "retryMaxAttempts",
    "retryOnStatuses",
    "retryIntervalMinutes",
    "window",
    "windowDays",
}
# What a campaign may retry a contact after: the callee's answer, the carrier's failure, or Bolna's own (`error`;
# `balance-low`, whose retry finds the account as it is then: it uses an attempt even if nobody topped it up).
RetryStatus = Literal["no-answer", "busy", "failed", "error", "balance-low"]


class RetryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    max_attempts: Annotated[int, Field(alias="maxAttempts", ge=1, le=4)] = 1
    on_statuses: Annotated[list[RetryStatus], Field(alias="onStatuses")] = Field(
        default_factory=lambda: ["no-answer", "busy"]
    )
    # The wait before attempt n + 1 is interval_minutes[n - 1]; the last one repeats.
    interval_minutes: Annotated[list[Annotated[float, Field(ge=0, le=7 * 24 * 60)]], Field(alias="intervalMinutes")] = (
        Field(default_factory=lambda: [60.0], min_length=1, max_length=3)
    )


class CallingWindowSettings(BaseModel):
    """Hours [startHour, endHour) in the contact's local time, on the ISO weekdays in `days` (1 = Monday)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    start_hour: Annotated[int, Field(alias="startHour", ge=0, le=23)]
    end_hour: Annotated[int, Field(alias="endHour", ge=1, le=24)]
    days: list[Annotated[int, Field(ge=1, le=7)]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _start_before_end(self) -> CallingWindowSettings:
        if self.start_hour >= self.end_hour:
            raise ValueError("startHour must be before endHour")
        return self


class CampaignSettings(BaseModel):
    """Everything but the contacts (a CSV upload gives these as query parameters)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    agent_id: Annotated[uuid.UUID, Field(alias="agentId")]
    max_concurrency: Annotated[int | None, Field(alias="maxConcurrency", ge=1, le=1000)] = None
    start_at: Annotated[AwareDatetime | None, Field(alias="startAt")] = None
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    calling_window: Annotated[CallingWindowSettings | None, Field(alias="callingWindow")] = None

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        if any(unicodedata.category(char) == "Cc" for char in value):
            raise ValueError("must not hold control characters")
        return value

    @field_validator("start_at")
    @classmethod
    def _within_a_year(cls, value: datetime | None) -> datetime | None:
        """Within a year either way: a time already past starts the campaign at once, and one far in the past is a
        mistake (near year 1 it is also a time PostgreSQL stores and the driver cannot read back)."""
        now = datetime.now(UTC)
        if value is not None and not now - MAX_START_AHEAD <= value <= now + MAX_START_AHEAD:
            raise ValueError(f"must be within {MAX_START_AHEAD.days} days of now")
        return value


class ContactIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    phone_number: Annotated[str, Field(alias="phoneNumber")]
    name: Annotated[str | None, StringConstraints(max_length=200)] = None
    variables: Annotated[dict[str, Any], AfterValidator(bounded_user_data)] = Field(default_factory=dict)


@dataclass(frozen=True)
class NewContact:
    row: int  # 1-based: the position in `contacts`, or the CSV's data row
    phone_number: str
    name: str | None
    variables: dict[str, Any]


@dataclass
class ContactList:
    contacts: list[NewContact] = field(default_factory=list)
    duplicates: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_REJECTED_LISTED
    rejected_count: int = 0

    def reject(self, row: int, phone: Any, reason: str) -> None:
        self.rejected_count += 1
        if len(self.rejected) < MAX_REJECTED_LISTED:
            self.rejected.append(
                {"row": row, "phoneNumber": phone if isinstance(phone, str) else None, "reason": reason}
            )

    def add(self, row: int, raw: Any, seen: set[str]) -> None:
        try:
            contact = ContactIn.model_validate(raw)
            number = normalised_e164(contact.phone_number.strip())
        except (ValidationError, ValueError) as exc:
            self.reject(row, raw.get("phoneNumber") if isinstance(raw, dict) else None, _reason(exc))
            return
        if number in seen:
            self.duplicates += 1
            return
        seen.add(number)
        self.contacts.append(NewContact(row, number, contact.name or None, contact.variables))


def contacts_from_json(items: list[Any]) -> ContactList:
    if len(items) > MAX_CONTACTS:
        raise ValueError(f"a campaign holds at most {MAX_CONTACTS} contacts")
    listed, seen = ContactList(), set()
    for row, raw in enumerate(items, start=1):
        listed.add(row, raw, seen)
    return listed


def contacts_from_csv(text: str) -> ContactList:
    """Rows of a CSV with a `phone_number` column; `name` is the contact's name, every other column a variable.
    Reading stops at the first row past MAX_CONTACTS."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    columns = [(column or "").strip() for column in reader.fieldnames or []]
    if PHONE_COLUMN not in columns:
        raise ValueError(f"the CSV header must name a {PHONE_COLUMN!r} column")
    repeated = sorted({column for column in columns if column and columns.count(column) > 1})
    if repeated:
        raise ValueError(f"the CSV header names {', '.join(repeated)} more than once")
    reader.fieldnames = columns
    listed, seen = ContactList(), set()
    for row, record in enumerate(reader, start=1):
        if row > MAX_CONTACTS:
            raise ValueError(f"a campaign holds at most {MAX_CONTACTS} contacts")
        if None in record:
            listed.reject(row, record.get(PHONE_COLUMN), "more values than columns")
            continue
        variables = {key: value for key, value in record.items() if key not in (PHONE_COLUMN, NAME_COLUMN) and key}
        raw = {
            "phoneNumber": record.get(PHONE_COLUMN) or "",
            "name": record.get(NAME_COLUMN) or None,
            "variables": variables,
        }
        listed.add(row, raw, seen)
    return listed


def settings_from_query(args: dict[str, str]) -> dict[str, Any]:
    """A CSV upload's settings, from query parameters: name, agentId, maxConcurrency, startAt, retryMaxAttempts,
    retryOnStatuses (comma-separated), retryIntervalMinutes (comma-separated), window (`9-18`), windowDays (`1,2,3`)."""
    unknown = sorted(set(args) - _QUERY_SETTINGS)
    if unknown:
        raise ValueError(f"unknown query parameters: {', '.join(unknown)}")
    if "windowDays" in args and "window" not in args:
        raise ValueError("windowDays needs window (such as 9-18)")
    settings: dict[str, Any] = {key: args[key] for key in _PLAIN_QUERY_SETTINGS if key in args}
    retry: dict[str, Any] = {}
    if "retryMaxAttempts" in args:
        retry["maxAttempts"] = args["retryMaxAttempts"]
    if "retryOnStatuses" in args:
        retry["onStatuses"] = _listed(args["retryOnStatuses"])
    if "retryIntervalMinutes" in args:
        retry["intervalMinutes"] = _listed(args["retryIntervalMinutes"])
    if retry:
        settings["retry"] = retry
    if "window" in args:
        start, _, end = args["window"].partition("-")
        window: dict[str, Any] = {"startHour": start.strip(), "endHour": end.strip()}
        if "windowDays" in args:
            window["days"] = _listed(args["windowDays"])
        settings["callingWindow"] = window
    return settings


def _listed(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'contact'}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False)
        )
    return f"phoneNumber: {exc}"
