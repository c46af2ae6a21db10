"""What must hold in the database whatever happened: checked after chaos and after fuzzing."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select, text

from shared.calls import statuses
from shared.core.models import Call, OutboxMessage
from tests.support.components import components

_TERMINAL = sorted(statuses.TERMINAL)

# Each query returns the rows that break the rule; every list must be empty.
RULES = {
    "a terminal call still holds a slot": "SELECT id FROM calls WHERE slot_held AND status = ANY(:terminal)",
    "a user holds more slots than allowed": (
        "SELECT u.id FROM users u JOIN calls c ON c.user_id = u.id AND c.slot_held "
        "GROUP BY u.id, u.max_concurrent_calls HAVING count(*) > u.max_concurrent_calls"
    ),
    "a charge for a call that did not complete": (
        "SELECT l.id FROM credit_ledger l JOIN calls c ON c.id = l.call_id WHERE c.status <> 'completed'"
    ),
    "a call charged more than once": "SELECT call_id FROM credit_ledger GROUP BY call_id HAVING count(*) > 1",
    "a charge that differs from the call's": (
        "SELECT c.id FROM calls c JOIN credit_ledger l ON l.call_id = c.id WHERE l.amount <> -c.credits_charged"
    ),
    # The one exception is reported as billing_duration_missing: Bolna gave no duration to bill.
    "a completed call without its charge": (
        "SELECT c.id FROM calls c LEFT JOIN credit_ledger l ON l.call_id = c.id "
        "WHERE c.status = 'completed' AND l.id IS NULL AND c.error_type IS DISTINCT FROM 'billing_duration_missing'"
    ),
    "a slot without a lease": "SELECT id FROM calls WHERE slot_held AND slot_lease_expires_at IS NULL",
    "a waiting call holds a slot": "SELECT id FROM calls WHERE slot_held AND status = 'pending'",
    "a charge to another user than the call's": (
        "SELECT l.id FROM credit_ledger l JOIN calls c ON c.id = l.call_id WHERE l.user_id <> c.user_id"
    ),
    "a campaign contact called more times than its attempts": (
        "SELECT cc.id FROM campaign_contacts cc JOIN calls c ON c.contact_id = cc.id "
        "GROUP BY cc.id, cc.attempts HAVING count(*) <> cc.attempts"
    ),
    "a campaign contact with two calls under way at once": (
        "SELECT contact_id FROM calls WHERE contact_id IS NOT NULL AND NOT status = ANY(:terminal) "
        "GROUP BY contact_id HAVING count(*) > 1"
    ),
    "a completed campaign with a contact still open": (
        "SELECT cc.id FROM campaign_contacts cc JOIN campaigns c ON c.id = cc.campaign_id "
        "WHERE c.status = 'completed' AND cc.state <> 'done'"
    ),
    "a contact done whose last call has not ended": (
        "SELECT cc.id FROM campaign_contacts cc JOIN calls c ON c.id = cc.last_call_id "
        "WHERE cc.state = 'done' AND NOT c.status = ANY(:terminal)"
    ),
}


def violations() -> dict[str, list[object]]:
    found: dict[str, list[object]] = {}
    with components().engine.connect() as conn:
        for rule, query in RULES.items():
            params = {"terminal": _TERMINAL} if ":terminal" in query else {}
            rows = [row[0] for row in conn.execute(text(query), params)]
            if rows:
                found[rule] = rows[:10]
    return found


def calls_of(user_ids: list[uuid.UUID]) -> list[Call]:
    with components().uow() as uow:
        return list(uow.session.scalars(select(Call).where(Call.user_id.in_(user_ids))))


def unpublished_messages() -> int:
    with components().uow() as uow:
        return uow.session.scalar(select(func.count()).where(OutboxMessage.published_at.is_(None)))
