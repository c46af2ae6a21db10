"""Concurrency slots: a user's calls in flight never exceed their limit, across every process.

The user's row is locked for the decision, so two transactions can never both take the last slot.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import ColumnElement, func, or_, select
from sqlalchemy.orm import Session

from shared import statuses
from shared.config import get_settings
from shared.messaging import MessageType
from shared.models import Call, User
from shared.uow import UnitOfWork


def lock_user(session: Session, user_id: uuid.UUID) -> User:
    return session.execute(select(User).where(User.id == user_id).with_for_update()).scalar_one()


def lock_call(session: Session, call_id: uuid.UUID) -> Call:
    return session.execute(select(Call).where(Call.id == call_id).with_for_update()).scalar_one()


def held_slots(session: Session, user_id: uuid.UUID) -> int:
    return session.scalar(select(func.count()).where(Call.user_id == user_id, Call.slot_held.is_(True))) or 0


def due_pending() -> ColumnElement[bool]:
    """Calls waiting in the queue whose retry delay, if any, has passed."""
    return (Call.status == statuses.PENDING) & or_(Call.next_attempt_at.is_(None), Call.next_attempt_at <= func.now())


def has_older_pending(session: Session, call: Call) -> bool:
    return (
        session.scalar(
            select(func.count()).where(
                Call.user_id == call.user_id,
                due_pending(),
                Call.id != call.id,
                Call.created_at <= call.created_at,
            )
        )
        > 0
    )


def try_reserve(session: Session, locked_user: User, call: Call, *, behind_queue: bool) -> bool:
    """Takes a slot for `call` if one is free; the caller holds the lock on `locked_user`.

    With `behind_queue`, calls already waiting go first: a new call does not jump the queue.
    """
    if held_slots(session, locked_user.id) >= locked_user.max_concurrent_calls:
        return False
    if behind_queue and has_older_pending(session, call):
        return False
    call.slot_held = True
    call.status = statuses.INITIATING
    call.slot_lease_expires_at = func.now() + timedelta(seconds=get_settings().slot_lease_seconds)
    return True


def fail_call(uow: UnitOfWork, call: Call, error_type: str, detail: str) -> None:
    """Releases the call's slot and fails it, unless it already ended (the caller holds the call's row lock)."""
    release(uow, call)
    if not statuses.is_terminal(call.status):
        call.status = statuses.FAILED
        call.error_type = error_type
        call.error_detail = detail[:2000]


def release(uow: UnitOfWork, call: Call) -> None:
    """Gives the call's slot back (the caller holds the call's row lock) and wakes the dispatcher."""
    if not call.slot_held:
        return
    call.slot_held = False
    call.slot_lease_expires_at = None
    uow.emit(MessageType.SLOT_RELEASED, {"user_id": str(call.user_id)})
