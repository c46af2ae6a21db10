"""Dispatching queued calls: a user's pending calls are placed, oldest first, while they have free slots."""

from __future__ import annotations

import threading
import uuid
from enum import StrEnum

import sentry_sdk
from sqlalchemy import Select, select

from shared.calls import lifecycle
from shared.calls.initiation import CallPlacer
from shared.calls.store import due_pending
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Call
from shared.observability import tracing
from shared.observability.sentry import report

DIRECT = "direct"
TRIGGER_SPAN_DATA = "dispatch.trigger"


class DispatchTrigger(StrEnum):
    """What woke the dispatcher; each dispatch's transaction carries it, so tests and Sentry can tell them apart."""

    MESSAGE = "message"  # a call.queued or slot.released message
    RETRY = "retry"  # a queued call's retry delay passed, or Bolna is back after the breaker held dispatches back
    SWEEP = "sweep"  # the backstop for a missed message


def due_retries_query() -> Select[tuple[uuid.UUID]]:
    """Users with a queued call whose retry delay has passed (built apart so its plan can be tested)."""
    return select(Call.user_id).where(due_pending(), Call.next_attempt_at.is_not(None)).distinct()


class Dispatcher:
    def __init__(self, placer: CallPlacer):
        self._placer = placer
        # Users whose dispatch the open breaker held back: no message wakes them once Bolna is back.
        self._held_back: set[uuid.UUID] = set()
        self._held_back_lock = threading.Lock()

    def dispatch_pending(self, user_id: uuid.UUID, trigger: DispatchTrigger) -> int:
        """Places the user's pending calls, oldest first, while they have free slots. Returns how many."""
        dispatched = 0
        while (call := self._reserve_next_pending(user_id)) is not None:
            self._dispatch(call, trigger)
            dispatched += 1
        if self._placer.provider_down:
            with self._held_back_lock:
                self._held_back.add(user_id)
        return dispatched

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

    def _dispatch(self, call: Call, trigger: DispatchTrigger) -> None:
        """Places one queued call, in the trace its request started and a scope of its own."""
        queue_details = {
            "queue_id": str(call.id),
            "user_id": str(call.user_id),
            "call_type": DIRECT,
            "campaign_id": None,
            "priority": 0,
        }
        trace = call.trace_headers
        with tracing.call_transaction(trace, op="queue.initiate_call", name="Dispatch Queued Call") as span:
            for key, value in queue_details.items():
                span.set_data(key, value)
            span.set_data(TRIGGER_SPAN_DATA, trigger.value)
            sentry_sdk.add_breadcrumb(category="queue", message=f"Reserved {DIRECT} call slot", data=queue_details)
            try:
                self._placer.initiate(call.id, retry_transient=True)
            except CallflowError as exc:
                span.set_status("internal_error")
                failure = CallflowError(
                    ErrorType.DIRECT_CALL_QUEUE_FAILURE,
                    exc.detail,
                    sentry_contexts={**exc.sentry_contexts, "queue_details": queue_details},
                    **exc.tags,
                )
                report(failure, cause=exc, place="queue.initiate_call")

    def _reserve_next_pending(self, user_id: uuid.UUID) -> Call | None:
        while not self._placer.provider_down:
            with self._placer.uow_factory() as uow:
                user = uow.calls.lock_user(user_id)
                call = uow.calls.next_due_pending(user_id)
                if call is None:
                    return None
                if user.credits <= 0:
                    # Credits ran out while it waited: it must not be placed, and it must not wait forever.
                    detail = "The account ran out of credits while the call waited."
                    lifecycle.fail(call, ErrorType.INSUFFICIENT_CREDITS, detail)
                    uow.commit()
                    continue
                if not self._placer.reserve_slot(uow.calls, user, call, behind_queue=False):
                    return None
                uow.commit()
                return call
        return None
