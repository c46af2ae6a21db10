"""The call path: accepting a call, placing it with Bolna when a slot is free, and dispatching queued calls.

The API and the queue-processor share `initiate`, so a call is placed (and reported) the same way whichever
path it took.
"""

from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sentry_sdk
from sqlalchemy import func, select

from shared import slots, statuses, tracing, webhooks
from shared.bolna import BolnaError, PlacedCall, get_bolna_client
from shared.config import get_settings
from shared.errors import CallflowError, ErrorType
from shared.idempotency import Claim
from shared.idempotency import claim as claim_key
from shared.messaging import MessageType
from shared.models import Agent, Call, User
from shared.observability import report
from shared.payloads import CONTEXT_CALL_ID_KEY, PlaceCallRequest
from shared.scrubbing import mask_phone
from shared.uow import UnitOfWork

log = logging.getLogger(__name__)

DIRECT = "direct"
MAX_RETRY_DELAY_SECONDS = 300


@dataclass(frozen=True)
class AcceptedCall:
    call: Call
    placed: bool  # True: the provider has it (201); False: it waits in Callflow's queue (202)


def place_call(user: User, request: PlaceCallRequest, idempotency: Claim | None = None) -> AcceptedCall:
    with UnitOfWork() as uow:
        agent = uow.session.get(Agent, request.agent_id)
        ids = {"user_id": user.id, "agent_id": request.agent_id}
        if agent is None:
            raise CallflowError(ErrorType.AGENT_NOT_FOUND, f"Agent {request.agent_id} does not exist.", **ids)
        if agent.user_id != user.id:
            raise CallflowError(ErrorType.UNAUTHORIZED_AGENT_ACCESS, "The agent belongs to another user.", **ids)
        if not agent.provider_agent_id:
            raise CallflowError(ErrorType.AGENT_NOT_CONFIGURED, "The agent has no provider agent id configured.", **ids)
        locked_user = slots.lock_user(uow.session, user.id)
        if locked_user.credits <= 0:
            raise CallflowError(ErrorType.INSUFFICIENT_CREDITS, "The account has no credits left.", **ids)
        call = Call(
            user_id=user.id,
            agent_id=agent.id,
            phone_number=request.phone_number,
            call_metadata=request.metadata,
            status=statuses.PENDING,
            trace_headers=tracing.current_trace_headers(),
        )
        uow.session.add(call)
        uow.session.flush()
        if idempotency is not None:
            claim_key(uow.session, idempotency, call.id)
        # While Bolna is known to be down, new calls wait in the queue instead of failing.
        provider_down = get_bolna_client().breaker.is_open
        reserved = not provider_down and slots.try_reserve(uow.session, locked_user, call, behind_queue=True)
        if not reserved:
            uow.emit(MessageType.CALL_QUEUED, {"user_id": str(user.id), "call_id": str(call.id)})
        uow.commit()
    if not reserved:
        report(CallflowError(ErrorType.CONCURRENCY_LIMIT, "Call queued until a slot frees.", call_id=call.id, **ids))
        return AcceptedCall(call, placed=False)
    placed = initiate(call.id, retry_transient=False)
    if placed is None:  # the breaker held the request back: the call went back to the queue
        with UnitOfWork() as uow:
            return AcceptedCall(uow.session.get_one(Call, call.id), placed=False)
    return AcceptedCall(placed, placed=True)


def initiate(call_id: uuid.UUID, retry_transient: bool) -> Call | None:
    """Asks Bolna to place a call that holds a slot; returns the call, or None when it went back to the queue.

    The slot is always released on failure. A request the breaker held back puts the call back to pending; so
    does a transient failure when `retry_transient` (the queue path), until the attempts run out. Any other
    failure fails the call.
    """
    with UnitOfWork() as uow:
        call = uow.session.get_one(Call, call_id)
        agent = uow.session.get_one(Agent, call.agent_id)
    ids = {"call_id": call.id, "user_id": call.user_id, "agent_id": call.agent_id}
    contexts: dict[str, dict[str, object]] = {"call_details": call_details(call)}
    user_data: dict[str, Any] = {**call.call_metadata, CONTEXT_CALL_ID_KEY: str(call.id)}
    with sentry_sdk.start_span(op="call.initiate", name="Initiate Call") as span:
        span.set_data("call_id", str(call.id))
        sentry_sdk.add_breadcrumb(category="call", message="Starting call initiation", data={"call_id": str(call.id)})
        sentry_sdk.add_breadcrumb(category="bolna", message="Calling Bolna.ai API", data={"endpoint": "/call"})
        try:
            placed = get_bolna_client().place_call(agent.provider_agent_id or "", call.phone_number, user_data)
        except BolnaError as exc:
            span.set_status("internal_error")
            if (not exc.sent or (retry_transient and exc.transient)) and _requeue(call_id, exc):
                sentry_sdk.add_breadcrumb(category="bolna", message="Bolna unavailable; call back in the queue")
                return None
            _fail(call_id, ErrorType.BOLNA_API_FAILURE, str(exc))
            contexts["bolna_api"] = {
                "endpoint": exc.endpoint,
                "status_code": exc.status_code,
                "error_message": exc.message,
                "duration_ms": exc.duration_ms,
            }
            raise _with_call_id(CallflowError(ErrorType.BOLNA_API_FAILURE, str(exc), contexts=contexts, **ids)) from exc
        sentry_sdk.add_breadcrumb(
            category="bolna",
            message="Bolna.ai call successful",
            data={"execution_id": placed.execution_id, "duration_ms": placed.duration_ms},
        )
        try:
            return link_execution(call_id, placed)
        except Exception as exc:
            # Bolna is calling, but Callflow could not record it: its webhooks still link it by our call id.
            span.set_status("internal_error")
            contexts["bolna_api"] = {"endpoint": "/call", "status_code": 200, "execution_id": placed.execution_id}
            raise _with_call_id(
                CallflowError(
                    ErrorType.CALL_INITIATION_FAILED,
                    f"Bolna accepted the call but recording it failed: {type(exc).__name__}",
                    contexts=contexts,
                    execution_id=placed.execution_id,
                    **ids,
                )
            ) from exc


def _with_call_id(error: CallflowError) -> CallflowError:
    error.problem_extras = {"callId": str(error.context["call_id"])}  # the client can look the call up
    return error


def call_details(call: Call) -> dict[str, object]:
    return {
        "userId": str(call.user_id),
        "agentId": str(call.agent_id),
        "callId": str(call.id),
        "phone": mask_phone(call.phone_number),
    }


def link_execution(call_id: uuid.UUID, placed: PlacedCall) -> Call:
    with UnitOfWork() as uow:
        call = slots.lock_call(uow.session, call_id)
        call.execution_id = placed.execution_id
        if statuses.moves_forward(call.status, placed.status):
            call.status = placed.status
        # Bolna can post webhooks before its answer reaches us: apply what was kept for this execution.
        webhooks.apply_kept_events(uow, call)
        uow.commit()
    return call


def _requeue(call_id: uuid.UUID, error: BolnaError) -> bool:
    """Puts the call back to pending with a growing delay; False once its attempts are used up."""
    with UnitOfWork() as uow:
        call = slots.lock_call(uow.session, call_id)
        if error.sent:
            if call.dispatch_attempts + 1 >= get_settings().dispatch_max_attempts:
                return False
            call.dispatch_attempts += 1
        delay = error.retry_after_seconds
        if delay is None:
            delay = min(MAX_RETRY_DELAY_SECONDS, 2**call.dispatch_attempts) + random.uniform(0, 1)
        slots.release(uow, call)
        call.status = statuses.PENDING
        call.next_attempt_at = func.now() + timedelta(seconds=delay)
        call.error_detail = str(error)[:2000]
        uow.commit()
    log.warning("call %s back in the queue for %.1fs: %s", call_id, delay, error)
    return True


def _fail(call_id: uuid.UUID, error_type: ErrorType, detail: str) -> None:
    with UnitOfWork() as uow:
        slots.fail_call(uow, slots.lock_call(uow.session, call_id), error_type, detail)
        uow.commit()


def dispatch_pending(user_id: uuid.UUID) -> int:
    """Places the user's pending calls, oldest first, while they have free slots. Returns how many."""
    dispatched = 0
    while (call := _reserve_next_pending(user_id)) is not None:
        _dispatch(call)
        dispatched += 1
    return dispatched


def _dispatch(call: Call) -> None:
    """Places one queued call, in the trace its request started and a scope of its own."""
    queue_details = {
        "queue_id": str(call.id),
        "user_id": str(call.user_id),
        "call_type": DIRECT,
        "campaign_id": None,
        "priority": 0,
    }
    with tracing.call_transaction(call.trace_headers, op="queue.initiate_call", name="Dispatch Queued Call") as span:
        for key, value in queue_details.items():
            span.set_data(key, value)
        sentry_sdk.add_breadcrumb(category="queue", message=f"Reserved {DIRECT} call slot", data=queue_details)
        try:
            initiate(call.id, retry_transient=True)
        except CallflowError as exc:
            span.set_status("internal_error")
            failure = CallflowError(
                ErrorType.DIRECT_CALL_QUEUE_FAILURE,
                exc.detail,
                contexts={**exc.contexts, "queue_details": queue_details},
                **exc.context,
            )
            report(failure, cause=exc, place="queue.initiate_call")


def _reserve_next_pending(user_id: uuid.UUID) -> Call | None:
    while not get_bolna_client().breaker.is_open:
        with UnitOfWork() as uow:
            user = slots.lock_user(uow.session, user_id)
            call = uow.session.scalar(
                select(Call)
                .where(Call.user_id == user_id, slots.due_pending())
                .order_by(Call.created_at, Call.id)
                .limit(1)
                .with_for_update()
            )
            if call is None:
                return None
            if user.credits <= 0:
                # Credits ran out while it waited: it must not be placed, and it must not wait forever.
                detail = "The account ran out of credits while the call waited."
                slots.fail_call(uow, call, ErrorType.INSUFFICIENT_CREDITS, detail)
                uow.commit()
                continue
            if not slots.try_reserve(uow.session, user, call, behind_queue=False):
                return None
            uow.commit()
            return call
    return None


def users_with_pending_calls() -> list[uuid.UUID]:
    """Users with a call waiting whose retry delay, if any, has passed."""
    with UnitOfWork() as uow:
        return list(uow.session.scalars(select(Call.user_id).where(slots.due_pending()).distinct()))


def get_call(user: User, call_id: str) -> Call:
    try:
        parsed = uuid.UUID(call_id)
    except ValueError:
        parsed = None
    with UnitOfWork() as uow:
        call = uow.session.get(Call, parsed) if parsed else None
    if call is not None and call.user_id != user.id:
        # Reported as a security event, but answered exactly like a missing call: its existence is not disclosed.
        report(
            CallflowError(
                ErrorType.UNAUTHORIZED_CALL_ACCESS,
                "A user asked for another user's call.",
                user_id=user.id,
                call_id=call.id,
            )
        )
        call = None
    if call is None:
        raise CallflowError(ErrorType.CALL_NOT_FOUND, f"No call {call_id}.", user_id=user.id)
    return call


def call_view(call: Call) -> dict[str, Any]:
    return {
        "callId": str(call.id),
        "status": call.status,
        "executionId": call.execution_id,
        "agentId": str(call.agent_id),
        "phoneNumber": call.phone_number,
        "durationSeconds": call.duration_seconds,
        "creditsCharged": call.credits_charged,
        "transcript": call.transcript,
        "recordingUrl": call.recording_url,
        "errorType": call.error_type,
        "traceId": tracing.trace_id_of(call.trace_headers),
        "createdAt": call.created_at.isoformat(),
        "updatedAt": call.updated_at.isoformat(),
    }
