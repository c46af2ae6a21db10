"""Dispatching queued calls: a user's pending direct calls are placed, oldest first, while they have free slots;
the slots left go to their running campaigns (services/queue_processor/campaigns.py)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import sentry_sdk
from sqlalchemy import BindParameter, DateTime, Select, Uuid, bindparam, select

from services.queue_processor.campaigns import (
    CampaignDispatch,
    attempt_ended_query,
    campaign_work_due_query,
    requeued_calls_due_query,
    users_with_campaign_work_query,
)
from shared.calls import initiation, lifecycle
from shared.calls.initiation import CallPlacer
from shared.calls.store import due_pending, held_slots_query
from shared.core.db import database_unavailable
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import DIRECT_CALL, Agent, Call, User
from shared.core.uow import UnitOfWork
from shared.observability import tracing
from shared.observability.sentry import report, report_database_error

TRIGGER_SPAN_DATA = "dispatch.trigger"
NO_CREDITS_DETAIL = "The account ran out of credits while the call waited."
NO_SLOT_FOR_CAMPAIGNS = "No free slot for campaign calls"


class DispatchTrigger(StrEnum):
    """What woke the dispatcher; each dispatch's transaction carries it, so tests and Sentry can tell them apart."""

    MESSAGE = "message"  # a call.queued or slot.released message
    RETRY = "retry"  # a queued call's retry delay passed, or Bolna is back after the breaker held dispatches back
    SWEEP = "sweep"  # the backstop for a missed message
    SCHEDULE = "schedule"  # a campaign's start time, retry interval or calling window came due


def dispatchable_query(
    user_id: uuid.UUID | BindParameter[uuid.UUID],
    now: datetime | BindParameter[datetime],
    ended_call_id: uuid.UUID | None | BindParameter[uuid.UUID | None],
) -> Select[tuple[bool, bool, bool, bool, bool]]:
    """What a wake-up has to do, in one read: whether `ended_call_id` (None: no call ended) ended a campaign attempt
    still to settle, a free slot, a due direct call, campaign calls due at `now` (the campaign clock), campaign calls
    back in the queue (built apart so its plan can be tested)."""
    return select(
        attempt_ended_query(ended_call_id).exists(),
        held_slots_query(user_id).scalar_subquery() < User.max_concurrent_calls,
        select(Call.id).where(Call.user_id == user_id, due_pending()).exists(),
        campaign_work_due_query(user_id, now).exists(),
        requeued_calls_due_query(user_id).exists(),
    ).where(User.id == user_id)


# Built once: each slot.released runs it, and building it was most of a wake-up's CPU (provider_events._STORE_EVENT).
_DISPATCHABLE = dispatchable_query(
    bindparam("user_id"),
    bindparam("now", type_=DateTime(timezone=True)),
    bindparam("ended_call_id", type_=Uuid()),
)


# Built once: each reservation reads what Bolna calls its calls' agents (an ORM get per agent built its query anew).
_PROVIDER_AGENT_IDS = select(Agent.id, Agent.provider_agent_id).where(Agent.id.in_(bindparam("ids", expanding=True)))


@dataclass(frozen=True)
class _Work:
    """What a dispatch has to do; it skips the reads of what is not due."""

    direct: bool = False
    campaigns: bool = False
    requeued: bool = False
    attempt_ended: bool = False  # the call that woke it ended a campaign attempt, settled before anything else
    campaigns_without_slot: bool = False  # campaign calls are due, and the customer's limit leaves them no slot

    def __bool__(self) -> bool:
        return self.direct or self.campaigns


class ReadWatermarks:
    """For each user, when the latest read that found nothing more to dispatch for them began. Messages are
    published once what they announce has committed, so a wake-up that arrived before that moment was seen by that
    read. It remembers the most recent `users`; a user it forgot is read again, which is always safe."""

    def __init__(self, users: int = 10_000) -> None:
        self._read_at: OrderedDict[uuid.UUID, float] = OrderedDict()
        self._users = users
        self._lock = threading.Lock()

    def covers(self, user_id: uuid.UUID, received_at: float) -> bool:
        with self._lock:
            read_at = self._read_at.get(user_id)
        return read_at is not None and received_at < read_at

    def record(self, user_id: uuid.UUID, read_at: float) -> None:
        with self._lock:
            latest = self._read_at.get(user_id)
            if latest is not None and latest >= read_at:
                return  # a dispatch on another thread ended on a later read
            self._read_at[user_id] = read_at
            self._read_at.move_to_end(user_id)
            if len(self._read_at) > self._users:
                self._read_at.popitem(last=False)


def due_retries_query() -> Select[tuple[uuid.UUID]]:
    """Users with a queued call whose retry delay has passed (built apart so its plan can be tested)."""
    return select(Call.user_id).where(due_pending(), Call.next_attempt_at.is_not(None)).distinct()


class Dispatcher:
    """Reserves slots for a user's due calls in batches, under the user's lock, and places them on a pool of
    `concurrency` threads. A call is reserved only when a thread is free to place it at once, so no reservation
    waits out its short lease in a backlog."""

    def __init__(self, placer: CallPlacer, concurrency: int, campaigns: CampaignDispatch | None = None):
        self._placer = placer
        self._campaigns = campaigns or CampaignDispatch()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="dispatch")
        self._free_threads = threading.BoundedSemaphore(concurrency)
        self._concurrency = concurrency
        # Users whose dispatch the open breaker held back: no message wakes them once Bolna is back.
        self._held_back: set[uuid.UUID] = set()
        self._held_back_lock = threading.Lock()
        self._watermarks = ReadWatermarks()

    def dispatch_pending(
        self,
        user_id: uuid.UUID,
        trigger: DispatchTrigger,
        ended_call_id: uuid.UUID | None = None,
        received_at: float | None = None,
    ) -> int:
        """Reserves the user's due calls, oldest first, while they have free slots, and hands each to a placing
        thread; returns how many. It does not wait for Bolna's answers: a reservation is committed before its call
        is placed, and one whose placing never finishes (the process was killed) is settled by the reconcile job
        once its short lease runs out: linked if Bolna has it, else failed as `bolna_outcome_unknown`. The campaign
        attempt that `ended_call_id` ended is settled first (a retry, or the campaign's completion), Bolna up or not
        and a slot free or not, so the contact's next call is among those dispatched.

        `received_at` (time.monotonic()): when the wake-up asking for this dispatch arrived. One that arrived before
        the start of a read that found nothing more to do for its customer asks for nothing that read did not see:
        it is answered without a read of its own (one customer's burst of call.queued, drained by its first)."""
        if ended_call_id is None and received_at is not None and self._watermarks.covers(user_id, received_at):
            return 0
        already_read: _Work | None = None
        if ended_call_id is not None:
            read_at = time.monotonic()
            already_read = self._work_due(user_id, ended_call_id)
            if already_read.attempt_ended:
                self._settle_attempt(user_id, ended_call_id)
                already_read = None  # settling may have made the contact's retry due: read again
        dispatched = 0
        while not self._placer.provider_down:
            if already_read is None:
                read_at = time.monotonic()
            work = already_read if already_read is not None else self._work_due(user_id)
            if not work:
                if work.campaigns_without_slot:
                    _note_no_slot_for_campaigns(user_id)
                self._watermarks.record(user_id, read_at)
                break
            threads = self._take_free_threads()
            read_at = time.monotonic()  # the reservation's own read of what is left begins after this
            try:
                # It says what is due after it as well: the next batch, or the end, needs no read of its own.
                reserved, already_read = self._reserve_due(user_id, threads, work)
            except BaseException:
                self._give_back_threads(threads)
                raise
            self._give_back_threads(threads - len(reserved))
            if not reserved:
                # Bolna went down, or another dispatch took the calls. It read campaign calls only if `work` said
                # they were due: it says nothing of the rest, so it answers no other wake-up.
                break
            handed = 0
            try:
                for call, provider_agent_id in reserved:
                    self._pool.submit(self._dispatch_on_thread, call, provider_agent_id, trigger)
                    handed += 1
            finally:
                self._give_back_threads(len(reserved) - handed)  # the pool is shutting down
            dispatched += handed
        self._hold_back_while_provider_down(user_id)
        return dispatched

    def wait_until_idle(self, timeout: float) -> bool:
        """Whether every call handed to a placing thread has had its answer within `timeout` (a clean stop)."""
        deadline = time.monotonic() + timeout
        taken = 0
        while taken < self._concurrency and self._free_threads.acquire(timeout=max(0.0, deadline - time.monotonic())):
            taken += 1
        self._give_back_threads(taken)
        return taken == self._concurrency

    def settle_campaigns(self, user_id: uuid.UUID) -> None:
        """Gives the user's finished campaign attempts their results (or retries) and completes the campaigns with
        nothing left to call: the scheduler's round, for attempts whose message was lost or not yet handled."""
        with self._placer.uow_factory() as uow:
            uow.calls.lock_user(user_id)
            self._campaigns.cancel_requeued(uow, user_id)
            self._campaigns.settle(uow, user_id)
            uow.commit()

    def users_with_campaign_work(self) -> list[uuid.UUID]:
        """Users with campaign work due now: a campaign to start, a contact or a call due, an attempt to settle."""
        with self._placer.uow_factory() as uow:
            query = users_with_campaign_work_query(self._campaigns.clock())
            return list(uow.reads_only().session.scalars(query))

    def users_with_pending_calls(self) -> list[uuid.UUID]:
        """Users with a call waiting whose retry delay, if any, has passed."""
        with self._placer.uow_factory() as uow:
            return uow.calls.users_with_pending_calls()

    def users_to_retry(self) -> set[uuid.UUID]:
        """Users with a queued call whose retry delay has passed, and, once Bolna is back, those the breaker held
        back: no message announces either."""
        if self._placer.provider_down:
            return set()
        with self._placer.uow_factory() as uow:
            due_retries = set(uow.session.scalars(due_retries_query()))
        with self._held_back_lock:
            held_back, self._held_back = self._held_back, set()
        return due_retries | held_back

    def _dispatch(self, call: Call, provider_agent_id: str, trigger: DispatchTrigger) -> None:
        """Places one queued call, in the trace its request (or its campaign's start) began, in a scope of its own."""
        queue_details = _queue_details(call)
        with tracing.call_transaction(
            call.trace_headers,
            op="queue.initiate_call",
            name=f"Initiate {call.call_type} Call from Queue",
            tags=call.kind_tags,
        ) as span:
            for key, value in queue_details.items():
                span.set_data(key, value)
            span.set_data(TRIGGER_SPAN_DATA, trigger.value)
            sentry_sdk.add_breadcrumb(
                category="queue",
                message=f"Reserved {call.call_type} call slot",
                data={"call_id": str(call.id), "user_id": str(call.user_id)},
            )
            initiation.note_start(call)
            try:
                self._placer.initiate(call, provider_agent_id, retry_transient=True)
            except CallflowError as exc:
                span.set_status("internal_error")
                failure = CallflowError(
                    _queue_failure(call),
                    exc.detail,
                    sentry_contexts={**exc.sentry_contexts, "queue_details": queue_details},
                    **{**exc.tags, "campaign_id": call.campaign_id},
                )
                report(failure, cause=exc, place="queue.initiate_call")

    def _dispatch_on_thread(self, call: Call, provider_agent_id: str, trigger: DispatchTrigger) -> None:
        try:
            with sentry_sdk.isolation_scope() as scope:
                for key, value in call.kind_tags.items():  # on the failures reported below as well
                    scope.set_tag(key, value)
                self._dispatch_in_scope(call, provider_agent_id, trigger)
        finally:
            self._free_threads.release()
        self._hold_back_while_provider_down(call.user_id)

    def _dispatch_in_scope(self, call: Call, provider_agent_id: str, trigger: DispatchTrigger) -> None:
        try:
            self._dispatch(call, provider_agent_id, trigger)
        except Exception as exc:
            if database_unavailable(exc):  # the call keeps its reservation; its lease or the reconcile job settles it
                report_database_error(exc, place="queue.initiate_call")
                return
            report(
                CallflowError(
                    _queue_failure(call),
                    f"Placing a queued call failed: {type(exc).__name__}",
                    sentry_contexts={"queue_details": _queue_details(call)},
                    call_id=call.id,
                    user_id=call.user_id,
                    campaign_id=call.campaign_id,
                ),
                cause=exc,
                place="queue.initiate_call",
            )

    def _hold_back_while_provider_down(self, user_id: uuid.UUID) -> None:
        if self._placer.provider_down:
            with self._held_back_lock:
                self._held_back.add(user_id)

    def _take_free_threads(self) -> int:
        """Waits for one free placing thread, then takes every other one that is free now."""
        self._free_threads.acquire()
        taken = 1
        while taken < self._concurrency and self._free_threads.acquire(blocking=False):
            taken += 1
        return taken

    def _give_back_threads(self, count: int) -> None:
        for _ in range(count):
            self._free_threads.release()

    def _settle_attempt(self, user_id: uuid.UUID, call_id: uuid.UUID) -> None:
        """Settles the campaign attempt `call_id` ended (the wake-up's unlocked read found it), under the user's
        lock."""
        with self._placer.uow_factory() as uow:
            uow.calls.lock_user(user_id)
            self._campaigns.settle(uow, user_id, call_id)
            uow.commit()

    def _work_due(self, user_id: uuid.UUID, ended_call_id: uuid.UUID | None = None) -> _Work:
        """One unlocked read: whether `ended_call_id` ended a campaign attempt, whether the user has a free slot,
        and what for. A wake-up for calls already placed (a burst of messages drained by the first), or for the
        freed slot of a direct call, costs no more than this."""
        with self._placer.uow_factory() as uow:
            return self._read_work(uow.reads_only(), user_id, ended_call_id)

    def _read_work(self, uow: UnitOfWork, user_id: uuid.UUID, ended_call_id: uuid.UUID | None = None) -> _Work:
        parameters = {"user_id": user_id, "now": self._campaigns.clock(), "ended_call_id": ended_call_id}
        row = uow.session.execute(_DISPATCHABLE, parameters).first()
        if row is None:
            return _Work()
        attempt_ended, free, direct, campaigns, requeued = row
        if not free:
            return _Work(attempt_ended=attempt_ended, campaigns_without_slot=campaigns)
        return _Work(direct=direct, campaigns=campaigns, requeued=requeued, attempt_ended=attempt_ended)

    def _reserve_due(self, user_id: uuid.UUID, most: int, work: _Work) -> tuple[list[tuple[Call, str]], _Work]:
        """Up to `most` calls, each holding a slot now, with its agent's id at Bolna: the user's due direct calls
        first, oldest first, then their campaigns' calls; and what is due after them, read under the same lock
        (`_work_due`'s read, which sees the reservation). Direct calls that waited while the account ran out of
        credits fail instead, and the campaigns pause."""
        with self._placer.uow_factory() as uow:
            user = uow.calls.lock_user(user_id)
            if user.credits <= 0:
                # They must not be placed, and they must not wait forever.
                for call in uow.calls.due_calls(user_id, None):
                    lifecycle.fail(call, ErrorType.INSUFFICIENT_CREDITS, NO_CREDITS_DETAIL)
                self._campaigns.pause_for_credits(uow, user_id)
                uow.commit()
                return [], _Work()
            free = min(most, lifecycle.free_slots(uow.calls, user))
            # Read under the lock whatever `work` said: a direct call queued while this dispatch waited for a placing
            # thread still goes before any campaign call.
            candidates = uow.calls.due_calls(user_id, free) if free > 0 else []
            picked: list[Call] = []
            # Campaign calls get only what is left of both the free slots and the free placing threads.
            if work.campaigns and free > len(candidates) and not self._placer.provider_down:
                picked = self._campaigns.pick(uow, user, free - len(candidates), requeued=work.requeued)
            reserved = self._placer.reserve_slots(uow.calls, free, candidates + picked)
            uow.session.add_all(call for call in picked if call not in uow.session)
            agent_ids = list({call.agent_id for call in reserved})
            agents = uow.session.execute(_PROVIDER_AGENT_IDS, {"ids": agent_ids}) if agent_ids else []
            provider_ids = {agent_id: provider_agent_id for agent_id, provider_agent_id in agents}
            placing = [(call, provider_ids[call.agent_id] or "") for call in reserved]
            left = self._read_work(uow, user_id) if reserved else _Work()
            uow.commit()
        return placing, left


def _note_no_slot_for_campaigns(user_id: uuid.UUID) -> None:
    """The customer's own limit holds their campaign calls back: not a failure, so never an event, but a breadcrumb
    for whatever is reported next."""
    sentry_sdk.add_breadcrumb(
        category="queue", message=NO_SLOT_FOR_CAMPAIGNS, level="info", data={"user_id": str(user_id)}
    )


def _queue_failure(call: Call) -> ErrorType:
    return (
        ErrorType.DIRECT_CALL_QUEUE_FAILURE if call.call_type == DIRECT_CALL else ErrorType.CAMPAIGN_CALL_QUEUE_FAILURE
    )


def _queue_details(call: Call) -> dict[str, object]:
    """The seed's queue context: which queued call, whose, of which campaign and contact."""
    return {
        "queue_id": str(call.id),
        "user_id": str(call.user_id),
        "agent_id": str(call.agent_id),
        "contact_id": call.contact_id,
        "campaign_id": str(call.campaign_id) if call.campaign_id else None,
        "call_type": call.call_type,
        "call_id": str(call.id),
        # Lower goes first: a customer's direct calls before their campaigns' calls.
        "priority": 0 if call.call_type == DIRECT_CALL else 1,
    }
