"""The dispatcher reserves a slot only for a call a placing thread can place at once: a reservation never waits
behind others long enough for its short lease to run out while its call may still be dialled."""

from __future__ import annotations

import threading
import time
import uuid

from sqlalchemy import func, select, update

from services.queue_processor.dispatch import Dispatcher, DispatchTrigger, _Work
from shared.calls import statuses
from shared.calls.initiation import CallPlacer
from shared.core.models import Call
from tests.support.components import components
from tests.support.factories import Customer, call_row, customer
from tests.support.stack import wait_until


class _HeldPlacer(CallPlacer):
    """Places nothing until released, or until `hold_seconds` passed: each call it is handed stays with its placing
    thread that long (a short hold stands for Bolna's answer taking a while)."""

    def __init__(self, hold_seconds: float = 30) -> None:
        super().__init__(components().uow, components().bolna, max_attempts=3)
        self.release = threading.Event()
        self.handed: list[uuid.UUID] = []
        self._hold_seconds = hold_seconds

    def initiate(self, call: Call, provider_agent_id: str, retry_transient: bool) -> Call | None:
        self.handed.append(call.id)
        self.release.wait(self._hold_seconds)
        return None


def _reserved(user_id: uuid.UUID) -> int:
    with components().uow() as uow:
        return uow.session.scalar(select(func.count()).where(Call.user_id == user_id, Call.slot_held))


def test_no_call_is_reserved_while_every_placing_thread_is_busy():
    owner = customer(credits=100, max_concurrent_calls=10)
    waiting = [call_row(owner).id for _ in range(5)]
    placer = _HeldPlacer()
    dispatcher = Dispatcher(placer, concurrency=2)
    dispatching = threading.Thread(target=dispatcher.dispatch_pending, args=(owner.user_id, DispatchTrigger.MESSAGE))
    dispatching.start()
    try:
        wait_until(lambda: len(placer.handed) == 2, 10, "both placing threads have a call")
        time.sleep(0.5)  # room for a third reservation, if the dispatcher would make one
        assert _reserved(owner.user_id) == 2, "free slots remain, but no thread is free to place another call"
    finally:
        placer.release.set()
    dispatching.join(30)
    assert dispatcher.wait_until_idle(30)
    assert sorted(placer.handed) == sorted(waiting), "every call handed over once, oldest first"
    assert set(placer.handed[:2]) == set(waiting[:2]), "the oldest first"
    with components().uow() as uow:
        left = uow.session.scalars(select(Call.status).where(Call.user_id == owner.user_id)).all()
    assert set(left) == {statuses.INITIATING}


class _CountingDispatcher(Dispatcher):
    def __init__(self, placer: CallPlacer, concurrency: int):
        super().__init__(placer, concurrency)
        self.reads = 0

    def _work_due(self, user_id: uuid.UUID, ended_call_id: uuid.UUID | None = None) -> _Work:
        self.reads += 1
        return super()._work_due(user_id, ended_call_id)


def test_a_backlog_is_read_once_each_reservation_saying_what_is_left():
    owner = customer(credits=100, max_concurrent_calls=100)
    waiting = [call_row(owner).id for _ in range(12)]
    placer = _HeldPlacer(hold_seconds=0.05)  # placing threads come free one or two at a time
    dispatcher = _CountingDispatcher(placer, concurrency=2)
    assert dispatcher.dispatch_pending(owner.user_id, DispatchTrigger.MESSAGE) == len(waiting)
    assert dispatcher.wait_until_idle(30)
    assert sorted(placer.handed) == sorted(waiting), "every call handed over once"
    # Twelve calls go in batches of one or two. Each reservation's own transaction says what is left; a separate
    # read before each batch, and one after the last, was up to thirteen.
    assert dispatcher.reads == 1


def test_a_dispatch_with_nothing_left_returns_without_waiting_for_a_placing_thread():
    """The message handler is one thread: a dispatch that waited for Bolna's answer to the call it just handed over
    would hold back every message behind it."""
    owner = customer(credits=100, max_concurrent_calls=10)
    call_row(owner)
    placer = _HeldPlacer()
    dispatcher = Dispatcher(placer, concurrency=1)
    dispatching = threading.Thread(target=dispatcher.dispatch_pending, args=(owner.user_id, DispatchTrigger.MESSAGE))
    dispatching.start()
    try:
        dispatching.join(10)
        assert not dispatching.is_alive(), "the dispatch waited for the placing thread"
        wait_until(lambda: len(placer.handed) == 1, 10, "the call handed to its placing thread")
    finally:
        placer.release.set()
    dispatching.join(30)
    assert dispatcher.wait_until_idle(30)


def test_a_burst_of_wake_ups_is_answered_by_the_read_that_ended_its_first_dispatch():
    owner = customer(credits=100, max_concurrent_calls=100)
    first = call_row(owner).id
    placer = _HeldPlacer(hold_seconds=0)
    dispatcher = _CountingDispatcher(placer, concurrency=2)
    burst = time.monotonic()  # one customer's call.queued messages, all delivered before the first is handled
    assert dispatcher.dispatch_pending(owner.user_id, DispatchTrigger.MESSAGE, received_at=burst) == 1
    assert dispatcher.reads == 1
    for _ in range(9):
        assert dispatcher.dispatch_pending(owner.user_id, DispatchTrigger.MESSAGE, received_at=burst) == 0
    assert dispatcher.reads == 1, "the burst's later wake-ups read again what the first one's dispatch read"
    # A freed slot that names its call may end a campaign attempt, which only its own read can tell.
    dispatcher.dispatch_pending(owner.user_id, DispatchTrigger.MESSAGE, uuid.uuid4(), received_at=burst)
    assert dispatcher.reads == 2
    # A wake-up with no time of arrival (the sweep's, a retry's) always reads.
    dispatcher.dispatch_pending(owner.user_id, DispatchTrigger.SWEEP)
    assert dispatcher.reads == 3
    later = call_row(owner).id
    assert dispatcher.dispatch_pending(owner.user_id, DispatchTrigger.MESSAGE, received_at=time.monotonic()) == 1
    assert dispatcher.wait_until_idle(30)
    assert sorted(placer.handed) == sorted([first, later]), "each call handed over once"


class _QueueingBehindTheRead(_CountingDispatcher):
    """A call is queued, and its wake-up arrives, once the read that ends the dispatch has begun and before the
    dispatch ends: that read may not have seen the call."""

    def __init__(self, placer: CallPlacer, owner: Customer):
        super().__init__(placer, concurrency=2)
        self._owner = owner
        self.queued: list[uuid.UUID] = []
        self.arrived_at = 0.0

    def _work_due(self, user_id: uuid.UUID, ended_call_id: uuid.UUID | None = None) -> _Work:
        work = super()._work_due(user_id, ended_call_id)
        if not self.queued:
            self.queued.append(call_row(self._owner).id)
            self.arrived_at = time.monotonic()
        return work


def test_a_wake_up_that_arrived_after_the_last_read_began_is_read_for():
    owner = customer(credits=100, max_concurrent_calls=100)
    placer = _HeldPlacer(hold_seconds=0)
    dispatcher = _QueueingBehindTheRead(placer, owner)
    assert dispatcher.dispatch_pending(owner.user_id, DispatchTrigger.MESSAGE, received_at=time.monotonic()) == 0
    assert dispatcher.dispatch_pending(owner.user_id, DispatchTrigger.MESSAGE, received_at=dispatcher.arrived_at) == 1
    assert dispatcher.wait_until_idle(30)
    assert placer.handed == dispatcher.queued


class _OutracedToItsCalls(_CountingDispatcher):
    """While it waits for a placing thread, the calls its read found due are taken (here: canceled) by someone else:
    its reservation, which reads only what that read said was due, reserves nothing."""

    def __init__(self, placer: CallPlacer, owner: Customer):
        super().__init__(placer, concurrency=2)
        self._owner = owner

    def _take_free_threads(self) -> int:
        with components().uow() as uow:
            uow.session.execute(
                update(Call).where(Call.user_id == self._owner.user_id).values(status=statuses.CANCELED)
            )
            uow.commit()
        return super()._take_free_threads()


def test_a_dispatch_whose_reservation_found_nothing_answers_no_other_wake_up():
    """Such a reservation says nothing of campaign calls its read did not see, nor of calls Bolna's outage held back."""
    owner = customer(credits=100, max_concurrent_calls=100)
    call_row(owner)
    dispatcher = _OutracedToItsCalls(_HeldPlacer(hold_seconds=0), owner)
    arrived = time.monotonic()
    assert dispatcher.dispatch_pending(owner.user_id, DispatchTrigger.MESSAGE, received_at=arrived) == 0
    assert dispatcher.reads == 1
    dispatcher.dispatch_pending(owner.user_id, DispatchTrigger.MESSAGE, received_at=arrived)
    assert dispatcher.reads == 2, "a wake-up that arrived before that reservation was answered by it"
