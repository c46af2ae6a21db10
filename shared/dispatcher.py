"""The queue-processor's work: wake-up messages and the periodic jobs that catch whatever a message missed."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta

import sentry_sdk

from shared import calls, idempotency, leases, outbox, webhooks
from shared.bolna import BolnaError, get_bolna_client
from shared.consumer import IncomingMessage, PoisonMessage
from shared.errors import CallflowError, ErrorType
from shared.messaging import MessageType
from shared.observability import cron, report

log = logging.getLogger(__name__)

OUTBOX_MIN_AGE = timedelta(seconds=5)  # younger rows are still being published by the request that wrote them
KEPT_WEBHOOK_MIN_AGE_SECONDS = 2.0


def handle_dispatch_message(message: IncomingMessage) -> None:
    body = message.json()
    if message.message_type == MessageType.EXECUTION_STOP:
        _stop_execution(body)
    elif message.message_type in (MessageType.CALL_QUEUED, MessageType.SLOT_RELEASED):
        calls.dispatch_pending(_user_id(body))
    else:
        raise PoisonMessage(f"unknown message type {message.message_type!r}")


def _user_id(body: dict) -> uuid.UUID:
    try:
        return uuid.UUID(str(body["user_id"]))
    except (KeyError, ValueError) as exc:
        raise PoisonMessage("body has no valid user_id") from exc


def _stop_execution(body: dict) -> None:
    execution_id = body.get("execution_id")
    if not isinstance(execution_id, str) or not execution_id:
        raise PoisonMessage("body has no execution_id")
    try:
        get_bolna_client().stop_execution(execution_id)
    except BolnaError as exc:
        if exc.transient:
            raise  # retried after a delay
        log.warning("Bolna would not stop execution %s (it may have ended): %s", execution_id, exc)


def relay_outbox() -> None:
    outbox.publish_pending(outbox.get_publisher(), min_age=OUTBOX_MIN_AGE)


def apply_kept_webhooks() -> None:
    for event_id in webhooks.unapplied_event_ids(KEPT_WEBHOOK_MIN_AGE_SECONDS):
        webhooks.process(event_id)


def sweep_pending_calls() -> None:
    """Dispatches for every user with waiting calls, in case their wake-up message was missed."""
    for user_id in calls.users_with_pending_calls():
        calls.dispatch_pending(user_id)


def reconcile_expired_leases() -> None:
    leases.reconcile_expired_leases()


def purge_idempotency_keys() -> None:
    idempotency.purge_expired()


PERIODIC_JOBS: tuple[Callable[[], None], ...] = (
    relay_outbox,
    apply_kept_webhooks,
    sweep_pending_calls,
    reconcile_expired_leases,
    purge_idempotency_keys,
)


def run_periodically(jobs: tuple[Callable[[], None], ...], interval: float, stopping: threading.Event) -> None:
    while not stopping.is_set():
        for job in jobs:
            if stopping.is_set():
                return
            try:
                with sentry_sdk.isolation_scope(), cron(f"callflow-{job.__name__.replace('_', '-')}", interval):
                    job()
            except Exception as exc:  # a failing job must not stop the others, nor the next round
                report(
                    CallflowError(ErrorType.INTERNAL_ERROR, f"periodic job {job.__name__} failed: {exc!r}"),
                    cause=exc,
                )
        stopping.wait(interval)
