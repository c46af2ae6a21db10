"""Reconciling calls with Bolna's own record when Bolna has gone quiet about them.

Two kinds of call are looked up, each on its own, so one bad row never holds up the rest:

- **Unconfirmed**: a call holding a slot whose `POST /call` never got a definite answer (its short initiating
  lease ran out with no execution id). Bolna may be dialling it, so it is never redialled: the agent's executions
  around the time it was sent are searched for the call id Callflow put in `user_data`. Found, it is linked and
  applied like a webhook. Not found within `OUTCOME_UNKNOWN_AFTER_SECONDS`, it fails with `bolna_outcome_unknown`
  and its slot is released; a webhook that still comes later overrules that.
- **Silent**: a live call with an execution id that Bolna has said nothing about for `RECONCILE_AFTER_SECONDS`
  (a lost webhook, a lost `completed`), or whose slot lease ran out. `GET /executions/{id}` is applied exactly
  like a webhook (same dedupe, ordering and single charge). A call Bolna still reports live past its lease keeps
  its slot for another lease, up to a cap; one Bolna does not know fails with `slot_lease_expired`.

While Bolna cannot be asked, nothing is guessed: the next round asks again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, func, or_, select

from shared.bolna.client import BolnaClient, BolnaError
from shared.bolna.execution import AgentExecution
from shared.calls import lifecycle, provider_events, statuses
from shared.calls.store import live_calls
from shared.core.config import Settings
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Agent, Call
from shared.core.storable import storable
from shared.core.uow import UnitOfWorkFactory
from shared.observability import tracing
from shared.observability.sentry import report

log = logging.getLogger(__name__)

MAX_LEASES = 3  # a call Bolna still calls live after this many leases is treated as leaked
SEARCH_MARGIN = timedelta(minutes=1)  # clocks differ: Bolna's created_at may fall a little outside ours
BATCH = 100  # calls looked at per round, per kind

T = TypeVar("T")


@dataclass(frozen=True)
class ReconcileBounds:
    reconcile_after: timedelta  # a live call Bolna is quiet about for this long is looked up
    outcome_unknown_after: timedelta  # an unconfirmed call nobody found for this long is given up
    search_every: timedelta  # an unconfirmed call is searched for at most this often (its short lease)
    longest_request: timedelta  # a POST /call reaches Bolna within this long of the slot being taken

    @classmethod
    def from_settings(cls, settings: Settings) -> ReconcileBounds:
        return cls(
            reconcile_after=timedelta(seconds=settings.reconcile_after_seconds),
            outcome_unknown_after=timedelta(seconds=settings.outcome_unknown_after_seconds),
            search_every=timedelta(seconds=settings.initiating_lease_seconds),
            longest_request=timedelta(seconds=settings.bolna_connect_timeout_seconds + settings.bolna_timeout_seconds),
        )


# The two rounds' statements, built apart so tests/integration/test_query_plans.py can EXPLAIN them. A held slot is
# `slot_held`, never `slot_held IS true`: PostgreSQL matches only the former to the lease index over held slots.


def unconfirmed_calls_query(bounds: ReconcileBounds) -> Select[tuple[uuid.UUID]]:
    return (
        select(Call.id)
        .where(
            Call.slot_held,
            Call.slot_lease_expires_at < func.now(),
            Call.execution_id.is_(None),
            or_(Call.provider_checked_at.is_(None), Call.provider_checked_at < func.now() - bounds.search_every),
        )
        .order_by(Call.provider_checked_at.nulls_first())
        .limit(BATCH)
    )


def silent_calls_query(bounds: ReconcileBounds) -> Select[tuple[uuid.UUID]]:
    return (
        select(Call.id)
        .where(
            live_calls(),
            Call.execution_id.is_not(None),
            or_(
                Call.provider_checked_at.is_(None),
                Call.provider_checked_at < func.now() - bounds.reconcile_after,
                Call.slot_held & (Call.slot_lease_expires_at < func.now()),
            ),
        )
        .order_by(Call.provider_checked_at.nulls_first())
        .limit(BATCH)
    )


class ProviderReconciler:
    def __init__(self, uow_factory: UnitOfWorkFactory, bolna: BolnaClient, bounds: ReconcileBounds):
        self._uow = uow_factory
        self._bolna = bolna
        self._bounds = bounds

    def unconfirmed_calls(self) -> list[uuid.UUID]:
        """Calls holding a slot whose short lease ran out before Bolna named their execution, not searched for
        lately (each search is marked on the call, so the calls take turns)."""
        with self._uow() as uow:
            return list(uow.session.scalars(unconfirmed_calls_query(self._bounds)))

    def silent_calls(self) -> list[uuid.UUID]:
        """Live calls with an execution that Bolna has been quiet about, or whose slot lease ran out."""
        with self._uow() as uow:
            return list(uow.session.scalars(silent_calls_query(self._bounds)))

    def settle_unconfirmed(self, call_id: uuid.UUID) -> None:
        with self._uow() as uow:
            call = uow.session.get_one(Call, call_id)
            agent = uow.session.get_one(Agent, call.agent_id)
            now = uow.session.scalar(select(func.now()))
        if call.execution_id is not None or not call.slot_held:
            return  # settled since it was listed
        with tracing.call_transaction(
            call.trace_headers, op="call.reconcile", name="Find Unconfirmed Call", tags=call.kind_tags
        ):
            sent_at = call.initiated_at or call.created_at
            answer = _ask(lambda: self._search(agent.provider_agent_id or "", call.id, sent_at), call)
            if not answer.answered:
                self._asked(call.id)  # asked: its turn comes after the others', not first again every round
                answer.raise_lasting()
                return
            execution = answer.value
            if execution is not None:
                self._found(call.id, execution)
            elif now - sent_at >= self._bounds.outcome_unknown_after:
                self._give_up(call, sent_at)
            else:
                self._asked(call.id)

    def check_silent(self, call_id: uuid.UUID) -> None:
        with self._uow() as uow:
            call = uow.session.get_one(Call, call_id)
        if call.execution_id is None:
            return
        with tracing.call_transaction(
            call.trace_headers, op="call.reconcile", name="Reconcile Silent Call", tags=call.kind_tags
        ):
            execution_id = call.execution_id
            answer = _ask(lambda: self._bolna.get_execution(execution_id), call)
            if not answer.answered:
                # Nothing is decided but the lease: a call Bolna cannot be asked about counts as live, for its
                # leases and no longer. It is marked asked, so its turn comes after the others' next round.
                self._after_check(call.id, None, asked=False)
                answer.raise_lasting()
                return
            execution = answer.value
            status = AgentExecution(execution).status if execution is not None else None
            if execution is not None and status in statuses.PROVIDER_STATUSES:
                provider_events.ingest(self._uow, execution, self._bolna, fetched=True)
            self._after_check(call.id, status)

    def _search(self, agent_id: str, call_id: uuid.UUID, sent_at: datetime) -> dict[str, Any] | None:
        """The execution carrying our call id, among those Bolna created while the request could reach it (a fixed
        window: its pages do not shift as time passes)."""
        until = sent_at + self._bounds.longest_request + SEARCH_MARGIN
        for execution in self._bolna.find_executions(agent_id, sent_at - SEARCH_MARGIN, until):
            if AgentExecution(execution).context_call_id == call_id and AgentExecution(execution).execution_id:
                return execution
        return None

    def _found(self, call_id: uuid.UUID, execution: dict[str, Any]) -> None:
        """Links the execution first, so the call is settled even if its state cannot be applied now (the silent
        calls' round applies it later), then applies what Bolna says like a webhook. Bolna's answer is made storable
        before anything of it is written (a U+0000 in its id would fail the link, and the call would stay unknown)."""
        execution = storable(execution)
        execution_id = AgentExecution(execution).execution_id or ""
        log.info("call %s found at Bolna as execution %s", call_id, execution_id)
        with self._uow() as uow:
            call = uow.calls.lock_call(call_id)
            if call.execution_id is None:
                lifecycle.link_execution(uow.calls, call, execution_id)
                uow.commit()
        provider_events.ingest(self._uow, execution, self._bolna, fetched=True)

    def _asked(self, call_id: uuid.UUID) -> None:
        with self._uow() as uow:
            lifecycle.heard_from_provider(uow.calls, uow.calls.lock_call(call_id))
            uow.commit()

    def _after_check(self, call_id: uuid.UUID, provider_status: str | None, asked: bool = True) -> None:
        """Marks the call checked; a slot whose lease ran out is extended while Bolna calls it live (or cannot be
        asked), else freed. `asked` False: Bolna could not be asked."""
        with self._uow() as uow:
            call = uow.calls.lock_call(call_id)
            lifecycle.heard_from_provider(uow.calls, call)
            lease_over = call.slot_held and call.slot_lease_expires_at < uow.session.scalar(select(func.now()))
            # A status Callflow does not know counts as live: the call keeps its slot for its leases, no longer.
            live = not asked or (provider_status is not None and provider_status not in statuses.RELEASES_SLOT)
            now = uow.session.scalar(select(func.now()))
            expired = lease_over and not (live and lifecycle.extend_lease(uow.calls, call, now, MAX_LEASES))
            bolna_said = (provider_status or "nothing") if asked else "nothing: it could not be asked"
            if expired:
                detail = f"Slot lease expired; Bolna reports {bolna_said} for the call."
                lifecycle.fail(call, ErrorType.SLOT_LEASE_EXPIRED, detail)
            uow.commit()
        if expired:
            report(
                CallflowError(
                    ErrorType.SLOT_LEASE_EXPIRED,
                    f"Call {call.id} held its slot past its lease; released (Bolna: {bolna_said}).",
                    sentry_contexts={
                        "slot_details": {
                            "call_id": str(call.id),
                            "execution_id": call.execution_id,
                            "provider_status": provider_status,
                            "bolna_asked": asked,
                        }
                    },
                    **_ids(call),
                ),
                place="slot.reconcile",  # the place slot_lease_expired has always been reported from
            )

    def _give_up(self, call: Call, sent_at: datetime) -> None:
        with self._uow() as uow:
            locked = uow.calls.lock_call(call.id)
            if locked.execution_id is not None or not locked.slot_held:
                return  # a webhook linked it meanwhile
            detail = (
                "Bolna's answer to POST /call was lost and neither a webhook nor a search of the agent's executions "
                f"found the call within {self._bounds.outcome_unknown_after.total_seconds():.0f}s."
            )
            lifecycle.fail(locked, ErrorType.BOLNA_OUTCOME_UNKNOWN, detail)
            uow.commit()
        report(
            CallflowError(
                ErrorType.BOLNA_OUTCOME_UNKNOWN,
                f"Call {call.id}: Bolna may have placed it, but nothing confirms it; failed and its slot released.",
                sentry_contexts={
                    "call_details": {
                        "call_id": str(call.id),
                        "sent_at": sent_at.isoformat(),
                        "last_error": call.error_detail,
                    }
                },
                **_ids(call),
            ),
            place="call.reconcile",
        )


@dataclass(frozen=True)
class _Answer(Generic[T]):
    """Bolna's answer, None when it refused the request (it does not know the call); `answered` False when Bolna
    could not be asked: then nothing is decided, and the next round asks again."""

    answered: bool
    value: T | None = None
    failure: BolnaError | None = None

    def raise_lasting(self) -> None:
        """Raises a failure to ask that lasts until someone fixes it (Callflow's key refused, an answer that cannot
        be read): the periodic job reports it, once per call while it fails the same way. One that passes (Bolna
        down, slow, rate-limiting) is only logged: the next round asks again."""
        if self.failure is not None and not (self.failure.transient or self.failure.key_refused):
            raise self.failure  # a refused key is Bolna's outage as the breaker reports it (`bolna_unavailable`)


def _ask(request: Callable[[], T], call: Call) -> _Answer[T]:
    try:
        return _Answer(True, request())
    except BolnaError as exc:
        log.warning("reconciling call %s: %s", call.id, exc)
        return _Answer(True) if exc.refused else _Answer(False, failure=exc)


def _ids(call: Call) -> dict[str, object]:
    return {"call_id": call.id, "user_id": call.user_id, "agent_id": call.agent_id, "execution_id": call.execution_id}
