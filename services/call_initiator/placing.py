"""Accepting a call on the API: checked, recorded, and placed at once when a slot is free (201), else queued (202)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import BindParameter, Select, bindparam, func, select
from sqlalchemy.exc import DBAPIError

from services.call_initiator.idempotency import Claim, claim_key
from services.call_initiator.request_models import PlaceCallRequest
from shared.calls import initiation, lifecycle, statuses
from shared.calls.initiation import CallPlacer
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Agent, Call, User
from shared.observability import tracing
from shared.observability.sentry import report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AcceptedCall:
    call: Call
    # True: Bolna named its execution (201). False (202): it waits in Callflow's queue, or Bolna's answer was lost and
    # it waits for Bolna's word (status `initiating`).
    placed: bool


def place_call(
    placer: CallPlacer, user: User, request: PlaceCallRequest, idempotency: Claim | None = None
) -> AcceptedCall:
    # The call gets its id before any check, so a refused request's report names the call it would have been.
    call = Call(
        id=uuid.uuid4(),
        user_id=user.id,
        agent_id=request.agent_id,
        phone_number=request.phone_number,
        call_metadata=request.metadata,
        status=statuses.PENDING,
        trace_headers=tracing.current_trace_headers(),
    )
    initiation.note_start(call)
    tags = {"user_id": user.id, "agent_id": request.agent_id}

    def refused(error_type: ErrorType, detail: str) -> CallflowError:
        return CallflowError(
            error_type, detail, sentry_contexts={"call_details": initiation.call_details(call)}, **tags
        )

    with placer.uow_factory() as uow:
        # One round trip: the customer, locked (slots are taken under this lock), the agent asked for, and the
        # transaction's now(), so the call's slot times are values and its INSERT a cached statement.
        locked_user, agent, now = uow.session.execute(
            _USER_AND_AGENT, {"user_id": user.id, "agent_id": request.agent_id}
        ).one()
        uow.calls.note_now(now)
        if agent is None:
            raise refused(ErrorType.AGENT_NOT_FOUND, f"Agent {request.agent_id} does not exist.")
        if agent.user_id != user.id:
            raise refused(ErrorType.UNAUTHORIZED_AGENT_ACCESS, "The agent belongs to another user.")
        if not agent.provider_agent_id:
            raise refused(ErrorType.AGENT_NOT_CONFIGURED, "The agent has no provider agent id configured.")
        if locked_user.credits <= 0:
            raise refused(ErrorType.INSUFFICIENT_CREDITS, "The account has no credits left.")
        # Decided before the call joins the session: it is inserted once, already holding its slot or queued.
        reserved = placer.reserve_slot(uow.calls, locked_user, call, behind_queue=True)
        if not reserved:
            lifecycle.queue(call)
        uow.session.add(call)
        if idempotency is not None:
            claim_key(uow.session, idempotency, call.id)
        uow.commit()
    if not reserved:
        report(CallflowError(ErrorType.CONCURRENCY_LIMIT, "Call queued until a slot frees.", call_id=call.id, **tags))
        return AcceptedCall(call, placed=False)
    placed = placer.initiate(call, agent.provider_agent_id, retry_transient=False)
    if placed is None:  # back in the queue (Bolna down, or its key refused), or waiting for Bolna's word
        try:
            with placer.uow_factory() as uow:
                return AcceptedCall(uow.session.get_one(Call, call.id), placed=False)
        except DBAPIError:  # Bolna may be dialling: the answer must name the call, lest a client place it again
            log.warning("reading call %s back failed; answered as reserved", call.id, exc_info=True)
            return AcceptedCall(call, placed=False)
    return AcceptedCall(placed, placed=True)


def user_and_agent_query(
    user_id: uuid.UUID | BindParameter[uuid.UUID], agent_id: uuid.UUID | BindParameter[uuid.UUID]
) -> Select[tuple[User, Agent | None, datetime]]:
    """The user, locked, the agent with this id whoever owns it (None when there is none), and the transaction's
    now() (`SqlCallStore.now`)."""
    return (
        select(User, Agent, func.now())
        .join(Agent, Agent.id == agent_id, isouter=True)
        .where(User.id == user_id)
        .with_for_update(of=User, key_share=True)  # as SqlCallStore.lock_user
    )


# Built once: every call accepted runs it (see shared/calls/provider_events.py, _STORE_EVENT).
_USER_AND_AGENT = user_and_agent_query(bindparam("user_id"), bindparam("agent_id"))
