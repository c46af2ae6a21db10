"""The periodic jobs: a slow Bolna holds up only the jobs that ask it, a stop is heeded between items, and an item
(or a job) that keeps failing the same way is one report, in that job's own issue."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy.exc import OperationalError

from services.queue_processor import jobs
from services.queue_processor.jobs import Job, job_threads
from shared.bolna.client import BolnaError
from tests.support.stack import wait_until


@pytest.fixture
def reported(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str | None, str]]:
    reports: list[tuple[str | None, str]] = []
    monkeypatch.setattr(jobs, "report", lambda error, cause=None, place=None: reports.append((place, error.detail)))
    return reports


def test_an_item_failing_in_one_job_is_reported_once_in_that_jobs_issue_whatever_other_jobs_do_with_it(reported):
    user = uuid.uuid4()

    def schedule_campaigns() -> None:
        jobs.for_each([user], lambda _: 1 / 0)

    def dispatch_due_retries() -> None:
        jobs.for_each([user], lambda _: None)  # the same customer, handled fine by another job

    def relay_outbox() -> None:
        raise RuntimeError("the relay broke")

    stopping = threading.Event()
    for _ in range(3):
        for run in (schedule_campaigns, dispatch_due_retries, relay_outbox):
            jobs._run_once(Job(run, 5), stopping)
    places = [place for place, _ in reported]
    assert places.count("job.schedule_campaigns") == 1, reported
    assert places.count("job.relay_outbox") == 1, "a job that fails as a whole is reported once too"
    assert set(places) == {"job.schedule_campaigns", "job.relay_outbox"}, "one issue per job"


def test_a_failure_is_told_apart_by_its_message_not_by_what_differs_every_time(reported):
    durations = iter(range(1, 100))

    def reconcile_silent_calls() -> None:
        def ask(_: str) -> None:
            raise BolnaError("GET /executions/{id}", "Unauthorized", 401, duration_ms=next(durations))

        jobs.for_each(["call"], ask)

    def relay_outbox() -> None:
        raise BolnaError("POST /call", "down", 503, duration_ms=next(durations))

    for _ in range(3):
        for run in (reconcile_silent_calls, relay_outbox):
            jobs._run_once(Job(run, 5), threading.Event())
    assert sorted(place for place, _ in reported) == ["job.reconcile_silent_calls", "job.relay_outbox"]


def test_a_job_that_succeeds_again_is_reported_again_when_it_next_fails(reported):
    failing = [True, False, True]

    def relay_outbox() -> None:
        if failing.pop(0):
            raise RuntimeError("the relay broke")

    for _ in range(3):
        jobs._run_once(Job(relay_outbox, 5), threading.Event())
    assert [place for place, _ in reported] == ["job.relay_outbox"] * 2


def test_an_unreachable_database_is_the_outage_report_not_an_internal_error(reported, monkeypatch):
    outages: list[str | None] = []
    monkeypatch.setattr(jobs, "report_database_error", lambda cause, place=None: outages.append(place))
    lost = OperationalError("SELECT 1", {}, Exception("connection refused"))

    def relay_outbox() -> None:
        raise lost

    def sweep_pending_calls() -> None:
        jobs.for_each([uuid.uuid4()], lambda _: (_ for _ in ()).throw(lost))

    for run in (relay_outbox, sweep_pending_calls):
        jobs._run_once(Job(run, 5), threading.Event())
    assert (reported, outages) == ([], ["job.relay_outbox", "job.sweep_pending_calls"])


def test_a_stop_is_heeded_between_a_rounds_items(reported):
    stopping = threading.Event()
    handled: list[int] = []

    def sweep() -> None:
        jobs.for_each(range(100), lambda item: (handled.append(item), stopping.set()))

    jobs._run_once(Job(sweep, 5), stopping)
    assert handled == [0], "the rest waits for the next round, of this process or another"


def test_a_job_waiting_on_bolna_holds_up_none_of_the_others():
    stopping, bolna_answers = threading.Event(), threading.Event()
    relayed: list[int] = []

    def reconcile_silent_calls() -> None:
        bolna_answers.wait(30)  # Bolna slow to answer, the breaker still closed

    def relay_outbox() -> None:
        relayed.append(1)

    threads = job_threads((Job(relay_outbox, 0.01), Job(reconcile_silent_calls, 0.01, asks_bolna=True)), stopping)
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(relayed) >= 3, 10, "the relay runs while Bolna is slow")
    finally:
        stopping.set()
        bolna_answers.set()
        for thread in threads:
            thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(thread.name for thread in threads) == ["periodic-jobs", "periodic-jobs-reconcile_silent_calls"]
