"""What the SDK, set up as every service sets it up, sends for a report and for a periodic job: read from the real
envelopes it posts to a stand-in for Sentry on this machine."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import psycopg
import pytest
import sentry_sdk
from sqlalchemy.exc import OperationalError

from services.queue_processor import jobs
from services.queue_processor.dispatch import NO_SLOT_FOR_CAMPAIGNS, Dispatcher, DispatchTrigger
from shared.core.config import Settings
from shared.core.errors import ERROR_TABLE, CallflowError, ErrorType
from shared.http.app import create_http_app
from shared.observability.sentry import cron, database_recovered, exception_type_name, init_sentry, report
from tests.support.sentry_sink import Item, SentrySink

Start = Callable[..., SentrySink]


@pytest.fixture
def sentry() -> Iterator[Start]:
    """Starts the SDK against a fresh sink with the given settings; stops it (sending nothing) afterwards."""
    sinks: list[SentrySink] = []

    def start(**settings: object) -> SentrySink:
        sink = SentrySink().start()
        sinks.append(sink)
        init_sentry(
            "test",
            Settings(
                sentry_dsn=sink.dsn,
                sentry_send_in_development=True,
                sentry_traces_sample_rate=0,
                sentry_profiles_sample_rate=0,
                **settings,
            ),
        )
        return sink

    yield start
    init_sentry("test", Settings(sentry_dsn=""))
    for sink in sinks:
        sink.stop()


def _sent(sink: SentrySink, item_type: str) -> list[Item]:
    sentry_sdk.flush(timeout=10)
    return sink.of_type(item_type)


def test_an_error_types_exception_name_is_its_type_in_camel_case_and_unique():
    assert exception_type_name(ErrorType.AGENT_NOT_FOUND) == "AgentNotFound"
    assert exception_type_name(ErrorType.BOLNA_API_FAILURE) == "BolnaApiFailure"
    names = {exception_type_name(error_type) for error_type in ERROR_TABLE}
    assert len(names) == len(ERROR_TABLE)
    assert all(name.isidentifier() and name[0].isupper() for name in names)


def test_an_issue_is_titled_with_its_error_type_and_still_grouped_by_type_and_place(sentry):
    sink = sentry()
    cause = KeyError("agent")
    report(CallflowError(ErrorType.AGENT_NOT_FOUND, "Agent a1 does not exist."), cause=cause, place="/api/calls")
    (event,) = _sent(sink, "event")
    *causes, raised = event.payload["exception"]["values"]
    assert (raised["type"], raised["value"]) == ("AgentNotFound", "Agent a1 does not exist.")
    assert [value["type"] for value in causes] == ["KeyError"], "a cause keeps its own type"
    assert event.payload["fingerprint"] == ["agent_not_found", "/api/calls"]


def test_an_exception_that_is_not_a_callflow_error_keeps_its_type(sentry):
    sink = sentry()
    try:
        raise ValueError("not of the table")
    except ValueError as exc:
        sentry_sdk.capture_exception(exc)
    (event,) = _sent(sink, "event")
    assert event.payload["exception"]["values"][-1]["type"] == "ValueError"


@pytest.mark.parametrize(("crons", "check_ins"), [(True, 2), (False, 0)])
def test_a_periodic_job_checks_in_only_with_crons_on(sentry, crons, check_ins):
    sink = sentry(sentry_crons=crons)
    ran = []
    with cron("callflow-test-job", 60):
        ran.append(True)
    assert ran, "the job runs either way"
    sent = _sent(sink, "check_in")
    assert len(sent) == check_ins
    assert {item.payload["monitor_slug"] for item in sent} == ({"callflow-test-job"} if crons else set())


def test_crons_are_on_unless_turned_off():
    assert Settings.model_fields["sentry_crons"].default is True


def test_an_empty_sentry_crons_is_the_default(monkeypatch):
    monkeypatch.setenv("SENTRY_CRONS", "")  # .env.example's value, which every process `make up` starts is given
    assert Settings().sentry_crons is True


class _NoFreeSlotPlacer:
    """A placer whose user has campaign calls due and no free slot: what `Dispatcher` reads, and nothing else."""

    provider_down = False

    @contextmanager
    def uow_factory(self) -> Iterator[SimpleNamespace]:
        # attempt ended, free slot, direct, campaigns, requeued
        due = SimpleNamespace(first=lambda: (False, False, False, True, False))
        session = SimpleNamespace(execute=lambda query, parameters: due)
        yield SimpleNamespace(reads_only=lambda: SimpleNamespace(session=session))


def test_campaign_calls_without_a_free_slot_are_an_info_breadcrumb_not_an_event(sentry):
    sink = sentry()
    user_id = uuid.uuid4()
    with sentry_sdk.isolation_scope():
        assert Dispatcher(_NoFreeSlotPlacer(), concurrency=1).dispatch_pending(user_id, DispatchTrigger.MESSAGE) == 0
        sentry_sdk.capture_message("what follows the dispatch")
    (event,) = _sent(sink, "event")
    (crumb,) = [crumb for crumb in event.payload["breadcrumbs"]["values"] if crumb.get("category") == "queue"]
    assert crumb["message"] == NO_SLOT_FOR_CAMPAIGNS
    assert crumb["level"] == "info"
    assert crumb["data"] == {"user_id": str(user_id)}


def test_a_periodic_jobs_item_reports_nothing_noted_while_handling_another(sentry):
    sink = sentry()
    user_a, user_b = uuid.uuid4(), uuid.uuid4()

    def handle(user_id: uuid.UUID) -> None:
        if user_id == user_a:  # no free slot for A's campaign calls: an info breadcrumb naming A
            Dispatcher(_NoFreeSlotPlacer(), concurrency=1).dispatch_pending(user_id, DispatchTrigger.SCHEDULE)
            return
        sentry_sdk.add_breadcrumb(category="test", message=f"handling {user_id}")
        raise ValueError(f"B fails: {user_id}")

    with sentry_sdk.isolation_scope():  # one run of the job, as `_run_once` opens it
        jobs.for_each([user_a, user_b], handle)
    (event,) = _sent(sink, "event")
    messages = [crumb.get("message") for crumb in event.payload["breadcrumbs"]["values"]]
    assert f"handling {user_b}" in messages, "the failing item's own breadcrumbs stay on its event"
    assert NO_SLOT_FOR_CAMPAIGNS not in messages, "A's breadcrumb is not on B's event"


def test_log_lines_are_breadcrumbs_except_gunicorns_access_line(sentry):
    sink = sentry()
    with sentry_sdk.isolation_scope():
        # WARNING: a level that passes the loggers' default threshold, and the one below events.
        logging.getLogger("services.call_initiator").warning("the app's own line")
        logging.getLogger("gunicorn.access").warning('127.0.0.1 "POST /webhooks/bolna HTTP/1.1" 200')
        sentry_sdk.capture_message("what follows the log lines")
    (event,) = _sent(sink, "event")
    messages = [crumb.get("message") for crumb in event.payload["breadcrumbs"]["values"]]
    assert "the app's own line" in messages
    assert not [message for message in messages if "POST /webhooks/bolna" in (message or "")]


def test_a_database_outage_in_a_request_is_one_issue_per_route_not_per_id_in_its_path(sentry):
    sink = sentry()
    app = create_http_app("test", SimpleNamespace())  # type: ignore[arg-type]

    @app.get("/api/calls/<call_id>")
    def call(call_id: str):
        raise OperationalError("SELECT 1", {}, Exception("the database went away"))

    database_recovered()  # an outage is reported once: this one is the first
    answer = app.test_client().get(f"/api/calls/{uuid.uuid4()}")
    database_recovered()
    assert (answer.status_code, answer.json["error_type"]) == (503, "database_error")
    (event,) = [item for item in _sent(sink, "event") if item.tags.get("error_type") == "database_error"]
    assert event.payload["fingerprint"] == ["database_error", "/api/calls/<call_id>"]


def test_a_statement_that_failed_in_a_request_is_no_outage_and_each_is_reported(sentry):
    sink = sentry()
    app = create_http_app("test", SimpleNamespace())  # type: ignore[arg-type]

    @app.get("/api/calls")
    def calls():
        raise OperationalError("SELECT 1", {}, psycopg.errors.QueryCanceled("canceling statement due to timeout"))

    database_recovered()
    answers = [app.test_client().get("/api/calls") for _ in range(2)]
    assert {(answer.status_code, answer.json["error_type"]) for answer in answers} == {(503, "database_error")}
    events = [item for item in _sent(sink, "event") if item.tags.get("error_type")]
    assert [event.tags["error_type"] for event in events] == ["internal_error"] * 2
    assert "SQLSTATE 57014" in events[0].payload["exception"]["values"][-1]["value"]
