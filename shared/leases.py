"""Leaked slots: a slot whose lease ran out is reconciled with Bolna's own record of the call.

A lease ends when the call should long be over (the longest call plus a margin). Bolna's final state is applied
like a webhook; a call Bolna still reports as live keeps its slot for another lease, up to a cap; a call Bolna
does not know (or that never reached it) is failed with `slot_lease_expired` and its slot released. While Bolna
cannot be asked, nothing is guessed: the next round asks again.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import func, select

from shared import slots, statuses, tracing, webhooks
from shared.bolna import BolnaError, get_bolna_client
from shared.config import get_settings
from shared.errors import CallflowError, ErrorType
from shared.models import Call
from shared.observability import report
from shared.uow import UnitOfWork

log = logging.getLogger(__name__)

MAX_LEASES = 3  # a call Bolna still calls live after this many leases is treated as leaked


def reconcile_expired_leases(limit: int = 100) -> int:
    with UnitOfWork() as uow:
        expired = uow.session.scalars(
            select(Call)
            .where(Call.slot_held.is_(True), Call.slot_lease_expires_at < func.now())
            .order_by(Call.slot_lease_expires_at)
            .limit(limit)
        ).all()
    for call in expired:
        with tracing.call_transaction(call.trace_headers, op="slot.reconcile", name="Reconcile Expired Slot"):
            _reconcile(call)
    return len(expired)


def _reconcile(call: Call) -> None:
    execution = None
    if call.execution_id:
        try:
            execution = get_bolna_client().get_execution(call.execution_id)
        except BolnaError as exc:
            if exc.transient:
                log.warning("lease of call %s expired; Bolna cannot be asked now: %s", call.id, exc)
                return
            log.warning("lease of call %s expired; Bolna does not know it: %s", call.id, exc)
    status = (execution or {}).get("status")
    if status in statuses.RELEASES_SLOT:
        webhooks.ingest(execution)  # Bolna's final word, applied exactly like its webhook would have been
        return
    lease = timedelta(seconds=get_settings().slot_lease_seconds)
    if status in statuses.PROVIDER_STATUSES and _extend_lease(call, lease):
        return
    _expire(call, status)


def _extend_lease(call: Call, lease: timedelta) -> bool:
    with UnitOfWork() as uow:
        locked = slots.lock_call(uow.session, call.id)
        if not locked.slot_held or locked.created_at < uow.session.scalar(select(func.now())) - MAX_LEASES * lease:
            return False
        locked.slot_lease_expires_at = func.now() + lease
        uow.commit()
    log.info("call %s is still live at Bolna: lease extended", call.id)
    return True


def _expire(call: Call, provider_status: str | None) -> None:
    with UnitOfWork() as uow:
        locked = slots.lock_call(uow.session, call.id)
        if not locked.slot_held:
            return
        detail = f"Slot lease expired; Bolna reports {provider_status or 'nothing'} for the call."
        slots.fail_call(uow, locked, ErrorType.SLOT_LEASE_EXPIRED, detail)
        uow.commit()
    report(
        CallflowError(
            ErrorType.SLOT_LEASE_EXPIRED,
            f"Call {call.id} held its slot past its lease; released (Bolna: {provider_status or 'unknown'}).",
            contexts={
                "slot_details": {
                    "call_id": str(call.id),
                    "execution_id": call.execution_id,
                    "provider_status": provider_status,
                }
            },
            call_id=call.id,
            user_id=call.user_id,
            agent_id=call.agent_id,
            execution_id=call.execution_id,
        ),
        place="slot.reconcile",
    )
