"""Reading calls back: a customer sees only their own calls."""

from __future__ import annotations

import uuid
from typing import Any

from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Call, User
from shared.core.uow import UnitOfWorkFactory
from shared.observability import tracing
from shared.observability.sentry import report


def get_call(uow_factory: UnitOfWorkFactory, user: User, call_id: str) -> Call:
    try:
        parsed = uuid.UUID(call_id)
    except ValueError:
        parsed = None
    with uow_factory() as uow:
        call = uow.reads_only().session.get(Call, parsed) if parsed else None
    if call is not None and call.user_id != user.id:
        # Reported as a security event, but answered exactly like a missing call: its existence is not disclosed.
        report(
            CallflowError(
                ErrorType.UNAUTHORIZED_CALL_ACCESS,
                "A user asked for another user's call.",
                user_id=user.id,
                call_id=call.id,
            )
        )
        call = None
    if call is None:
        raise CallflowError(ErrorType.CALL_NOT_FOUND, f"No call {call_id}.", user_id=user.id)
    return call


def call_view(call: Call) -> dict[str, Any]:
    return {
        "callId": str(call.id),
        "status": call.status,
        "executionId": call.execution_id,
        "agentId": str(call.agent_id),
        "campaignId": str(call.campaign_id) if call.campaign_id else None,
        "phoneNumber": call.phone_number,
        "durationSeconds": call.duration_seconds,
        "creditsCharged": call.credits_charged,
        "transcript": call.transcript,
        "recordingUrl": call.recording_url,
        "errorType": call.error_type,
        "traceId": tracing.trace_id_of(call.trace_headers),
        "createdAt": call.created_at.isoformat(),
        "updatedAt": call.updated_at.isoformat(),
    }
