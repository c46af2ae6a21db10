"""The concurrency limit holds when many transactions race for the last slots."""

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from services.call_initiator.placing import place_call
from services.call_initiator.request_models import PlaceCallRequest
from shared.bolna.execution import AgentExecution
from shared.calls import lifecycle, provider_events, statuses
from shared.calls.store import CALL_CHARGE
from shared.core.models import Call, CreditLedgerEntry, OutboxMessage, User
from tests.support.components import components
from tests.support.engine_events import statements_run
from tests.support.factories import call_row, customer, load_call
from tests.support.placers import RecordingPlacer


def test_racing_reservations_never_exceed_the_limit():
    owner = customer(max_concurrent_calls=3)
    rows = [call_row(owner) for _ in range(20)]
    barrier = threading.Barrier(len(rows), timeout=30)

    def reserve(call_id) -> bool:
        barrier.wait()
        with components().uow() as uow:
            user = uow.calls.lock_user(owner.user_id)
            call = uow.session.get_one(Call, call_id)
            ok = lifecycle.reserve_slot(uow.calls, user, call, behind_queue=False)
            uow.commit()
        return ok

    with ThreadPoolExecutor(max_workers=len(rows)) as pool:
        racing = [pool.submit(reserve, call.id) for call in rows]
    reserved = [future.result() for future in racing]  # a thread that crashed raises its error here

    assert reserved.count(True) == 3
    held = [load_call(call.id) for call in rows]
    assert sum(call.slot_held for call in held) == 3
    assert all(call.status == statuses.INITIATING for call in held if call.slot_held)
    assert all(call.slot_lease_expires_at is not None for call in held if call.slot_held)


def test_a_new_call_does_not_jump_the_queue():
    owner = customer(max_concurrent_calls=1)
    waiting = call_row(owner)
    newcomer = call_row(owner)
    with components().uow() as uow:
        user = uow.calls.lock_user(owner.user_id)
        call = uow.session.get_one(Call, newcomer.id)
        assert not lifecycle.reserve_slot(uow.calls, user, call, behind_queue=True)
        first = uow.session.get_one(Call, waiting.id)
        assert lifecycle.reserve_slot(uow.calls, user, first, behind_queue=True)


def test_release_is_idempotent_and_announces_the_free_slot_once():
    owner = customer()
    call = call_row(owner, status=statuses.INITIATING, slot_held=True)
    for _ in range(2):
        with components().uow() as uow:
            locked = uow.session.get_one(Call, call.id, with_for_update=True)
            lifecycle.release_slot(locked)
            uow.commit()
    assert not load_call(call.id).slot_held
    with components().uow() as uow:
        announced = uow.session.scalars(
            select(OutboxMessage).where(OutboxMessage.body["user_id"].astext == str(owner.user_id))
        ).all()
    assert [row.message_type for row in announced] == ["slot.released"]


def test_a_request_the_breaker_holds_back_gives_the_slot_back_and_requeues_the_call():
    owner = customer(max_concurrent_calls=1)
    call = call_row(owner, status=statuses.INITIATING, slot_held=True)
    breaker = components().bolna.breaker
    for _ in range(components().settings.bolna_breaker_threshold):
        breaker.record_failure()
    try:
        assert components().placer.initiate(call, owner.provider_agent_id, retry_transient=False) is None
    finally:
        breaker.record_success()
    requeued = load_call(call.id)
    assert (requeued.status, requeued.slot_held, requeued.dispatch_attempts) == ("pending", False, 0)
    assert "circuit open" in requeued.error_detail


def test_the_customers_lock_does_not_wait_for_a_charge_being_written():
    """A charge's ledger insert takes a key-share lock on the customer's row (its foreign key). The slot-takers'
    lock must not wait for it: waiting there, while the charge then waits to update the same row's credits, is a
    deadlock PostgreSQL breaks by failing one of them."""
    owner = customer(max_concurrent_calls=3)
    call = call_row(owner, status=statuses.COMPLETED)
    with components().uow() as charging, components().uow() as dispatching:
        # The first half of SqlCallStore.add_charge: the ledger row, its credits update not yet made.
        charging.session.add(CreditLedgerEntry(user_id=owner.user_id, call_id=call.id, amount=-1, reason=CALL_CHARGE))
        charging.session.flush()
        dispatching.session.execute(text("SET LOCAL lock_timeout = '2s'"))
        assert dispatching.calls.lock_user(owner.user_id).id == owner.user_id
        dispatching.commit()
        charging.commit()


def test_the_clock_read_under_the_customers_lock_is_utc_whatever_the_sessions_time_zone():
    """Leases are that clock plus seconds: in a zone with daylight saving, wall-clock arithmetic would be an hour
    off around the change."""
    owner = customer()
    with components().uow() as uow:
        uow.session.execute(text("SET TIME ZONE 'America/New_York'"))
        uow.calls.lock_user(owner.user_id)
        now, database_now = uow.calls.now(), uow.session.scalar(select(func.now()))
        assert now.utcoffset() == timedelta(0) and now == database_now


@pytest.mark.parametrize("lock", ["the call's lock", "the webhook's read of its call"])
def test_a_call_locked_gives_the_transactions_clock_as_a_value(lock):
    """After a call's lock, the lifecycle writes the transaction's now() as a value (the ORM then writes the row with
    a cached statement): the same instant the database's now() gives."""
    owner = customer()
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="ringing", execution_id=execution_id)
    with components().uow() as uow:
        uow.session.execute(text("SET TIME ZONE 'Asia/Kolkata'"))
        if lock == "the call's lock":
            assert uow.calls.lock_call(call.id).id == call.id
        else:
            assert provider_events._find_call(uow, AgentExecution({"id": execution_id})).id == call.id
        now, database_now = uow.calls.now(), uow.session.scalar(select(func.now()))
        assert isinstance(now, datetime) and now.utcoffset() == timedelta(0) and now == database_now


def test_the_api_inserts_a_call_holding_its_slot_with_the_transactions_clock_as_values():
    """The slot's times are the clock read under the customer's lock, so the INSERT is the ORM's cached statement,
    not one built and compiled again for each call around an SQL now()."""
    owner = customer()
    with components().uow() as uow:
        user = uow.session.get_one(User, owner.user_id)
    request = PlaceCallRequest.model_validate({"agentId": str(owner.agent_id), "phoneNumber": "+14155550123"})
    with statements_run() as run:
        accepted = place_call(RecordingPlacer(), user, request)
    [insert] = [statement for statement in run if statement.startswith("INSERT INTO calls")]
    assert "now()" not in insert.lower()
    call = load_call(accepted.call.id)
    assert call.slot_held and call.initiated_at == call.created_at
    lease = timedelta(seconds=components().settings.initiating_lease_seconds)
    assert call.slot_lease_expires_at == call.created_at + lease
