"""Leaked slots: a slot whose lease ran out is reconciled with Bolna's own record of the call.

A lease ends when the call should long be over (the longest call plus a margin). Bolna's final state is applied
like a webhook; a call Bolna still reports as live keeps its slot for another lease, up to a cap; a call Bolna
does not know (or that never reached it) is failed with `slot_lease_expired` and its slot released. While Bolna
cannot be asked, nothing is guessed: the next round asks again.
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select

from shared.bolna.client import BolnaClient, BolnaError
from shared.calls import lifecycle, provider_events, statuses
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Call
from shared.core.uow import UnitOfWorkFactory
from shared.observability import tracing
from shared.observability.sentry import report

log = logging.getLogger(__name__)

MAX_LEASES = 3  # a call Bolna still calls live after this many leases is treated as leaked


class LeaseReconciler:
    def __init__(self, uow_factory: UnitOfWorkFactory, bolna: BolnaClient, lease_seconds: int):
        self._uow = uow_factory
        self._bolna = bolna
        self._lease_seconds = lease_seconds

    def reconcile_expired_leases(self, limit: int = 100) -> int:
        with self._uow() as uow:
            expired = uow.session.scalars(
                select(Call)
                .where(Call.slot_held.is_(True), Call.slot_lease_expires_at < func.now())
                .order_by(Call.slot_lease_expires_at)
                .limit(limit)
            ).all()
        for call in expired:
            with tracing.call_transaction(call.trace_headers, op="slot.reconcile", name="Reconcile Expired Slot"):
                self._reconcile(call)
        return len(expired)

    def _reconcile(self, call: Call) -> None:
        execution = None
        if call.execution_id:
            try:
                execution = self._bolna.get_execution(call.execution_id)
            except BolnaError as exc:
                if exc.transient:
                    log.warning("lease of call %s expired; Bolna cannot be asked now: %s", call.id, exc)
                    return
                log.warning("lease of call %s expired; Bolna does not know it: %s", call.id, exc)
        status = (execution or {}).get("status")
        if status in statuses.RELEASES_SLOT:
            # Bolna's final word, applied exactly like its webhook would have been.
            provider_events.ingest(self._uow, execution)
            return
        if status in statuses.PROVIDER_STATUSES and self._extend_lease(call):
            return
        self._expire(call, status)

    def _extend_lease(self, call: Call) -> bool:
        with self._uow() as uow:
            locked = uow.calls.lock_call(call.id)
            now = uow.session.scalar(select(func.now()))
            if not lifecycle.extend_lease(uow.calls, locked, now, self._lease_seconds, MAX_LEASES):
                return False
            uow.commit()
        log.info("call %s is still live at Bolna: lease extended", call.id)
        return True

    def _expire(self, call: Call, provider_status: str | None) -> None:
        with self._uow() as uow:
            locked = uow.calls.lock_call(call.id)
            if not locked.slot_held:
                return
            detail = f"Slot lease expired; Bolna reports {provider_status or 'nothing'} for the call."
            lifecycle.fail(locked, ErrorType.SLOT_LEASE_EXPIRED, detail)
            uow.commit()
        report(
            CallflowError(
                ErrorType.SLOT_LEASE_EXPIRED,
                f"Call {call.id} held its slot past its lease; released (Bolna: {provider_status or 'unknown'}).",
                sentry_contexts={
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
