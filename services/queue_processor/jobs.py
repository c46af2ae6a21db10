"""The periodic jobs that catch whatever a message missed, each a Sentry Crons monitor of its own."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import sentry_sdk
from sqlalchemy import delete

from services.queue_processor.dispatch import Dispatcher
from services.queue_processor.leases import LeaseReconciler
from shared.bootstrap import Components
from shared.calls import provider_events
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import IdempotencyKey
from shared.messaging import outbox
from shared.observability.sentry import cron, report

OUTBOX_MIN_AGE = timedelta(seconds=5)  # younger rows are still being published by the request that wrote them
KEPT_WEBHOOK_MIN_AGE_SECONDS = 2.0

Job = Callable[[], object]


class PeriodicJobs:
    def __init__(self, components: Components, dispatcher: Dispatcher, leases: LeaseReconciler):
        self._components = components
        self._dispatcher = dispatcher
        self._leases = leases

    def all(self) -> tuple[Job, ...]:
        return (
            self.relay_outbox,
            self.apply_kept_webhooks,
            self.sweep_pending_calls,
            self.reconcile_expired_leases,
            self.purge_idempotency_keys,
        )

    def relay_outbox(self) -> None:
        outbox.publish_pending(self._components.sessions, self._components.publisher, min_age=OUTBOX_MIN_AGE)

    def apply_kept_webhooks(self) -> None:
        uow = self._components.uow
        for event_id in provider_events.unapplied_event_ids(uow, KEPT_WEBHOOK_MIN_AGE_SECONDS):
            provider_events.process(uow, event_id)

    def sweep_pending_calls(self) -> None:
        """Dispatches for every user with waiting calls, in case their wake-up message was missed."""
        for user_id in self._dispatcher.users_with_pending_calls():
            self._dispatcher.dispatch_pending(user_id)

    def reconcile_expired_leases(self) -> None:
        self._leases.reconcile_expired_leases()

    def purge_idempotency_keys(self) -> None:
        with self._components.uow() as uow:
            uow.session.execute(delete(IdempotencyKey).where(IdempotencyKey.expired()))
            uow.commit()


def run_periodically(jobs: tuple[Job, ...], interval: float, stopping: threading.Event) -> None:
    while not stopping.is_set():
        for job in jobs:
            if stopping.is_set():
                return
            try:
                with (
                    sentry_sdk.isolation_scope() as scope,
                    cron(f"callflow-{job.__name__.replace('_', '-')}", interval),
                ):
                    scope.clear_breadcrumbs()  # each run starts clean, like each message
                    job()
            except Exception as exc:  # a failing job must not stop the others, nor the next round
                report(
                    CallflowError(ErrorType.INTERNAL_ERROR, f"periodic job {job.__name__} failed: {exc!r}"),
                    cause=exc,
                )
        stopping.wait(interval)
