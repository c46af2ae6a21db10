"""What reaches Sentry, read from the real envelopes the real service processes send over HTTP."""

from __future__ import annotations

import ipaddress
import random
import re
import time
import uuid

import httpx
import pika
import pytest
from sqlalchemy import text

from shared.core.errors import ERROR_TABLE, ErrorType
from shared.messaging.publisher import Envelope
from shared.messaging.topology import EVENTS_EXCHANGE, MessageType
from tests.conftest import WEBHOOK_SECRET
from tests.support import broker
from tests.support.components import components
from tests.support.factories import Customer, call_row, credits_of, customer, ledger_total, load_call
from tests.support.faults import failing_writes
from tests.support.processes import ServiceProcess, free_port
from tests.support.sentry_sink import Item, SentrySink
from tests.support.stack import BOLNA_API_KEY, Stack, sentry_env, wait_until

PHONE = "+14155550123"
MASKED_PHONE = "+*******0123"
REFUSES_CALLS = {"refusal_rate": 1.0}  # the simulator refuses every POST /call with a 400: nothing placed


def _place(stack: Stack, owner: Customer, request_id: str | None = None, **overrides) -> httpx.Response:
    headers = {**owner.auth, **({"X-Request-ID": request_id} if request_id else {})}
    body = {"agentId": str(owner.agent_id), "phoneNumber": PHONE, **overrides}
    return stack.api("POST", "/api/calls", headers=headers, json=body)


def _the_event(sentry: SentrySink, error_type: ErrorType, **tags: str) -> Item:
    events = sentry.wait_for_events(error_type=str(error_type), **tags)
    assert len(events) == 1, f"{error_type} arrived {len(events)} times for {tags}"
    return events[0]


def _assert_reported(event: Item, error_type: ErrorType, service: str, place: str) -> dict:
    spec = ERROR_TABLE[error_type]
    payload = event.payload
    assert payload["level"] == spec.level
    assert event.tags["error_type"] == error_type
    assert event.tags["severity"] == spec.severity
    assert event.tags["service"] == service
    assert payload["fingerprint"] == [str(error_type), place]
    return payload["contexts"]


@pytest.mark.parametrize(
    ("error_type", "make_owner", "overrides"),
    [
        (ErrorType.AGENT_NOT_FOUND, customer, {"agentId": str(uuid.uuid4())}),
        (ErrorType.AGENT_NOT_CONFIGURED, lambda: customer(configured=False), {}),
    ],
)
def test_api_configuration_errors_arrive_once(stack, error_type, make_owner, overrides):
    owner = make_owner()
    assert _place(stack, owner, **overrides).status_code == ERROR_TABLE[error_type].http_status
    event = _the_event(stack.sentry, error_type, user_id=str(owner.user_id))
    _assert_reported(event, error_type, "call-initiator", "/api/calls")
    assert event.tags["agent_id"]


def test_cross_user_agent_access_arrives_once_as_a_security_event(stack):
    owner, intruder = customer(), customer()
    assert _place(stack, intruder, agentId=str(owner.agent_id)).status_code == 403
    event = _the_event(stack.sentry, ErrorType.UNAUTHORIZED_AGENT_ACCESS, user_id=str(intruder.user_id))
    _assert_reported(event, ErrorType.UNAUTHORIZED_AGENT_ACCESS, "call-initiator", "/api/calls")
    assert event.tags["category"] == "security"
    assert event.tags["agent_id"] == str(owner.agent_id)


def test_bolna_failure_arrives_once_with_call_and_provider_context(sim):
    owner = customer()
    sim.sim_config(**REFUSES_CALLS)  # Bolna's definite 400 (a 5xx is ambiguous: the call waits, see below)
    answer = _place(sim, owner)
    assert answer.status_code == 502
    event = _the_event(sim.sentry, ErrorType.BOLNA_API_FAILURE, user_id=str(owner.user_id))
    contexts = _assert_reported(event, ErrorType.BOLNA_API_FAILURE, "call-initiator", "/api/calls")
    call_id = answer.json()["callId"]
    assert event.tags["call_id"] == call_id
    assert contexts["call_details"] == {
        "userId": str(owner.user_id),
        "agentId": str(owner.agent_id),
        "callId": call_id,
        "phone": MASKED_PHONE,
    }
    assert contexts["bolna_api"]["endpoint"] == "/call"
    assert contexts["bolna_api"]["status_code"] == 400
    assert contexts["bolna_api"]["error_message"]
    assert contexts["bolna_api"]["duration_ms"] >= 0
    assert event.trace_id == sim.call(owner.auth, call_id)["traceId"]
    breadcrumbs = [crumb.get("message") for crumb in event.payload["breadcrumbs"]["values"]]
    assert "Starting call initiation" in breadcrumbs and "Calling Bolna.ai API" in breadcrumbs


def _from_a_fresh_address() -> httpx.Client:
    """A client whose requests come from an address of 127.0.0.0/8 that no other test uses: unauthenticated errors
    are sent once per source address a minute, and other tests of the shared stack post bad tokens too."""
    address = ipaddress.ip_address("127.0.0.0") + random.randrange(2, 2**24 - 1)
    return httpx.Client(transport=httpx.HTTPTransport(local_address=str(address)), timeout=30)


@pytest.mark.parametrize(
    ("error_type", "payload", "token"),
    [
        (ErrorType.WEBHOOK_AUTH_FAILED, {"id": "x", "status": "ringing"}, "wrong"),
        (ErrorType.EMPTY_WEBHOOK_PAYLOAD, {}, WEBHOOK_SECRET),
        (ErrorType.MISSING_EXECUTION_ID, {"status": "ringing"}, WEBHOOK_SECRET),
        (ErrorType.INVALID_WEBHOOK_PAYLOAD, {"id": "x", "state": "ringing"}, WEBHOOK_SECRET),
    ],
)
def test_webhook_errors_arrive_once(stack, error_type, payload, token):
    request_id = uuid.uuid4().hex
    with _from_a_fresh_address() as client:
        answer = client.post(
            f"{stack.webhook_receiver.url}/webhooks/bolna",
            params={"token": token},
            json=payload,
            headers={"X-Request-ID": request_id},
        )
    assert answer.status_code == ERROR_TABLE[error_type].http_status
    event = _the_event(stack.sentry, error_type, request_id=request_id)
    _assert_reported(event, error_type, "webhook-receiver", "/webhooks/bolna")


def test_a_flood_of_bad_tokens_from_one_address_is_one_event_per_worker(stack):
    request_ids = [uuid.uuid4().hex for _ in range(100)]
    with _from_a_fresh_address() as scanner:
        answers = [
            scanner.post(
                f"{stack.webhook_receiver.url}/webhooks/bolna",
                params={"token": "wrong"},
                json={"id": "x", "status": "ringing"},
                headers={"X-Request-ID": request_id},
            )
            for request_id in request_ids
        ]
    assert {answer.status_code for answer in answers} == {401}

    def flood_events() -> list[Item]:
        return [e for e in stack.sentry.events(error_type="webhook_auth_failed") if e.tags["request_id"] in request_ids]

    wait_until(flood_events, 30, "the flood's first event")
    workers = 2  # WEB_CONCURRENCY: each worker process throttles on its own
    deadline = time.monotonic() + 10
    while len(flood_events()) <= workers and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(flood_events()) <= workers


def test_queued_call_failure_arrives_once_in_the_calls_trace(sim):
    owner = customer(max_concurrent_calls=1)
    holder = str(uuid.uuid4())
    call_row(owner, status="in-progress", execution_id=holder, slot_held=True)  # the customer's one slot
    sim.sim_config(**REFUSES_CALLS)  # before a call waits: whatever places it, Bolna refuses it
    queued = _place(sim, owner)
    assert queued.status_code == 202
    # With its duration, so the slot frees as the webhook is applied.
    completed = {"id": holder, "status": "completed", "telephony_data": {"duration": "30"}}
    assert sim.webhook(completed).status_code == 200  # the slot frees: its turn
    call_id = queued.json()["callId"]
    wait_until(lambda: sim.call(owner.auth, call_id)["status"] == "failed", 30, "the queued call fails")

    event = _the_event(sim.sentry, ErrorType.DIRECT_CALL_QUEUE_FAILURE, user_id=str(owner.user_id))
    contexts = _assert_reported(event, ErrorType.DIRECT_CALL_QUEUE_FAILURE, "queue-processor", "queue.initiate_call")
    assert contexts["queue_details"]["queue_id"] == call_id
    assert contexts["queue_details"]["call_type"] == "direct"
    assert contexts["bolna_api"]["status_code"] == 400
    assert contexts["call_details"]["phone"] == MASKED_PHONE
    assert event.trace_id == sim.call(owner.auth, call_id)["traceId"]
    assert sim.sentry.events(error_type="bolna_api_failure", user_id=str(owner.user_id)) == []


def test_poison_message_is_dead_lettered_and_arrives_once(stack):
    message_id = str(uuid.uuid4())
    with broker.channel() as ch:
        ch.basic_publish(
            EVENTS_EXCHANGE,
            MessageType.CALL_QUEUED,
            b"{not json",
            pika.BasicProperties(message_id=message_id, type=MessageType.CALL_QUEUED, delivery_mode=2),
        )
    event = _the_event(stack.sentry, ErrorType.MESSAGE_DEAD_LETTERED, message_id=message_id)
    _assert_reported(event, ErrorType.MESSAGE_DEAD_LETTERED, "queue-processor", "callflow.dispatch")


def test_webhook_that_cannot_be_applied_is_reported_once_and_applied_later(stack):
    owner = customer()
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="queued", execution_id=execution_id, slot_held=True, call_metadata={"fail": 1})
    with failing_writes("calls", "NEW.metadata ? 'fail' AND NEW.status IS DISTINCT FROM OLD.status"):
        assert stack.webhook({"id": execution_id, "status": "ringing"}).status_code == 200
        event = _the_event(stack.sentry, ErrorType.WEBHOOK_PROCESSING_FAILED, execution_id=execution_id)
        # The queue-processor's retries fail the same way. Once it made a second one, it has reported (or not)
        # the first; an event it sends after that arrives after any such report.
        wait_until(lambda: _attempts_at(execution_id) >= 3, 30, "the queue-processor retries the webhook twice")
        _sentinel_event_from_the_queue_processor(stack)
        assert len(stack.sentry.events(error_type="webhook_processing_failed", execution_id=execution_id)) == 1
    contexts = _assert_reported(event, ErrorType.WEBHOOK_PROCESSING_FAILED, "webhook-receiver", "webhook.process")
    assert (event.tags["call_id"], event.tags["user_id"]) == (str(call.id), str(owner.user_id))
    assert contexts["webhook_details"]["status"] == "ringing"
    assert contexts["webhook_details"]["execution_id"] == execution_id
    wait_until(lambda: load_call(call.id).status == "ringing", 30, "the kept webhook is applied once the fault is gone")


def _attempts_at(execution_id: str) -> int:
    """How many times the webhooks of an execution were tried and failed."""
    with components().engine.connect() as conn:
        query = text("SELECT coalesce(max(attempts), 0) FROM webhook_events WHERE execution_id = :execution_id")
        return conn.execute(query, {"execution_id": execution_id}).scalar_one()


def _sentinel_event_from_the_queue_processor(stack: Stack) -> None:
    """A poison message the queue-processor reports: its SDK sends events in order, so this one comes after
    every event it reported before."""
    message_id = str(uuid.uuid4())
    with broker.channel() as ch:
        properties = pika.BasicProperties(message_id=message_id, type=MessageType.CALL_QUEUED, delivery_mode=2)
        ch.basic_publish(EVENTS_EXCHANGE, MessageType.CALL_QUEUED, b"{not json", properties)
    sentinel = stack.sentry.wait_for_events(error_type=ErrorType.MESSAGE_DEAD_LETTERED, message_id=message_id, settle=0)
    assert sentinel, "the queue-processor's sentinel event never arrived"


def test_failed_credit_deduction_is_reported_and_charged_exactly_once_later(stack):
    owner = customer(credits=10)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="in-progress", execution_id=execution_id, slot_held=True)
    completed = {"id": execution_id, "status": "completed", "telephony_data": {"duration": "90"}}
    with failing_writes("credit_ledger", f"NEW.user_id = '{owner.user_id}'", timing="BEFORE INSERT"):
        assert stack.webhook(completed).status_code == 200
        event = _the_event(stack.sentry, ErrorType.CREDIT_DEDUCTION_FAILED, call_id=str(call.id))
        assert load_call(call.id).status == "in-progress", "a completion that could not be billed is not applied"
    contexts = _assert_reported(event, ErrorType.CREDIT_DEDUCTION_FAILED, "webhook-receiver", "webhook.process")
    assert event.tags["user_id"] == str(owner.user_id)
    assert contexts["credit_details"] == {"credits": 2, "duration_seconds": 90}
    wait_until(lambda: load_call(call.id).status == "completed", 30, "the completion is applied once billing works")
    assert ledger_total(owner.user_id) == (1, -2)
    assert credits_of(owner.user_id) == 8


def test_bolna_accepted_but_not_recorded_is_call_initiation_failed(stack):
    owner = customer()
    fault = "NEW.metadata ? 'fail_link' AND NEW.execution_id IS NOT NULL AND OLD.execution_id IS NULL"
    with failing_writes("calls", fault):
        answer = _place(stack, owner, metadata={"fail_link": True})
        assert answer.status_code == 500
        assert answer.json()["error_type"] == "call_initiation_failed"
        call_id = answer.json()["callId"]
        event = _the_event(stack.sentry, ErrorType.CALL_INITIATION_FAILED, call_id=call_id)
    contexts = _assert_reported(event, ErrorType.CALL_INITIATION_FAILED, "call-initiator", "/api/calls")
    assert contexts["bolna_api"]["execution_id"] == event.tags["execution_id"]
    # The provider is calling: its webhooks link the call by our id once the database accepts them.
    wait_until(lambda: stack.call(owner.auth, call_id)["status"] == "completed", 60, "the call heals and completes")


def test_a_lost_answer_that_cannot_be_recorded_still_names_the_call_so_it_is_not_placed_again(sim):
    owner = customer()
    sim.sim_config(error_rate=1.0)  # a 5xx: Bolna may be dialling
    fault = "NEW.metadata ? 'fail_await' AND NEW.error_detail IS DISTINCT FROM OLD.error_detail"
    with failing_writes("calls", fault):
        answer = _place(sim, owner, metadata={"fail_await": True})
    assert (answer.status_code, answer.json()["error_type"]) == (500, "call_initiation_failed")
    call_id = answer.json()["callId"]
    event = _the_event(sim.sentry, ErrorType.CALL_INITIATION_FAILED, call_id=call_id)
    _assert_reported(event, ErrorType.CALL_INITIATION_FAILED, "call-initiator", "/api/calls")
    held = load_call(uuid.UUID(call_id))
    assert (held.status, held.slot_held) == ("initiating", True), "it keeps its reservation until Bolna's word"


def test_database_outage_is_reported_once_not_per_request(sentry, tmp_path):
    env = {
        **sentry_env(sentry),
        "DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/unreachable",
        "WEB_CONCURRENCY": "1",
    }
    process = ServiceProcess("services.call_initiator", free_port(), env, tmp_path)
    request_ids = [uuid.uuid4().hex for _ in range(3)]
    try:
        process.start(expected_status=503)
        url = f"{process.url}/api/calls"
        answers = [
            httpx.post(url, headers={"Authorization": "Bearer cf_x", "X-Request-ID": request_id}, json={})
            for request_id in request_ids
        ]
    finally:
        exit_code = process.stop()  # its SDK sends what it still holds on the way out: nothing can come later
    assert exit_code == 0, process.logs()
    assert [a.json()["error_type"] for a in answers] == ["database_error"] * 3
    assert {a.status_code for a in answers} == {503}
    events = [e for e in sentry.events(error_type="database_error") if e.tags.get("request_id") in request_ids]
    assert len(events) == 1, f"{len(events)} events for one outage"
    _assert_reported(events[0], ErrorType.DATABASE_ERROR, "call-initiator", "/api/calls")


def test_expected_errors_and_health_checks_are_not_sent(stack):
    quiet = {}
    owner = customer(max_concurrent_calls=1)
    quiet["unauthorized"] = stack.api("POST", "/api/calls", json={}, headers={"X-Request-ID": uuid.uuid4().hex})
    quiet["validation_error"] = _place(stack, owner, uuid.uuid4().hex, phoneNumber="12")
    quiet["insufficient_credits"] = _place(stack, customer(credits=0), uuid.uuid4().hex)
    quiet["call_not_found"] = stack.api(
        "GET", f"/api/calls/{uuid.uuid4()}", headers={**owner.auth, "X-Request-ID": uuid.uuid4().hex}
    )
    quiet["not_found"] = stack.api("GET", "/api/nope", headers={"X-Request-ID": uuid.uuid4().hex})
    _place(stack, owner)
    quiet["concurrency_limit"] = _place(stack, owner, uuid.uuid4().hex)
    assert quiet["concurrency_limit"].status_code == 202
    for process in stack.processes[:3]:
        assert httpx.get(f"{process.url}/health").status_code == 200

    sentinel = customer()
    _place(stack, sentinel, agentId=str(uuid.uuid4()))
    _the_event(stack.sentry, ErrorType.AGENT_NOT_FOUND, user_id=str(sentinel.user_id))

    request_ids = {answer.headers["X-Request-ID"] for answer in quiet.values()}
    leaked = [e for e in stack.sentry.of_type("event") if e.tags.get("request_id") in request_ids]
    assert leaked == []
    for error_type in quiet:
        assert stack.sentry.events(error_type=error_type) == [], error_type
    assert stack.sentry.transactions(lambda t: t.payload.get("transaction") == "/health") == []


def test_a_queued_call_is_one_trace_across_all_three_services(stack):
    owner = customer(max_concurrent_calls=1)
    assert _place(stack, owner).status_code == 201
    queued = _place(stack, owner)
    assert queued.status_code == 202
    call_id = queued.json()["callId"]
    wait_until(lambda: stack.call(owner.auth, call_id)["status"] == "completed", 60, "the queued call completes")
    trace_id = stack.call(owner.auth, call_id)["traceId"]
    assert trace_id and re.fullmatch(r"[0-9a-f]{32}", trace_id)

    def in_trace() -> list[Item]:
        return stack.sentry.transactions(lambda t: t.trace_id == trace_id)

    def complete() -> bool:
        ops = {t.payload["contexts"]["trace"].get("op") for t in in_trace()}
        return {"http.server", "queue.publish", "queue.process", "queue.initiate_call", "webhook.process"} <= ops

    wait_until(complete, 30, "every service's transactions for the call arrive")
    transactions = in_trace()
    assert {t.tags["service"] for t in transactions} == {"call-initiator", "queue-processor", "webhook-receiver"}

    by_op: dict[str, list[Item]] = {}
    for transaction in transactions:
        by_op.setdefault(transaction.payload["contexts"]["trace"]["op"], []).append(transaction)
    assert by_op["http.server"][0].payload["transaction"] == "/api/calls"
    # The request does not wait for the broker: its message is published after commit, in the request's trace.
    published = [t.payload["contexts"]["trace"]["data"] for t in by_op["queue.publish"]]
    assert {"messaging.system": "rabbitmq", "messaging.destination.name": f"{EVENTS_EXCHANGE}/call.queued"}.items() <= (
        published[0].items()
    )

    processed = by_op["queue.process"][0].payload["contexts"]["trace"]["data"]
    assert processed["messaging.system"] == "rabbitmq"
    assert processed["messaging.destination.name"] == "callflow.dispatch"
    assert processed["messaging.message.id"]
    assert processed["messaging.message.body.size"] > 0
    assert processed["messaging.message.retry.count"] == 0
    assert processed["messaging.message.receive.latency"] >= 0

    dispatch = by_op["queue.initiate_call"][0]
    dispatch_data = dispatch.payload["contexts"]["trace"]["data"]
    assert dispatch_data["queue_id"] == call_id and dispatch_data["call_type"] == "direct"
    span_ops = {span["op"] for span in dispatch.payload["spans"]}
    assert {"call.initiate", "http.client"} <= span_ops
    statuses_seen = {t.payload["contexts"]["trace"]["data"]["status"] for t in by_op["webhook.process"]}
    assert "completed" in statuses_seen


def test_messages_processed_back_to_back_share_no_tags_or_breadcrumbs(sim):
    first, second = customer(), customer()
    sim.sim_config(**REFUSES_CALLS)  # before the calls wait: whatever places them, Bolna refuses them
    calls = [call_row(owner) for owner in (first, second)]
    with broker.channel() as ch:
        for owner in (first, second):
            envelope = Envelope(MessageType.CALL_QUEUED, {"user_id": str(owner.user_id)})
            ch.basic_publish(EVENTS_EXCHANGE, envelope.message_type, envelope.encode(), envelope.properties())
    events = {
        owner.user_id: _the_event(sim.sentry, ErrorType.DIRECT_CALL_QUEUE_FAILURE, user_id=str(owner.user_id))
        for owner in (first, second)
    }
    for owner, call, other_owner, other_call in (
        (first, calls[0], second, calls[1]),
        (second, calls[1], first, calls[0]),
    ):
        event = events[owner.user_id]
        assert event.tags["call_id"] == str(call.id)
        text = repr(event.payload.get("breadcrumbs")) + repr(event.tags)
        assert str(other_call.id) not in text and str(other_owner.user_id) not in text
        assert str(call.id) in repr(event.payload["breadcrumbs"])


def test_periodic_jobs_check_in_with_crons(stack):
    def slugs() -> set[str]:
        return {item.payload["monitor_slug"] for item in stack.sentry.of_type("check_in")}

    expected = {
        "callflow-relay-outbox",
        "callflow-apply-kept-webhooks",
        "callflow-dispatch-due-retries",
        "callflow-schedule-campaigns",
        "callflow-sweep-pending-calls",
        "callflow-reconcile-unconfirmed-calls",
        "callflow-reconcile-silent-calls",
        "callflow-enforce-retention",
    }
    wait_until(lambda: expected <= slugs(), 30, "a check-in from each periodic job")
    statuses = {item.payload["status"] for item in stack.sentry.of_type("check_in")}
    assert "ok" in statuses and "error" not in statuses


def test_health_reports_sentry_and_start_logs_say_enabled(stack):
    for process in stack.processes[:3]:
        sentry = httpx.get(f"{process.url}/health").json()["sentry"]
        assert sentry == {
            "configured": True,
            "enabled": True,
            "environment": "development",
            "release": "callflow@test",
            "traces_sample_rate": 1.0,
            "profiles_sample_rate": 0.0,
        }
        assert "Sentry initialized: enabled: True" in process.logs(tail=None)


def test_no_envelope_holds_a_token_a_secret_a_full_phone_number_or_a_transcript(sim):
    owner = customer()
    placed = _place(sim, owner, metadata={"first_name": "Ada"})
    assert placed.status_code == 201
    wait_until(lambda: sim.call(owner.auth, placed.json()["callId"])["transcript"], 30, "a call with a transcript")
    sim.sim_config(**REFUSES_CALLS)
    assert _place(sim, owner).status_code == 502
    sim.webhook({"id": "x", "status": "ringing"}, token="not-the-secret")
    sim.sentry.wait_for_events(error_type="bolna_api_failure", user_id=str(owner.user_id))

    everything = sim.sentry.everything().decode(errors="replace")
    assert len(everything) > 10_000, "the scan needs real traffic to mean anything"
    assert WEBHOOK_SECRET not in everything
    assert BOLNA_API_KEY not in everything
    assert owner.token not in everything
    assert re.findall(r"cf_[A-Za-z0-9_-]{20,}", everything) == []
    assert "4155550123" not in everything
    transcript = sim.call(owner.auth, placed.json()["callId"])["transcript"]
    for line in transcript.splitlines():
        assert line.split(": ", 1)[-1] not in everything
    assert "Ada" not in everything
