"""The call lifecycle's answers to Bolna's silence, on the real database: a reservation's short lease, Bolna's late
word overruling a call Callflow gave up on, and periodic jobs that handle each item on its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sentry_sdk
from sqlalchemy import func, select, update

from services.queue_processor import jobs
from services.queue_processor.reconcile import ProviderReconciler, ReconcileBounds
from shared.bolna.client import BolnaError, PlacedCall
from shared.calls import lifecycle, provider_events, statuses
from shared.calls.initiation import CallPlacer
from shared.core.config import load_settings
from shared.core.errors import ErrorType
from shared.core.models import Call, OutboxMessage, WebhookEvent
from shared.messaging.topology import MessageType
from shared.observability.sentry import init_sentry
from tests.support.components import components
from tests.support.factories import call_row, customer, ledger_total, load_call, load_event
from tests.support.sentry_sink import SentrySink


def test_a_reservation_holds_its_slot_on_the_short_lease_until_bolna_names_the_execution():
    owner = customer(max_concurrent_calls=1)
    call = call_row(owner)
    with components().uow() as uow:
        locked = uow.calls.lock_call(call.id)
        assert lifecycle.reserve_slot(uow.calls, uow.calls.lock_user(owner.user_id), locked, behind_queue=False)
        uow.commit()
        lease_left = uow.session.scalar(select(Call.slot_lease_expires_at - func.now()).where(Call.id == call.id))
    assert timedelta(0) < lease_left <= timedelta(seconds=components().settings.initiating_lease_seconds)

    with components().uow() as uow:
        lifecycle.link_execution(uow.calls, uow.calls.lock_call(call.id), str(uuid.uuid4()), "queued")
        uow.commit()
        lease_left = uow.session.scalar(select(Call.slot_lease_expires_at - func.now()).where(Call.id == call.id))
    assert lease_left > timedelta(seconds=components().settings.slot_lease_seconds) / 2


def test_a_webhook_for_a_call_given_up_as_unknown_links_it_holds_its_slot_and_bills_it():
    owner = customer(credits=10, max_concurrent_calls=1)
    call = call_row(owner, status=statuses.FAILED, error_type=ErrorType.BOLNA_OUTCOME_UNKNOWN, slot_held=False)
    execution_id = str(uuid.uuid4())
    context = {"recipient_data": {"callflow_call_id": str(call.id)}}
    uow = components().uow

    provider_events.ingest(uow, {"id": execution_id, "status": "in-progress", "context_details": context})
    live = load_call(call.id)
    assert (live.execution_id, live.status, live.error_type, live.slot_held) == (
        execution_id,
        "in-progress",
        None,
        True,
    )

    for status in (statuses.CALL_DISCONNECTED, statuses.COMPLETED):
        provider_events.ingest(uow, {"id": execution_id, "status": status, "conversation_duration": 75})
    billed = load_call(call.id)
    assert (billed.status, billed.slot_held, billed.credits_charged) == (statuses.COMPLETED, False, 2)
    assert ledger_total(owner.user_id) == (1, -2)


def test_one_item_that_fails_does_not_stop_a_periodic_job_from_handling_the_rest(monkeypatch):
    reported: list[str] = []
    monkeypatch.setattr(jobs, "report", lambda error, cause=None, **_: reported.append(error.detail))
    handled: list[int] = []

    def handle(item: int) -> None:
        if item == 2:
            raise ValueError("a bad row")
        handled.append(item)

    jobs.for_each([1, 2, 3], handle)
    assert handled == [1, 3]
    assert len(reported) == 1 and "a bad row" in reported[0]
    jobs.for_each([1, 2, 3], handle)  # the next round: the same failure is not reported again
    assert handled == [1, 3, 1, 3]
    assert len(reported) == 1


class _BolnaFindingAnIdWithANul:
    """Bolna's search of an agent's executions finds the call, under an id holding U+0000 (which PostgreSQL's text
    cannot store)."""

    def __init__(self, call_id: uuid.UUID, execution_id: str):
        self._call_id, self._execution_id = call_id, execution_id

    def find_executions(self, agent_id: str, since: object, until: object) -> list[dict[str, object]]:
        context = {"recipient_data": {"callflow_call_id": str(self._call_id)}}
        return [{"id": self._execution_id, "status": "ringing", "context_details": context}]


def test_an_unconfirmed_call_found_at_bolna_under_an_id_holding_a_nul_is_linked_and_applied():
    owner = customer()
    long_ago = func.now() - timedelta(minutes=5)
    call = call_row(owner, status=statuses.INITIATING, slot_held=True, initiated_at=long_ago, created_at=long_ago)
    execution_id = str(uuid.uuid4())
    bolna = _BolnaFindingAnIdWithANul(call.id, f"{execution_id}\x00")
    bounds = ReconcileBounds.from_settings(components().settings)
    ProviderReconciler(components().uow, bolna, bounds).settle_unconfirmed(call.id)  # type: ignore[arg-type]
    found = load_call(call.id)
    assert (found.execution_id, found.status) == (execution_id, "ringing")


class _BolnaAnswering:
    """Bolna's answer to GET /executions/{id}: an error with `status_code`, or an execution of `status`."""

    def __init__(self, status_code: int = 200, status: str | None = None):
        self.status_code, self.status = status_code, status

    def get_execution(self, execution_id: str) -> dict:
        if self.status is None:
            raise BolnaError(f"/executions/{execution_id}", "no", self.status_code)
        return {"id": execution_id, "status": self.status}


@pytest.mark.parametrize(
    ("bolna", "freed", "reported"),
    [
        (_BolnaAnswering(404), True, False),
        (_BolnaAnswering(403), False, False),  # the breaker reports a refused key, once: `bolna_unavailable`
        (_BolnaAnswering(401), False, False),
        (_BolnaAnswering(200), False, True),
        (_BolnaAnswering(503), False, False),
        (_BolnaAnswering(status="teleported"), False, False),
    ],
    ids=[
        "Bolna does not know it",
        "Callflow's key refused",
        "no key",
        "an answer that cannot be read",
        "Bolna down",
        "a status Callflow does not know, within its leases",
    ],
)
def test_a_call_past_its_lease_is_freed_only_when_bolna_says_it_does_not_know_it(bolna, freed, reported):
    owner = customer()
    long_ago = func.now() - timedelta(hours=2)
    call = call_row(
        owner,
        status="in-progress",
        execution_id=str(uuid.uuid4()),
        slot_held=True,
        slot_lease_expires_at=long_ago,
        provider_checked_at=long_ago,
    )
    bounds = ReconcileBounds.from_settings(components().settings)
    reconciler = ProviderReconciler(components().uow, bolna, bounds)  # type: ignore[arg-type]
    if reported:  # a failure that lasts until someone fixes it: raised for the periodic job to report
        with pytest.raises(BolnaError):
            reconciler.check_silent(call.id)
    else:
        reconciler.check_silent(call.id)
    checked = load_call(call.id)
    if freed:
        assert (checked.status, checked.error_type, checked.slot_held) == ("failed", "slot_lease_expired", False)
    else:  # nothing is decided while Bolna cannot be asked: it may still be calling
        assert (checked.status, checked.error_type, checked.slot_held) == ("in-progress", None, True)
    with components().uow() as uow:
        asked_ago = uow.session.scalar(select(func.now() - Call.provider_checked_at).where(Call.id == call.id))
    assert asked_ago < timedelta(minutes=1), "marked asked: the calls Bolna cannot answer now take turns"


@pytest.mark.parametrize(
    "bolna", [_BolnaAnswering(status="teleported"), _BolnaAnswering(503)], ids=["unknown status", "cannot be asked"]
)
def test_a_call_bolna_reports_in_a_status_callflow_does_not_know_or_cannot_be_asked_about_is_freed_past_its_leases(
    bolna,
):
    owner = customer()
    long_ago = func.now() - timedelta(days=1)  # placed longer ago than MAX_LEASES leases
    call = call_row(
        owner,
        status="in-progress",
        execution_id=str(uuid.uuid4()),
        slot_held=True,
        slot_lease_expires_at=func.now() - timedelta(minutes=1),
        initiated_at=long_ago,
        created_at=long_ago,
    )
    bounds = ReconcileBounds.from_settings(components().settings)
    ProviderReconciler(components().uow, bolna, bounds).check_silent(call.id)
    checked = load_call(call.id)
    assert (checked.status, checked.error_type, checked.slot_held) == ("failed", "slot_lease_expired", False)


class _BolnaWithoutDuration:
    """Bolna's answer to GET /executions/{id} for a call whose `completed` has waited past BOLNA_RECORD_LAG:
    completed, with no duration anywhere (the call is not billed)."""

    def get_execution(self, execution_id: str) -> dict[str, str]:
        with components().uow() as uow:  # the event has waited long enough for Bolna's record to catch up
            uow.session.execute(
                update(WebhookEvent)
                .where(WebhookEvent.execution_id == execution_id)
                .values(received_at=func.now() - provider_events.BOLNA_RECORD_LAG)
            )
            uow.commit()
        return {"id": execution_id, "status": statuses.COMPLETED}


@pytest.fixture
def sentry_sink() -> Iterator[SentrySink]:
    sink = SentrySink().start()
    settings = load_settings().model_copy(update={"sentry_dsn": sink.dsn, "sentry_send_in_development": True})
    init_sentry("tests", settings)
    yield sink
    init_sentry("tests", load_settings())  # back to no client
    sink.stop()


def _noted_of_unbilled_call(sink: SentrySink, call: Call) -> list[str]:
    """The breadcrumbs that say where the event came from, on the report that the call was not billed."""
    sentry_sdk.flush(timeout=10)
    (event,) = sink.events(error_type=str(ErrorType.BILLING_DURATION_MISSING), call_id=str(call.id))
    return [crumb["message"] for crumb in event.payload["breadcrumbs"]["values"] if crumb.get("category") == "webhook"]


def test_an_execution_fetched_from_bolna_and_applied_at_once_is_noted_once_as_fetched(sentry_sink):
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="in-progress", execution_id=execution_id, slot_held=True)
    answer = {"id": execution_id, "status": statuses.COMPLETED}  # no duration: Bolna is asked again, then applied
    with sentry_sdk.isolation_scope():  # one call reconciled
        provider_events.ingest(components().uow, answer, _BolnaWithoutDuration(), fetched=True)
    assert _noted_of_unbilled_call(sentry_sink, call) == ["Bolna execution fetched: completed"]


def test_a_kept_webhook_the_sweep_applies_is_noted_as_retried(sentry_sink):
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="in-progress", execution_id=execution_id, slot_held=True)
    with sentry_sdk.isolation_scope():  # the webhook-receiver keeps it for the queue-processor to ask Bolna
        receipt = provider_events.ingest(components().uow, {"id": execution_id, "status": statuses.COMPLETED})
    with sentry_sdk.isolation_scope():  # the queue-processor's sweep
        provider_events.process(components().uow, receipt.event_id, _BolnaWithoutDuration())
    assert _noted_of_unbilled_call(sentry_sink, call) == ["Kept Bolna event retried: completed"]


def test_every_status_of_a_bolna_redial_is_reported_and_none_is_applied_or_billed(sentry_sink):
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="in-progress", execution_id=execution_id, slot_held=True)
    ended = {"id": execution_id, "status": statuses.COMPLETED, "telephony_data": {"duration": "61"}}
    redial = {"id": execution_id, "retry_count": 1}
    for payload in (ended, {**redial, "status": "ringing"}, {**redial, **ended, "status": statuses.COMPLETED}):
        with sentry_sdk.isolation_scope():  # one webhook request each
            provider_events.ingest(components().uow, payload)

    assert ledger_total(owner.user_id) == (1, -2), "charged once, for the first dial only"
    sentry_sdk.flush(timeout=10)
    reported = sentry_sink.events(error_type=str(ErrorType.BOLNA_REDIALLED), call_id=str(call.id))
    details = sorted((event.payload["contexts"]["redial_details"] for event in reported), key=lambda d: d["status"])
    assert details == [
        {
            "execution_id": execution_id,
            "retry_count": 1,
            "status": "completed",
            "stop_requested": False,
            "duration_seconds": 61,
        },
        {
            "execution_id": execution_id,
            "retry_count": 1,
            "status": "ringing",
            "stop_requested": True,
            "duration_seconds": None,
        },
    ]
    assert {tuple(event.payload["fingerprint"]) for event in reported} == {("bolna_redialled", "webhook.process")}


@pytest.mark.parametrize(
    ("status", "error_type", "message"),
    [
        ("error", ErrorType.BOLNA_CALL_ERROR, "Call errored: the telephony provider could not be reached"),
        ("balance-low", ErrorType.BOLNA_BALANCE_LOW, "Call not placed: the account balance is too low"),
    ],
)
def test_a_call_bolna_ends_in_a_failure_of_its_own_is_reported_once_unbilled_and_frees_its_slot(
    sentry_sink, status, error_type, message
):
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="queued", execution_id=execution_id, slot_held=True)
    ended = {"id": execution_id, "status": status, "error_message": message, "telephony_data": {"duration": "61"}}
    for payload in (ended, ended, {"id": execution_id, "status": "ringing"}):  # again, then a late status
        with sentry_sdk.isolation_scope():  # one webhook request each
            provider_events.ingest(components().uow, payload)

    final = load_call(call.id)
    assert (final.status, final.slot_held, final.credits_charged) == (status, False, None)
    assert ledger_total(owner.user_id) == (0, 0)
    sentry_sdk.flush(timeout=10)
    (reported,) = sentry_sink.events(error_type=str(error_type), call_id=str(call.id))
    assert reported.payload["contexts"]["bolna_failure_details"] == {
        "execution_id": execution_id,
        "status": status,
        "error_message": message,
        "campaign_id": None,
    }
    assert reported.payload["fingerprint"] == [str(error_type), "webhook.process"]
    assert (reported.tags["execution_id"], reported.tags["user_id"]) == (execution_id, str(owner.user_id))


def test_bolnas_failure_on_a_call_already_over_is_not_reported(sentry_sink):
    """Bolna's `error` after the call completed moves nothing: no call ended in error."""
    execution_id = str(uuid.uuid4())
    call = call_row(customer(), status=statuses.COMPLETED, execution_id=execution_id, slot_held=False)
    with sentry_sdk.isolation_scope():
        provider_events.ingest(components().uow, {"id": execution_id, "status": "error", "error_message": "late"})

    assert load_call(call.id).status == statuses.COMPLETED
    sentry_sdk.flush(timeout=10)
    assert sentry_sink.events(error_type=str(ErrorType.BOLNA_CALL_ERROR), call_id=str(call.id)) == []


def test_a_redial_kept_until_bolnas_answer_links_its_call_is_reported_and_asked_to_stop(sentry_sink):
    owner = customer()
    call = call_row(owner, status=statuses.INITIATING, slot_held=True)
    execution_id = str(uuid.uuid4())
    with sentry_sdk.isolation_scope():  # Bolna's webhook, before its answer to POST /call: no call for it yet
        receipt = provider_events.ingest(components().uow, {"id": execution_id, "status": "ringing", "retry_count": 1})
    assert load_event(receipt.event_id).applied_at is None

    placer = CallPlacer(components().uow, bolna=None, max_attempts=3)  # type: ignore[arg-type]: Bolna is not asked
    placer.link_execution(call.id, PlacedCall(execution_id, "queued", duration_ms=1.0))

    assert load_event(receipt.event_id).applied_at is not None
    assert load_call(call.id).status == "queued", "a redial's status is not applied"
    sentry_sdk.flush(timeout=10)
    (reported,) = sentry_sink.events(error_type=str(ErrorType.BOLNA_REDIALLED), call_id=str(call.id))
    assert reported.payload["contexts"]["redial_details"]["stop_requested"] is True
    with components().uow() as uow:
        announced = uow.session.scalars(
            select(OutboxMessage.message_type).where(OutboxMessage.body["call_id"].astext == str(call.id))
        ).all()
    assert announced == [MessageType.EXECUTION_STOP], "Bolna is asked to stop the redial"


class _BolnaRecordCatchingUp:
    """Bolna's records of an execution, one per GET /executions/{id}, in order."""

    def __init__(self, *answers: dict):
        self.answers = list(answers)

    def get_execution(self, execution_id: str) -> dict:
        return {"id": execution_id, **self.answers.pop(0)}


NOT_COMPLETED_YET = {"status": "call-disconnected"}
WRITTEN = {"status": statuses.COMPLETED, "telephony_data": {"duration": "61"}}


def _completed_without_duration() -> tuple[Call, int]:
    """A live call whose `completed` came without its duration: stored, waiting for the queue-processor."""
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="in-progress", execution_id=execution_id, slot_held=True)
    receipt = provider_events.ingest(components().uow, {"id": execution_id, "status": statuses.COMPLETED})
    return call, receipt.event_id


@pytest.mark.parametrize("record", [NOT_COMPLETED_YET, {"status": statuses.COMPLETED}], ids=["live", "no-duration"])
def test_a_completed_without_its_duration_waits_for_bolnas_record_to_catch_up_and_is_billed_from_it(record):
    call, event_id = _completed_without_duration()
    bolna = _BolnaRecordCatchingUp(record, WRITTEN)

    provider_events.process(components().uow, event_id, bolna)  # type: ignore[arg-type]
    waiting = load_event(event_id)
    assert waiting.applied_at is None and waiting.attempts == 2 and waiting.next_attempt_at is not None
    assert (load_call(call.id).status, ledger_total(call.user_id)) == ("in-progress", (0, 0))

    provider_events.process(components().uow, event_id, bolna)  # type: ignore[arg-type]
    billed = load_call(call.id)
    assert (billed.status, billed.duration_seconds, billed.error_type) == ("completed", 61, None)
    assert ledger_total(call.user_id) == (1, -2) and bolna.answers == []


def test_a_completed_sent_again_with_the_duration_the_stored_copy_lacks_is_billed_from_it():
    call, event_id = _completed_without_duration()
    again = {"id": call.execution_id, "status": statuses.COMPLETED, "telephony_data": {"duration": "61"}}
    receipt = provider_events.ingest(components().uow, again)
    assert receipt.event_id is None, "a duplicate of the stored event"
    billed = load_call(call.id)
    assert (billed.status, billed.duration_seconds, billed.error_type) == ("completed", 61, None)
    assert ledger_total(call.user_id) == (1, -2)
    assert load_event(event_id).applied_at is not None


class _BolnaDown:
    """Bolna cannot be asked: it answers `status_code`, and says nothing of the execution."""

    def __init__(self, status_code: int) -> None:
        self.status_code = status_code
        self.asked = 0

    def get_execution(self, execution_id: str) -> dict:
        self.asked += 1
        raise BolnaError(f"/executions/{execution_id}", "no", status_code=self.status_code)


@pytest.mark.parametrize("status_code", [503, 403, 200], ids=["down", "Callflow's key refused", "unreadable"])
def test_a_completed_waiting_for_its_duration_while_bolna_cannot_be_asked_is_tried_again_later_and_later(status_code):
    call, event_id = _completed_without_duration()
    bolna = _BolnaDown(status_code)
    for tries in (1, 2):
        provider_events.process(components().uow, event_id, bolna)  # type: ignore[arg-type]
        waiting = load_event(event_id)
        assert (waiting.applied_at, waiting.attempts, bolna.asked) == (None, 1 + tries, tries)
        assert "Bolna cannot be asked" in waiting.last_error
    assert event_id not in provider_events.unapplied_event_ids(components().uow, 0, limit=1_000_000), "not due yet"
    with components().uow() as uow:
        delay = uow.session.scalar(select(WebhookEvent.next_attempt_at - func.now()).where(WebhookEvent.id == event_id))
    assert timedelta(0) < delay <= timedelta(seconds=8), "2^3 s after the third failed try"
    assert (load_call(call.id).status, ledger_total(call.user_id)) == ("in-progress", (0, 0))


def test_a_completed_that_waited_past_the_limit_for_a_bolna_that_cannot_be_asked_is_completed_unbilled(sentry_sink):
    call, event_id = _completed_without_duration()
    with components().uow() as uow:  # received longer ago than it may wait
        old = func.now() - provider_events.BOLNA_UNREACHABLE_LIMIT - timedelta(minutes=1)
        uow.session.execute(update(WebhookEvent).where(WebhookEvent.id == event_id).values(received_at=old))
        uow.commit()
    provider_events.process(components().uow, event_id, _BolnaDown(403))  # type: ignore[arg-type]
    ended = load_call(call.id)
    assert (ended.status, ended.error_type, ended.credits_charged) == ("completed", "billing_duration_missing", None)
    sentry_sdk.flush(timeout=10)
    assert sentry_sink.events(error_type=str(ErrorType.BILLING_DURATION_MISSING), call_id=str(call.id))


@pytest.mark.parametrize(
    ("record", "waited"),
    [
        ({"status": "call-disconnected"}, True),
        ({"status": statuses.FAILED}, False),
        ({**WRITTEN, "retry_count": 1}, False),  # Bolna redialled: its record is now the redial's
    ],
    ids=["still live once it waited", "final", "a redial's"],
)
def test_a_completed_bolnas_record_gives_no_duration_for_is_completed_unbilled_and_reported(record, waited):
    call, event_id = _completed_without_duration()
    if waited:  # as long as a record may lag
        with components().uow() as uow:
            received = WebhookEvent.received_at - provider_events.BOLNA_RECORD_LAG
            uow.session.execute(update(WebhookEvent).where(WebhookEvent.id == event_id).values(received_at=received))
            uow.commit()

    provider_events.process(components().uow, event_id, _BolnaRecordCatchingUp(record))  # type: ignore[arg-type]
    unbilled = load_call(call.id)
    assert (unbilled.status, unbilled.error_type) == ("completed", ErrorType.BILLING_DURATION_MISSING)
    assert ledger_total(call.user_id) == (0, 0) and load_event(event_id).applied_at is not None


def test_a_redials_completed_without_a_duration_is_reported_at_once_not_held_for_bolnas_record(sentry_sink):
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="no-answer", execution_id=execution_id)
    redial = {"id": execution_id, "status": statuses.COMPLETED, "retry_count": 1}
    with sentry_sdk.isolation_scope():
        receipt = provider_events.ingest(components().uow, redial)
    assert load_event(receipt.event_id).applied_at is not None, "nothing of a redial is billed: no duration awaited"
    sentry_sdk.flush(timeout=10)
    (reported,) = sentry_sink.events(error_type=str(ErrorType.BOLNA_REDIALLED), call_id=str(call.id))
    assert reported.payload["contexts"]["redial_details"]["duration_seconds"] is None
    assert (load_call(call.id).status, ledger_total(owner.user_id)) == ("no-answer", (0, 0))
