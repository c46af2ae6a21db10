"""Dispatching queued calls: a user's pending calls are placed, oldest first, while they have free slots."""

from __future__ import annotations

import uuid

import sentry_sdk

from shared.calls import lifecycle
from shared.calls.initiation import CallPlacer
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Call
from shared.observability import tracing
from shared.observability.sentry import report

DIRECT = "direct"


class Dispatcher:
    def __init__(self, placer: CallPlacer):
        self._placer = placer

    def dispatch_pending(self, user_id: uuid.UUID) -> int:
        """Places the user's pending calls, oldest first, while they have free slots. Returns how many."""
        dispatched = 0
        while (call := self._reserve_next_pending(user_id)) is not None:
            self._dispatch(call)
            dispatched += 1
        return dispatched

    def users_with_pending_calls(self) -> list[uuid.UUID]:
        """Users with a call waiting whose retry delay, if any, has passed."""
        with self._placer.uow_factory() as uow:
            return uow.calls.users_with_pending_calls()

    def _dispatch(self, call: Call) -> None:
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
