"""Placing a call that holds a slot with Bolna: shared by the API (a free slot at once) and the queue-processor
(a queued call whose turn came), so a call is placed, and reported, the same way whichever path it took."""

from __future__ import annotations

import logging
import random
import uuid
from typing import Any

import sentry_sdk

from shared.bolna.client import BolnaClient, BolnaError, Delivery, PlacedCall
from shared.bolna.execution import CONTEXT_CALL_ID_KEY
from shared.calls import lifecycle, provider_events
from shared.calls.store import CallStore
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Call, User
from shared.core.uow import UnitOfWorkFactory
from shared.observability.scrubbing import mask_phone

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_SECONDS = 300


class CallPlacer:
    """Takes slots for calls and asks Bolna to place them; built once per process by its composition root."""

    def __init__(self, uow_factory: UnitOfWorkFactory, bolna: BolnaClient, max_attempts: int):
        self.uow_factory = uow_factory
        self._bolna = bolna
        self._max_attempts = max_attempts

    @property
    def provider_down(self) -> bool:
        """While Bolna is known to be down (the breaker is open), calls wait in the queue instead of failing."""
        return self._bolna.breaker.is_open

    def reserve_slot(self, store: CallStore, locked_user: User, call: Call, *, behind_queue: bool) -> bool:
        """Takes a slot for `call` (the caller holds `locked_user`'s lock), unless Bolna is down or none is free."""
        return not self.provider_down and lifecycle.reserve_slot(store, locked_user, call, behind_queue=behind_queue)

    def reserve_slots(self, store: CallStore, free: int, calls: list[Call]) -> list[Call]:
        """Takes slots for as many queued `calls` as are `free` (counted under the user's lock the caller holds),
        none while Bolna is down."""
        return [] if self.provider_down else lifecycle.reserve_slots(store, free, calls)

    def initiate(self, call: Call, provider_agent_id: str, retry_transient: bool) -> Call | None:
        """Asks Bolna to place `call`, which holds a slot (committed by the caller), with the agent Bolna knows as
        `provider_agent_id`; returns the call once Bolna named its execution, else None (the call went back to the
        queue, or Bolna's answer was lost).

        Whether the call may be dialled again depends on what Bolna can have done with the request:
        - the open breaker held it back, or Bolna refused Callflow's key (401, 403: Callflow's to mend, and it
          opens the breaker): back to the queue, without using up an attempt;
        - it never reached Bolna (no connection): back to the queue on the queue path (`retry_transient`); on the
          API path the call fails at once and the client may retry;
        - Bolna refused it (another 4xx): the call fails, except a 429 on the queue path, which goes back to the
          queue;
        - no definite answer (read timeout, dropped connection, 5xx): Bolna may be dialling. The call keeps its slot
          and is never redialled; a webhook naming it or the reconcile job's search of Bolna settles it.
        Queue retries are bounded by the call's attempts.
        """
        call_id = call.id
        tags = {"call_id": call.id, "user_id": call.user_id, "agent_id": call.agent_id}
        contexts: dict[str, dict[str, object]] = {"call_details": call_details(call)}
        user_data: dict[str, Any] = {**call.call_metadata, CONTEXT_CALL_ID_KEY: str(call.id)}
        with sentry_sdk.start_span(op="call.initiate", name="Initiate Call") as span:
            span.set_data("call_id", str(call.id))
            sentry_sdk.add_breadcrumb(category="bolna", message="Calling Bolna.ai API", data={"endpoint": "/call"})
            try:
                placed = self._bolna.place_call(provider_agent_id, call.phone_number, user_data)
            except BolnaError as exc:
                span.set_status("internal_error")
                span.set_data("bolna.delivery", exc.delivery.value)
                if exc.delivery is Delivery.UNKNOWN:
                    try:
                        return self._await_outcome(call_id, exc)
                    except Exception as failure:
                        # Bolna may be dialling: the answer names the call (a client must not place it again), which
                        # keeps its reservation on the short lease, and the reconcile job searches Bolna for it.
                        raise CallflowError(
                            ErrorType.CALL_INITIATION_FAILED,
                            f"Bolna's answer was lost and recording that failed: {type(failure).__name__}",
                            sentry_contexts=contexts,
                            problem_fields=_call_reference(call),
                            **tags,
                        ) from failure
                retry = exc.held_back or exc.key_refused or (retry_transient and exc.transient)
                if retry and self._requeue(call_id, exc):
                    sentry_sdk.add_breadcrumb(category="bolna", message="Bolna unavailable; call back in the queue")
                    return None
                self._fail(call_id, ErrorType.BOLNA_API_FAILURE, str(exc))
                contexts["bolna_api"] = {
                    "endpoint": exc.endpoint,
                    "status_code": exc.status_code,
                    "error_message": exc.message,
                    "duration_ms": exc.duration_ms,
                    "delivery": exc.delivery.value,
                }
                raise CallflowError(
                    ErrorType.BOLNA_API_FAILURE,
                    str(exc),
                    sentry_contexts=contexts,
                    problem_fields=_call_reference(call),
                    **tags,
                ) from exc
            sentry_sdk.add_breadcrumb(
                category="bolna",
                message="Bolna.ai call successful",
                data={"execution_id": placed.execution_id, "duration_ms": placed.duration_ms},
            )
            try:
                return self.link_execution(call_id, placed)
            except Exception as exc:
                # Bolna is calling, but Callflow could not record it: its webhooks still link it by our call id.
                span.set_status("internal_error")
                contexts["bolna_api"] = {"endpoint": "/call", "status_code": 200, "execution_id": placed.execution_id}
                raise CallflowError(
                    ErrorType.CALL_INITIATION_FAILED,
                    f"Bolna accepted the call but recording it failed: {type(exc).__name__}",
                    sentry_contexts=contexts,
                    problem_fields=_call_reference(call),
                    execution_id=placed.execution_id,
                    **tags,
                ) from exc

    def link_execution(self, call_id: uuid.UUID, placed: PlacedCall) -> Call:
        with self.uow_factory() as uow:
            # Bolna can post webhooks before its answer reaches us: those kept for this execution are applied.
            call, kept, now = uow.session.execute(
                provider_events.CALL_AND_KEPT_EVENTS, {"call_id": call_id, "execution_id": placed.execution_id}
            ).one()
            uow.calls.note_now(now)
            lifecycle.link_execution(uow.calls, call, placed.execution_id, placed.status)
            applied = provider_events.apply_kept_events(uow, call) if kept else []
            uow.commit()
        provider_events.report_applied(call, applied)
        return call

    def _await_outcome(self, call_id: uuid.UUID, error: BolnaError) -> Call | None:
        """Bolna may be dialling: the call keeps its slot (on its short lease) until Bolna's word settles it.
        Returns the call when its webhooks already named the execution while the answer was awaited."""
        with self.uow_factory() as uow:
            call = uow.calls.lock_call(call_id)
            if call.execution_id is not None:
                return call
            lifecycle.await_provider(call, f"Bolna's answer was lost; waiting for its word on the call: {error}")
            uow.commit()
        sentry_sdk.add_breadcrumb(
            category="bolna", message="Bolna's answer was lost; the call waits for Bolna's word", level="warning"
        )
        log.warning("call %s: %s; Bolna may be dialling, the call is not redialled", call_id, error)
        return None

    def _fail(self, call_id: uuid.UUID, error_type: ErrorType, detail: str) -> None:
        with self.uow_factory() as uow:
            lifecycle.fail(uow.calls.lock_call(call_id), error_type, detail)
            uow.commit()

    def _requeue(self, call_id: uuid.UUID, error: BolnaError) -> bool:
        """Puts the call back to pending with a growing delay; False once its attempts are used up."""
        with self.uow_factory() as uow:
            call = uow.calls.lock_call(call_id)
            attempted = not (error.held_back or error.key_refused)  # else it waits on Bolna or on Callflow's key
            if attempted and not lifecycle.count_dispatch_attempt(call, self._max_attempts):
                return False
            delay = error.retry_after_seconds
            if delay is None:
                delay = min(MAX_RETRY_DELAY_SECONDS, 2**call.dispatch_attempts) + random.uniform(0, 1)
            lifecycle.requeue(uow.calls, call, delay, str(error))
            uow.commit()
        log.warning("call %s back in the queue for %.1fs: %s", call_id, delay, error)
        return True


def note_start(call: Call) -> None:
    """The breadcrumb that opens the placing of a call: on the API before the request is checked (a refusal's
    report shows it), on the queue path once the call holds its slot."""
    sentry_sdk.add_breadcrumb(category="call", message="Starting call initiation", data={"call_id": str(call.id)})


def call_details(call: Call) -> dict[str, object]:
    return {
        "userId": str(call.user_id),
        "agentId": str(call.agent_id),
        "callId": str(call.id),
        "phone": mask_phone(call.phone_number),
    }


def _call_reference(call: Call) -> dict[str, object]:
    """The problem answer names the call, so the client can look it up."""
    return {"callId": str(call.id)}
