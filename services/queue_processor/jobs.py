"""The periodic jobs that catch whatever a message missed, each a Sentry Crons monitor of its own."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import sentry_sdk

from services.queue_processor.dispatch import Dispatcher, DispatchTrigger
from services.queue_processor.reconcile import ProviderReconciler
from services.queue_processor.retention import Retention, RetentionPeriods
from shared.bootstrap import Components
from shared.calls import provider_events
from shared.core.db import database_unavailable
from shared.core.errors import CallflowError, ErrorType
from shared.messaging import outbox
from shared.observability.sentry import cron, report, report_database_error

OUTBOX_MIN_AGE = timedelta(seconds=5)  # younger rows are still being published by the process that wrote them
KEPT_WEBHOOK_MIN_AGE_SECONDS = 2.0

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    run: Callable[[], object]
    interval_seconds: float
    # A job that waits on Bolna runs on a thread of its own: a slow Bolna must not hold up the outbox relay, the
    # dispatch of due calls or the campaigns' schedule.
    asks_bolna: bool = False

    @property
    def name(self) -> str:
        return self.run.__name__

    @property
    def place(self) -> str:
        """Where its failures happen (the second part of their fingerprint): one issue per job."""
        return f"job.{self.name}"


class PeriodicJobs:
    def __init__(self, components: Components, dispatcher: Dispatcher, reconciler: ProviderReconciler):
        self._components = components
        self._dispatcher = dispatcher
        self._reconciler = reconciler

    def all(self) -> tuple[Job, ...]:
        settings = self._components.settings
        every = settings.sweep_interval_seconds
        return (
            Job(self.relay_outbox, every),
            Job(self.apply_kept_webhooks, every, asks_bolna=True),
            Job(self.dispatch_due_retries, every),
            # No message announces a campaign's startAt, a retry's interval, a calling window opening, or its end.
            Job(self.schedule_campaigns, every),
            # Messages place queued calls; a frequent sweep would hide a message path that stopped working.
            Job(self.sweep_pending_calls, settings.pending_sweep_interval_seconds),
            Job(self.reconcile_unconfirmed_calls, every, asks_bolna=True),
            Job(self.reconcile_silent_calls, every, asks_bolna=True),
            Job(self.enforce_retention, settings.retention_interval_seconds),
        )

    def relay_outbox(self) -> None:
        outbox.publish_pending(self._components.sessions, self._components.publisher, min_age=OUTBOX_MIN_AGE)

    def apply_kept_webhooks(self) -> None:
        components = self._components
        for_each(
            provider_events.unapplied_event_ids(components.uow, KEPT_WEBHOOK_MIN_AGE_SECONDS),
            lambda event_id: provider_events.process(components.uow, event_id, components.bolna),
        )

    def dispatch_due_retries(self) -> None:
        """Dispatches for users whose queued call may be placed again: no message wakes a call at its retry time."""
        for_each(self._dispatcher.users_to_retry(), self._dispatch(DispatchTrigger.RETRY))

    def schedule_campaigns(self) -> None:
        """Settles finished campaign attempts, completes campaigns, and dispatches for every user with an active
        campaign: startAt, retry intervals and calling windows come due without a message."""
        for_each(self._dispatcher.users_with_campaign_work(), self._schedule_campaigns_of)

    def _schedule_campaigns_of(self, user_id: uuid.UUID) -> None:
        self._dispatcher.settle_campaigns(user_id)
        self._dispatcher.dispatch_pending(user_id, DispatchTrigger.SCHEDULE)

    def sweep_pending_calls(self) -> None:
        """Dispatches for every user with waiting calls, in case their wake-up message was missed."""
        for_each(self._dispatcher.users_with_pending_calls(), self._dispatch(DispatchTrigger.SWEEP))

    def reconcile_unconfirmed_calls(self) -> None:
        """Settles calls whose answer from Bolna was lost: found at Bolna, or given up after a bound."""
        for_each(self._reconciler.unconfirmed_calls(), self._reconciler.settle_unconfirmed)

    def reconcile_silent_calls(self) -> None:
        """Asks Bolna about live calls it has been quiet about (a lost webhook, a lost `completed`)."""
        for_each(self._reconciler.silent_calls(), self._reconciler.check_silent)

    def _dispatch(self, trigger: DispatchTrigger) -> Callable[[uuid.UUID], object]:
        return lambda user_id: self._dispatcher.dispatch_pending(user_id, trigger)

    def enforce_retention(self) -> None:
        """Deletes or redacts what is kept past its retention period; each table's step reports its own failure."""
        periods = RetentionPeriods.from_settings(self._components.settings)
        Retention(self._components.uow, periods).run()


class _ItemFailures:
    """The last failure of each job's item that failed, so one that fails every round is reported once, not every
    round (its job succeeding with it clears that; another job succeeding with the same item does not)."""

    LIMIT = 10_000  # remembered items; beyond it the oldest are forgotten (and reported again if still failing)

    def __init__(self) -> None:
        self._last: dict[object, str] = {}
        self._lock = threading.Lock()

    def is_new(self, item: object, failure: str) -> bool:
        with self._lock:
            if self._last.get(item) == failure:
                return False
            self._last[item] = failure
            while len(self._last) > self.LIMIT:
                del self._last[next(iter(self._last))]
            return True

    def recovered(self, item: object) -> None:
        with self._lock:
            self._last.pop(item, None)


_failures = _ItemFailures()
_WHOLE_JOB = object()  # the item a whole job's failure is remembered as


@dataclass(frozen=True)
class _Round:
    """The job whose round runs on this thread, and the process's stop."""

    job: Job
    stopping: threading.Event


_round: ContextVar[_Round | None] = ContextVar("periodic_job_round", default=None)


def for_each(items: Iterable[T], handle: Callable[[T], object]) -> None:
    """Handles each item on its own: one that fails is reported (once while it fails the same way in the same job)
    and the rest still run, until the process stops (the rest wait for the next round, of this process or
    another). Each item has its own isolation scope, as each message has: what is noted while handling one (a
    breadcrumb, a tag) goes on its own events, never on another item's."""
    round_ = _round.get()
    job = round_.job if round_ is not None else None
    for item in items:
        if round_ is not None and round_.stopping.is_set():
            return
        key = (job.name if job else None, item)
        with sentry_sdk.isolation_scope():
            try:
                handle(item)
            except Exception as exc:
                _report_failure(key, exc, f"periodic job failed on {item}", job.place if job else None)
            else:
                _failures.recovered(key)


def _report_failure(key: object, exc: Exception, what: str, place: str | None) -> None:
    """Reports a failure of a job or of one of its items: an unreachable database once for the outage (every job
    meets it), anything else once while it fails the same way."""
    if database_unavailable(exc):
        report_database_error(exc, place=place)
    elif _failures.is_new(key, _signature(exc)):
        report(CallflowError(ErrorType.INTERNAL_ERROR, f"{what}: {exc!r}"), cause=exc, place=place)
    else:
        log.warning("%s, again: %r", what, exc)


def _signature(exc: Exception) -> str:
    """What tells two failures apart: the error and the first line of its message, never its repr or the lines
    after, which may hold what differs every time (a Bolna error's duration, the processes a deadlock names)."""
    first_line = str(exc).partition("\n")[0]
    return f"{type(exc).__qualname__}: {first_line}"


def job_threads(jobs: Sequence[Job], stopping: threading.Event) -> list[threading.Thread]:
    """The threads (not started) that run the jobs until `stopping` is set: each that asks Bolna on one of its own
    (kept webhooks wait behind no reconcile round), the others together on one."""
    groups = {
        "periodic-jobs": tuple(job for job in jobs if not job.asks_bolna),
        **{f"periodic-jobs-{job.name}": (job,) for job in jobs if job.asks_bolna},
    }
    return [
        threading.Thread(target=run_periodically, args=(group, stopping), name=name)
        for name, group in groups.items()
        if group
    ]


def run_periodically(jobs: tuple[Job, ...], stopping: threading.Event) -> None:
    """Runs every job once at start, then each again once its own interval has passed since its last run."""
    next_run = dict.fromkeys(jobs, time.monotonic())
    while not stopping.is_set():
        for job in jobs:
            if stopping.is_set():
                return
            if time.monotonic() >= next_run[job]:
                _run_once(job, stopping)
                next_run[job] = time.monotonic() + job.interval_seconds
        stopping.wait(max(0.0, min(next_run.values()) - time.monotonic()))


def _run_once(job: Job, stopping: threading.Event) -> None:
    token = _round.set(_Round(job, stopping))
    try:
        with (
            sentry_sdk.isolation_scope() as scope,
            cron(f"callflow-{job.name.replace('_', '-')}", job.interval_seconds),
        ):
            scope.clear_breadcrumbs()  # each run starts clean, like each message
            job.run()
    except Exception as exc:  # a failing job must not stop the others, nor the next round
        _report_failure((job.name, _WHOLE_JOB), exc, f"periodic job {job.name} failed", job.place)
    else:
        _failures.recovered((job.name, _WHOLE_JOB))
    finally:
        _round.reset(token)
