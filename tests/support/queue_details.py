"""What a failed queued call's Sentry event says of it in its `queue_details` context."""

from __future__ import annotations

from shared.core.models import Call
from tests.support.factories import Customer


def expected_queue_details(call: Call, owner: Customer, campaign_id: str) -> dict[str, object]:
    """The context of a failed campaign call: the call is its own queue entry, and a campaign call has priority 1."""
    return {
        "queue_id": str(call.id),
        "user_id": str(owner.user_id),
        "agent_id": str(owner.agent_id),
        "contact_id": call.contact_id,
        "campaign_id": campaign_id,
        "call_type": "campaign",
        "call_id": str(call.id),
        "priority": 1,
    }
