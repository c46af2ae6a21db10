"""The periodic jobs that catch whatever a message missed, each a Sentry Crons monitor of its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import sentry_sdk
from sqlalchemy import delete

from services.queue_processor.dispatch import Dispatcher, DispatchTrigger
from services.queue_processor.leases import LeaseReconciler
from shared.bootstrap import Components
from shared.calls import provider_events
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import IdempotencyKey
from shared.messaging import outbox
from shared.observability.sentry import cron, report

OUTBOX_MIN_AGE = timedelta(seconds=5)  # younger rows are still being published by the request that wrote them
KEPT_WEBHOOK_MIN_AGE_SECONDS = 2.0


@dataclass(frozen=True)
class Job:
    run: Callable[[], object]
    interval_seconds: float

    @property
    def name(self) -> str:
        return self.run.__name__


class PeriodicJobs:
    def __init__(self, components: Components, dispatcher: Dispatcher, leases: LeaseReconciler):
        self._components = components
        self._dispatcher = dispatcher
        self._leases = leases

    def all(self) -> tuple[Job, ...]:
        settings = self._components.settings
        every = settings.sweep_interval_seconds
        return (
            Job(self.relay_outbox, every),
            Job(self.apply_kept_webhooks, every),
            Job(self.dispatch_due_retries, every),
            # Messages place queued calls; a frequent sweep would hide a message path that stopped working.
            Job(self.sweep_pending_calls, settings.pending_sweep_interval_seconds),
            Job(self.reconcile_expired_leases, every),
            Job(self.purge_idempotency_keys, every),
        )

    def relay_outbox(self) -> None:
        outbox.publish_pending(self._components.sessions, self._components.publisher, min_age=OUTBOX_MIN_AGE)

    def apply_kept_webhooks(self) -> None:
        uow = self._components.uow
        for event_id in provider_events.unapplied_event_ids(uow, KEPT_WEBHOOK_MIN_AGE_SECONDS):
            provider_events.process(uow, event_id)

    def dispatch_due_retries(self) -> None:
        """Dispatches for users whose queued call may be placed again: no message wakes a call at its retry time."""
        for user_id in self._dispatcher.users_to_retry():
            self._dispatcher.dispatch_pending(user_id, DispatchTrigger.RETRY)

    def sweep_pending_calls(self) -> None:
        """Dispatches for every user with waiting calls, in case their wake-up message was missed."""
        for user_id in self._dispatcher.users_with_pending_calls():
            self._dispatcher.dispatch_pending(user_id, DispatchTrigger.SWEEP)

    def reconcile_expired_leases(self) -> None:
        self._leases.reconcile_expired_leases()

    def purge_idempotency_keys(self) -> None:
        with self._components.uow() as uow:
            uow.session.execute(delete(IdempotencyKey).where(IdempotencyKey.expired()))
            uow.commit()


def run_periodically(jobs: tuple[Job, ...], stopping: threading.Event) -> None:
    """Runs every job once at start, then each again once its own interval has passed since its last run."""
    next_run = dict.fromkeys(jobs, time.monotonic())
    while not stopping.is_set():
        for job in jobs:
            if stopping.is_set():
                return
            if time.monotonic() >= next_run[job]:
                _run_once(job)
                next_run[job] = time.monotonic() + job.interval_seconds
        stopping.wait(max(0.0, min(next_run.values()) - time.monotonic()))


def _run_once(job: Job) -> None:
    try:
        with (
            sentry_sdk.isolation_scope() as scope,
            cron(f"callflow-{job.name.replace('_', '-')}", job.interval_seconds),
        ):
            scope.clear_breadcrumbs()  # each run starts clean, like each message
            job.run()
    except Exception as exc:  # a failing job must not stop the others, nor the next round
        report(CallflowError(ErrorType.INTERNAL_ERROR, f"periodic job {job.name} failed: {exc!r}"), cause=exc)
