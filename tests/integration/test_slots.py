"""The concurrency limit holds when many transactions race for the last slots."""

import threading

from sqlalchemy import select

from shared import calls, slots, statuses
from shared.bolna import get_bolna_client
from shared.config import get_settings
from shared.models import OutboxMessage
from shared.uow import UnitOfWork
from tests.support.factories import call_row, customer, load_call


def test_racing_reservations_never_exceed_the_limit():
    owner = customer(max_concurrent_calls=3)
    calls = [call_row(owner) for _ in range(20)]
    barrier = threading.Barrier(len(calls))
    reserved: list[bool] = []

    def reserve(call_id):
        barrier.wait()
        with UnitOfWork() as uow:
            user = slots.lock_user(uow.session, owner.user_id)
            call = uow.session.get_one(type(calls[0]), call_id)
            ok = slots.try_reserve(uow.session, user, call, behind_queue=False)
            uow.commit()
        reserved.append(ok)

    threads = [threading.Thread(target=reserve, args=(call.id,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert reserved.count(True) == 3
    held = [load_call(call.id) for call in calls]
    assert sum(call.slot_held for call in held) == 3
    assert all(call.status == statuses.INITIATING for call in held if call.slot_held)
    assert all(call.slot_lease_expires_at is not None for call in held if call.slot_held)


def test_a_new_call_does_not_jump_the_queue():
    owner = customer(max_concurrent_calls=1)
    waiting = call_row(owner)
    newcomer = call_row(owner)
    with UnitOfWork() as uow:
        user = slots.lock_user(uow.session, owner.user_id)
        call = uow.session.get_one(type(newcomer), newcomer.id)
        assert not slots.try_reserve(uow.session, user, call, behind_queue=True)
        first = uow.session.get_one(type(waiting), waiting.id)
        assert slots.try_reserve(uow.session, user, first, behind_queue=True)


def test_release_is_idempotent_and_announces_the_free_slot_once():
    owner = customer()
    call = call_row(owner, status=statuses.INITIATING, slot_held=True)
    for _ in range(2):
        with UnitOfWork() as uow:
            locked = uow.session.get_one(type(call), call.id, with_for_update=True)
            slots.release(uow, locked)
            uow.commit()
    assert not load_call(call.id).slot_held
    with UnitOfWork() as uow:
        announced = uow.session.scalars(
            select(OutboxMessage).where(OutboxMessage.body["user_id"].astext == str(owner.user_id))
        ).all()
    assert [row.message_type for row in announced] == ["slot.released"]


def test_a_request_the_breaker_holds_back_gives_the_slot_back_and_requeues_the_call():
    owner = customer(max_concurrent_calls=1)
    call = call_row(owner, status=statuses.INITIATING, slot_held=True)
    breaker = get_bolna_client().breaker
    for _ in range(get_settings().bolna_breaker_threshold):
        breaker.record_failure()
    try:
        assert calls.initiate(call.id, retry_transient=False) is None
    finally:
        breaker.record_success()
    requeued = load_call(call.id)
    assert (requeued.status, requeued.slot_held, requeued.dispatch_attempts) == ("pending", False, 0)
    assert "circuit open" in requeued.error_detail
