"""Rows for tests, made through the same code the operator uses."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select

from shared.calls import statuses
from shared.cli import accounts
from shared.core.models import Call, CreditLedgerEntry, User, WebhookEvent
from tests.support.components import components


@dataclass(frozen=True)
class Customer:
    user_id: uuid.UUID
    token: str
    agent_id: uuid.UUID
    provider_agent_id: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def customer(credits: int = 100, max_concurrent_calls: int = 2, configured: bool = True) -> Customer:
    created = accounts.create_user(
        components().uow, f"{uuid.uuid4().hex[:12]}@example.com", credits, max_concurrent_calls
    )
    provider_agent_id = str(uuid.uuid4())
    agent = accounts.create_agent(
        components().uow, created.user.id, "Test agent", provider_agent_id if configured else None
    )
    return Customer(created.user.id, created.api_token, agent.id, provider_agent_id)


def call_row(owner: Customer, status: str = statuses.PENDING, **fields: object) -> Call:
    """A call row as the product makes it: a held slot always has its lease."""
    if fields.get("slot_held") and "slot_lease_expires_at" not in fields:
        lease = timedelta(seconds=components().settings.slot_lease_seconds)
        fields["slot_lease_expires_at"] = func.now() + lease
    with components().uow() as uow:
        call = Call(
            user_id=owner.user_id, agent_id=owner.agent_id, phone_number="+14155550123", status=status, **fields
        )
        uow.session.add(call)
        uow.commit()
    return call


def load_call(call_id: uuid.UUID) -> Call:
    with components().uow() as uow:
        return uow.session.get_one(Call, call_id)


def load_event(event_id: int | None) -> WebhookEvent:
    with components().uow() as uow:
        return uow.session.get_one(WebhookEvent, event_id)


def credits_of(user_id: uuid.UUID) -> int:
    with components().uow() as uow:
        return uow.session.get_one(User, user_id).credits


def ledger_total(user_id: uuid.UUID) -> tuple[int, int]:
    """(number of entries, sum of amounts) in the user's credit ledger."""
    with components().uow() as uow:
        count, total = uow.session.execute(
            select(func.count(), func.coalesce(func.sum(CreditLedgerEntry.amount), 0)).where(
                CreditLedgerEntry.user_id == user_id
            )
        ).one()
    return count, total
