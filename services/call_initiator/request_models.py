"""The bodies the public API accepts, validated."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

import phonenumbers
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

MAX_METADATA_BYTES = 16 * 1024


def _e164(value: str) -> str:
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError("must be an E.164 phone number such as +14155550123") from exc
    formatted = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if formatted != value or not phonenumbers.is_valid_number(number):
        raise ValueError("must be a valid E.164 phone number such as +14155550123")
    return formatted


E164 = Annotated[str, StringConstraints(max_length=16), AfterValidator(_e164)]


def _bounded_metadata(value: dict[str, Any]) -> dict[str, Any]:
    if len(json.dumps(value)) > MAX_METADATA_BYTES:
        raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes of JSON")
    return value


class PlaceCallRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    agent_id: Annotated[uuid.UUID, Field(alias="agentId", strict=False)]
    phone_number: Annotated[E164, Field(alias="phoneNumber")]
    metadata: Annotated[dict[str, Any], AfterValidator(_bounded_metadata)] = Field(default_factory=dict)
