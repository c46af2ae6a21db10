"""The bodies the public API accepts, validated."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from shared.core.phones import e164
from shared.core.storable import bounded_user_data

E164 = Annotated[str, StringConstraints(max_length=16), AfterValidator(e164)]


class PlaceCallRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    agent_id: Annotated[uuid.UUID, Field(alias="agentId", strict=False)]
    phone_number: Annotated[E164, Field(alias="phoneNumber")]
    metadata: Annotated[dict[str, Any], AfterValidator(bounded_user_data)] = Field(default_factory=dict)
