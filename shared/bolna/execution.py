"""Bolna's AgentExecution object (what every webhook and `GET /executions/{id}` carry), read defensively."""

from __future__ import annotations

import math
import uuid
from typing import Any

MAX_CALL_SECONDS = 24 * 3600  # a longer duration is garbage, not a call to bill
MAX_ATTEMPT = 100

CONTEXT_CALL_ID_KEY = "callflow_call_id"  # our call id, sent to Bolna in user_data and echoed back


class AgentExecution:
    """Reads the fields Callflow needs from Bolna's AgentExecution object, tolerating its variants."""

    def __init__(self, payload: dict[str, Any]):
        self.payload = payload

    @property
    def execution_id(self) -> str | None:
        value = self.payload.get("id") or self.payload.get("execution_id")
        return str(value)[:64] if value else None

    @property
    def status(self) -> str | None:
        value = self.payload.get("status")
        return value[:32] if isinstance(value, str) and value else None

    @property
    def attempt(self) -> int:
        """Bolna's auto-retry reuses the execution id; the retry count tells attempts apart."""
        value = self.payload.get("retry_count")
        if isinstance(value, bool) or not isinstance(value, int):  # JSON true/false parse as int subclasses
            return 0
        return value if 0 <= value <= MAX_ATTEMPT else 0

    @property
    def context_call_id(self) -> uuid.UUID | None:
        context = self.payload.get("context_details")
        if not isinstance(context, dict):
            return None
        recipient_data = context.get("recipient_data")
        for source in (recipient_data if isinstance(recipient_data, dict) else {}, context):
            try:
                return uuid.UUID(str(source[CONTEXT_CALL_ID_KEY]))
            except (KeyError, ValueError):
                continue
        return None

    @property
    def telephony(self) -> dict[str, Any]:
        value = self.payload.get("telephony_data")
        return value if isinstance(value, dict) else {}

    @property
    def duration_seconds(self) -> int | None:
        """The first positive one of `telephony_data.duration` (a string), `conversation_duration` and
        `conversation_time`; 0 when the only usable ones are 0; None when none is usable (missing, absurd)."""
        usable = []
        for value in (
            self.telephony.get("duration"),
            self.payload.get("conversation_duration"),
            self.payload.get("conversation_time"),
        ):
            try:
                seconds = float(value)
            except (TypeError, ValueError, OverflowError):  # an int past a float's range overflows
                continue
            if 0 <= seconds <= MAX_CALL_SECONDS:
                usable.append(math.ceil(seconds))
        return next((seconds for seconds in usable if seconds > 0), 0 if usable else None)

    @property
    def transcript(self) -> str | None:
        value = self.payload.get("transcript")
        return value if isinstance(value, str) and value else None

    @property
    def recording_url(self) -> str | None:
        value = self.telephony.get("recording_url")
        return value if isinstance(value, str) and value else None
