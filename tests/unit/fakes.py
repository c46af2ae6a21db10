"""An in-memory `CallStore`: the lifecycle rules run against it exactly as against PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import OperationalError

from shared.calls import statuses
from shared.calls.store import SlotLeases
from shared.core.models import Call, User

DEFAULT_LEASES = SlotLeases(initiating_seconds=30, held_seconds=3600)


class FakeCallStore:
    def __init__(self, leases: SlotLeases = DEFAULT_LEASES) -> None:
        self.leases = leases
        self.clock = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
        self.users: dict[uuid.UUID, User] = {}
        self.calls: dict[uuid.UUID, Call] = {}
        self.ledger: dict[uuid.UUID, int] = {}  # call id -> amount (negative: a charge)
        self.ledger_down = False
        self.reopened_attempts: list[uuid.UUID] = []  # campaign calls whose contact's result was opened again

    def add_user(self, credits: int = 100, max_concurrent_calls: int = 2) -> User:
        user = User(id=uuid.uuid4(), credits=credits, max_concurrent_calls=max_concurrent_calls)
        self.users[user.id] = user
        return user

    def add_call(self, user: User, status: str = statuses.PENDING, **fields: Any) -> Call:
        created = self.clock + timedelta(microseconds=len(self.calls))  # creation order, as the database keeps it
        values: dict[str, Any] = {
            "id": uuid.uuid4(),
            "user_id": user.id,
            "agent_id": uuid.uuid4(),
            "phone_number": "+14155550123",
            "status": status,
            "slot_held": False,
            "dispatch_attempts": 0,
            "created_at": created,
            **fields,
        }
        call = Call(**values)
        self.calls[call.id] = call
        return call

    def lock_user(self, user_id: uuid.UUID) -> User:
        return self.users[user_id]

    def lock_call(self, call_id: uuid.UUID) -> Call:
        return self.calls[call_id]

    def held_slots(self, user_id: uuid.UUID) -> int:
        return sum(1 for call in self.calls.values() if call.user_id == user_id and call.slot_held)

    def slots_and_queue(self, user_id: uuid.UUID, call: Call) -> tuple[int, bool]:
        return self.held_slots(user_id), self._has_older_pending(user_id, call)

    def _has_older_pending(self, user_id: uuid.UUID, call: Call) -> bool:
        return any(
            other.user_id == user_id
            and other.id != call.id
            and other.status == statuses.PENDING
            and (other.next_attempt_at is None or other.next_attempt_at <= self.clock)
            and other.created_at <= call.created_at
            for other in self.calls.values()
        )

    def add_charge(self, call: Call, credits: int) -> bool:
        if self.ledger_down:
            raise OperationalError("INSERT INTO credit_ledger", {}, ConnectionError("database went away"))
        if call.id in self.ledger:
            return False
        self.ledger[call.id] = -credits
        self.users[call.user_id].credits -= credits
        return True

    def reopen_campaign_attempt(self, call: Call) -> None:
        self.reopened_attempts.append(call.id)

    def now(self) -> datetime:
        return self.clock

    def seconds_from_now(self, seconds: float) -> datetime:
        return self.clock + timedelta(seconds=seconds)
