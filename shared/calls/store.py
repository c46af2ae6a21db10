"""Where the call lifecycle reads and locks rows: one protocol, one PostgreSQL implementation.

The lifecycle rules only talk to a `CallStore`, so they run against an in-memory fake in unit tests and against
PostgreSQL everywhere else.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    DateTime,
    Integer,
    Select,
    TextClause,
    bindparam,
    case,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, SessionTransaction

from shared.calls import statuses
from shared.campaigns.states import CALLING, DONE, RUNNING
from shared.campaigns.states import COMPLETED as COMPLETED_CAMPAIGN
from shared.core.models import LIVE_CALL_CONDITION, Call, Campaign, CampaignContact, CreditLedgerEntry, User

CALL_CHARGE = "call_charge"


@dataclass(frozen=True)
class SlotLeases:
    """How long a slot is held without news: short until Bolna names the execution, then the longest call."""

    initiating_seconds: float
    held_seconds: float


class CallStore(Protocol):
    leases: SlotLeases

    def lock_user(self, user_id: uuid.UUID) -> User: ...

    def lock_call(self, call_id: uuid.UUID) -> Call: ...

    def held_slots(self, user_id: uuid.UUID) -> int: ...

    def slots_and_queue(self, user_id: uuid.UUID, call: Call) -> tuple[int, bool]:
        """The slots the user holds, and whether another of the user's calls, created no later than `call`, is
        waiting and due."""
        ...

    def add_charge(self, call: Call, credits: int) -> bool:
        """Writes the call's charge to the ledger and takes it from the user's credits, once; False if it was."""
        ...

    def reopen_campaign_attempt(self, call: Call) -> None:
        """Bolna overruled Callflow's failure of a campaign call: its contact's result is open again (and so is its
        campaign, if that had completed), to be settled on the call's real outcome."""
        ...

    def now(self) -> Any:
        """The database's clock (so every process agrees on it)."""
        ...

    def seconds_from_now(self, seconds: float) -> Any: ...


def due_pending() -> ColumnElement[bool]:
    """Direct calls waiting in the queue whose retry delay, if any, has passed. A campaign's calls back in the queue
    are its own dispatcher's (services/queue_processor/campaigns.py), behind every direct call."""
    return (
        (Call.status == statuses.PENDING)
        & Call.campaign_id.is_(None)
        & or_(Call.next_attempt_at.is_(None), Call.next_attempt_at <= func.now())
    )


def live_calls() -> TextClause:
    """Calls Bolna has, or may have, that have not ended (the predicate of their partial index, word for word)."""
    return text(LIVE_CALL_CONDITION)


# The statements below are built apart from running them so tests/integration/test_query_plans.py can EXPLAIN
# each one exactly as it runs. A held slot is filtered as `slot_held`, never `slot_held IS true`: PostgreSQL
# matches only the former to the partial indexes over held slots (`WHERE slot_held AND ...`).


def lock_user_query(user_id: BindParameter[uuid.UUID]) -> Select[tuple[User]]:
    """The customer's row, locked: slots are taken, and campaigns changed, only under this lock. FOR NO KEY UPDATE,
    not FOR UPDATE: it must not wait for (nor deadlock with) the key-share lock a charge's ledger insert takes on
    the same row through its foreign key."""
    return select(User).where(User.id == user_id).with_for_update(key_share=True)


def held_slots_query(user_id: uuid.UUID | BindParameter[uuid.UUID]) -> Select[tuple[int]]:
    return select(func.count()).where(Call.user_id == user_id, Call.slot_held)


# Built once, run on every dispatch (see provider_events._STORE_EVENT for why).
_HELD_SLOTS = held_slots_query(bindparam("user_id"))


def slots_and_queue_query(
    user_id: uuid.UUID | BindParameter[uuid.UUID],
    call_id: uuid.UUID | BindParameter[uuid.UUID],
    created_at: datetime | None | BindParameter[datetime],
) -> Select[tuple[int, bool]]:
    """The user's held slots, and whether a direct call of theirs other than `call_id`, created no later than
    `created_at` (None: a call not stored yet, created now, so every one waiting is older), waits and is due: one
    read, taken under the user's lock. Campaign calls wait behind direct calls, never in front of them."""
    if not isinstance(created_at, BindParameter):
        created_at = bindparam("created_at", created_at, type_=DateTime(timezone=True))
    held = held_slots_query(user_id).scalar_subquery()
    waiting = select(Call.id).where(
        Call.user_id == user_id,
        due_pending(),
        Call.id != call_id,
        Call.created_at <= func.coalesce(created_at, func.now()),
    )
    return select(held, waiting.exists())


# Built once: run on every call the API accepts.
_SLOTS_AND_QUEUE = slots_and_queue_query(
    bindparam("user_id"), bindparam("call_id"), bindparam("created_at", type_=DateTime(timezone=True))
)


def due_calls_query(
    user_id: uuid.UUID | BindParameter[uuid.UUID], limit: int | None | BindParameter[int]
) -> Select[tuple[Call]]:
    """The user's due direct calls, oldest first (a campaign's queued calls are the campaign dispatcher's)."""
    return (
        select(Call)
        .where(Call.user_id == user_id, due_pending())
        .order_by(Call.created_at, Call.id)
        .limit(limit)
        .with_for_update(key_share=True)
    )


# Built once: each dispatch reads its customer's due calls, up to its free slots (`limit`).
_DUE_CALLS = due_calls_query(bindparam("user_id"), bindparam("limit", type_=Integer))  # LIMIT NULL: all of them


def users_with_pending_calls_query() -> Select[tuple[uuid.UUID]]:
    return select(Call.user_id).where(due_pending()).distinct()


# A charge's statements: plain table statements (nothing here needs the ORM's bookkeeping), built once, since each
# `completed` runs them (see provider_events._STORE_EVENT).
_ADD_LEDGER_ENTRY = (
    pg_insert(CreditLedgerEntry.__table__)
    .on_conflict_do_nothing(constraint="uq_credit_ledger_call_reason")
    .returning(CreditLedgerEntry.__table__.c.id)
)
_DEDUCT_CREDITS = (
    update(User.__table__)
    .where(User.__table__.c.id == bindparam("charged_user_id"))
    .values(credits=User.__table__.c.credits - bindparam("charged_credits"))
)


# Built once as well: most changes to a call, or to what a customer holds, begin with them. They read the
# transaction's now() too (see `now`).
_LOCK_CALL = select(Call, func.now()).where(Call.id == bindparam("call_id")).with_for_update(key_share=True)
_LOCK_USER = lock_user_query(bindparam("user_id")).add_columns(func.now())


class SqlCallStore:
    def __init__(self, session: Session, leases: SlotLeases):
        self.session = session
        self.leases = leases
        self._transaction_now: tuple[SessionTransaction, datetime] | None = None

    def lock_user(self, user_id: uuid.UUID) -> User:
        user, now = self.session.execute(_LOCK_USER, {"user_id": user_id}).one()
        self.note_now(now)
        return user

    def lock_call(self, call_id: uuid.UUID) -> Call:
        call, now = self.session.execute(_LOCK_CALL, {"call_id": call_id}).one()
        self.note_now(now)
        return call

    def note_now(self, now: datetime) -> None:
        """The transaction's now(), read along with a row the transaction locked: `now` returns it from then on."""
        transaction = self.session.get_transaction()
        assert transaction is not None  # the read began it
        # In UTC, so that adding seconds adds elapsed time whatever the database session's time zone.
        self._transaction_now = (transaction, now.astimezone(UTC))

    def held_slots(self, user_id: uuid.UUID) -> int:
        return self.session.scalar(_HELD_SLOTS, {"user_id": user_id}) or 0

    def slots_and_queue(self, user_id: uuid.UUID, call: Call) -> tuple[int, bool]:
        held, waiting = self.session.execute(
            _SLOTS_AND_QUEUE, {"user_id": user_id, "call_id": call.id, "created_at": call.created_at}
        ).one()
        return held, waiting

    def add_charge(self, call: Call, credits: int) -> bool:
        # Neither statement reads what the session has still to write (the call's new status): without an
        # autoflush before them, the call is written once, at commit, rather than once here and once more there.
        with self.session.no_autoflush:
            entry_id = self.session.scalar(
                _ADD_LEDGER_ENTRY,
                {"user_id": call.user_id, "call_id": call.id, "amount": -credits, "reason": CALL_CHARGE},
            )
            if entry_id is None:
                return False
            self.session.execute(_DEDUCT_CREDITS, {"charged_user_id": call.user_id, "charged_credits": credits})
        return True

    def reopen_campaign_attempt(self, call: Call) -> None:
        contacts, campaigns = CampaignContact.__table__, Campaign.__table__
        reopened = self.session.scalar(
            update(contacts)
            .where(contacts.c.id == call.contact_id, contacts.c.last_call_id == call.id, contacts.c.state == DONE)
            .values(state=CALLING, final_status=None)
            .returning(contacts.c.campaign_id)
        )
        if reopened is not None:
            # The campaign's row is written (so locked) whatever its status: a settling completing the campaign
            # meanwhile waits for this transaction, and then sees the contact open (`CampaignDispatch.finish_if_done`).
            completed = campaigns.c.status == COMPLETED_CAMPAIGN
            self.session.execute(
                update(campaigns)
                .where(campaigns.c.id == reopened)
                .values(
                    status=case((completed, RUNNING), else_=campaigns.c.status),
                    finished_at=case((completed, None), else_=campaigns.c.finished_at),
                )
            )

    def now(self) -> Any:
        # Once a lock's read returned it, the transaction's now() as a value (PostgreSQL's now() is the
        # transaction's start, so it is the same instant). The ORM writes a row whose values are all plain values
        # with a cached statement, and batches such rows (a dispatch's new campaign calls are one INSERT); an SQL
        # expression among them makes it build and compile the statement anew for that row. Before any such read,
        # now() itself, which costs no round trip.
        if self._transaction_now is not None and self._transaction_now[0] is self.session.get_transaction():
            return self._transaction_now[1]
        return func.now()

    def seconds_from_now(self, seconds: float) -> Any:
        return self.now() + timedelta(seconds=seconds)

    def due_calls(self, user_id: uuid.UUID, limit: int | None) -> list[Call]:
        """The user's oldest direct calls waiting in the queue and due (all of them when `limit` is None), locked."""
        return list(self.session.scalars(_DUE_CALLS, {"user_id": user_id, "limit": limit}))

    def users_with_pending_calls(self) -> list[uuid.UUID]:
        return list(self.session.scalars(users_with_pending_calls_query()))
