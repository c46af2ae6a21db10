"""Callflow's edge, in process, against the stand-in for Sentry: what strangers can make it send (and what not), who
decides whether a request is traced, and what leaves for Bolna and for Sentry's logs."""

from __future__ import annotations

import ipaddress
import logging
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sentry_sdk
from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from services.call_initiator.app import create_app as create_api
from services.webhook_receiver.app import HTTP_TRANSACTIONS
from services.webhook_receiver.app import create_app as create_webhook_receiver
from services.webhook_receiver.source_checks import SourceChecks
from shared.bolna.breaker import CircuitBreaker
from shared.bolna.client import BolnaClient
from shared.bootstrap import build_components
from shared.core.config import Settings, load_settings
from shared.core.errors import CallflowError, ErrorType
from shared.core.models import Call
from shared.observability import tracing
from shared.observability.sentry import EVENTS_PER_TYPE, init_sentry, report
from tests.conftest import WEBHOOK_SECRET
from tests.support.components import components
from tests.support.factories import customer, load_call
from tests.support.sentry_sink import Item, SentrySink

PHONE = "+14155550123"
BOLNA_API_KEY = "edge-test-bolna-key-0123456789"
CLIENT_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN_ID = "b7ad6b7169203331"
# A sample rate no request should ever meet by chance (a generated sample_rand is below it one time in a million).
NEVER = 1e-6


@pytest.fixture
def sentry_sink() -> Iterator[SentrySink]:
    sink = SentrySink().start()
    try:
        yield sink
    finally:
        sentry_sdk.flush()
        init_sentry("tests", load_settings())  # back to a client that sends nothing
        sink.stop()


def _send_to(sink: SentrySink, service: str, **overrides: object) -> Settings:
    """Initialises Sentry in this process exactly as `service` does, sending everything to the sink."""
    settings = load_settings().model_copy(
        update={
            "sentry_dsn": sink.dsn,
            "sentry_send_in_development": True,
            "sentry_traces_sample_rate": 0.0,
            "sentry_profiles_sample_rate": 0.0,
            **overrides,
        }
    )
    init_sentry(service, settings, HTTP_TRANSACTIONS if service == "webhook-receiver" else True)
    return settings


def _sent(sink: SentrySink, error_type: str) -> list[Item]:
    sentry_sdk.flush()
    return sink.events(error_type=error_type)


def _webhook_receiver(settings: Settings) -> FlaskClient:
    return create_webhook_receiver(components(), SourceChecks(settings)).test_client()


def _webhook_from(client: FlaskClient, address: str, token: str = "wrong", request_id: str | None = None):
    return client.post(
        "/webhooks/bolna",
        query_string={"token": token},
        json={"id": "x", "status": "ringing"},
        headers={"X-Request-ID": request_id or uuid.uuid4().hex},
        environ_base={"REMOTE_ADDR": address},
    )


# 1. Unauthenticated traffic cannot flood Sentry.


def test_a_flood_of_bad_tokens_from_one_address_is_one_event_and_a_new_address_is_still_reported(sentry_sink):
    client = _webhook_receiver(_send_to(sentry_sink, "webhook-receiver"))
    answers = [_webhook_from(client, "203.0.113.7") for _ in range(200)]
    assert {(a.status_code, a.json["error_type"]) for a in answers} == {(401, "webhook_auth_failed")}
    assert len(_sent(sentry_sink, "webhook_auth_failed")) == 1

    request_id = uuid.uuid4().hex
    assert _webhook_from(client, "203.0.113.8", request_id=request_id).status_code == 401
    events = _sent(sentry_sink, "webhook_auth_failed")
    assert len(events) == 2
    [newcomer] = [event for event in events if event.tags["request_id"] == request_id]
    assert newcomer.payload["contexts"]["suppressed"] == {"since_last_event": 199, "since_start": 199}


def test_a_scanner_rotating_addresses_is_capped_per_error_type_and_other_errors_still_arrive(sentry_sink):
    settings = _send_to(sentry_sink, "webhook-receiver")
    client = _webhook_receiver(settings)
    first = ipaddress.ip_address("198.18.0.1")
    answers = [_webhook_from(client, str(first + n)) for n in range(200)]
    assert {a.status_code for a in answers} == {401}
    assert len(_sent(sentry_sink, "webhook_auth_failed")) == EVENTS_PER_TYPE

    allow_list = settings.model_copy(update={"webhook_allowed_ips": (ipaddress.ip_network("10.0.0.0/8"),)})
    forbidden = _webhook_from(_webhook_receiver(allow_list), "192.0.2.1", token=WEBHOOK_SECRET)
    assert (forbidden.status_code, forbidden.json["error_type"]) == (403, "webhook_source_forbidden")
    assert len(_sent(sentry_sink, "webhook_source_forbidden")) == 1

    report(CallflowError(ErrorType.CREDIT_DEDUCTION_FAILED, "a real failure after the flood"))
    assert len(_sent(sentry_sink, "credit_deduction_failed")) == 1


def test_an_allowed_ipv4_source_seen_as_an_ipv4_mapped_ipv6_address_is_allowed():
    settings = load_settings().model_copy(update={"webhook_allowed_ips": (ipaddress.ip_network("10.0.0.0/8"),)})
    client = _webhook_receiver(settings)
    allowed = _webhook_from(client, "::ffff:10.1.2.3", token=WEBHOOK_SECRET)
    assert allowed.status_code == 200, allowed.json
    refused = _webhook_from(client, "::ffff:192.0.2.1", token=WEBHOOK_SECRET)
    assert (refused.status_code, refused.json["error_type"]) == (403, "webhook_source_forbidden")


@pytest.mark.parametrize(
    ("body", "execution_id"),
    [(b'{"id": "exec-1", "state": "completed"}', "exec-1"), (b'{"id": "exec-2", "status": 7}', "exec-2"), (b"{", None)],
    ids=["no status", "a status that is no string", "not JSON"],
)
def test_an_authenticated_webhook_that_cannot_be_used_is_refused_and_reported(sentry_sink, body, execution_id):
    client = _webhook_receiver(_send_to(sentry_sink, "webhook-receiver"))
    answer = client.post("/webhooks/bolna", query_string={"token": WEBHOOK_SECRET}, data=body)
    assert (answer.status_code, answer.json["error_type"]) == (400, "invalid_webhook_payload")
    (event,) = _sent(sentry_sink, "invalid_webhook_payload")
    assert event.tags.get("execution_id") == execution_id, "Bolna sends it again: which execution it is about"


# 2. The edge makes its own sampling decision; internal hops keep their parent's; Bolna gets no trace headers.

FORCING_HEADERS = {
    "the sampled flag": {"sentry-trace": f"{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-1"},
    "a sample_rand under any rate": {
        "sentry-trace": f"{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}",
        "baggage": f"sentry-trace_id={CLIENT_TRACE_ID},sentry-sample_rand=0.000000,sentry-sample_rate=1.0",
    },
}
EDGE_REQUESTS = {
    "call-initiator": lambda headers: (
        create_api(components()).test_client().get(f"/api/calls/{uuid.uuid4()}", headers=headers)
    ),
    "webhook-receiver": lambda headers: _webhook_receiver(components().settings).post(
        "/webhooks/bolna", query_string={"token": WEBHOOK_SECRET}, json={}, headers=headers
    ),
}


@pytest.mark.parametrize("forcing", FORCING_HEADERS.values(), ids=FORCING_HEADERS.keys())
def test_a_clients_trace_headers_cannot_force_sampling(sentry_sink, forcing):
    """The call-initiator's requests are sampled at the rate (a webhook's request never is: the next tests)."""
    _send_to(sentry_sink, "call-initiator", sentry_traces_sample_rate=NEVER)
    for _ in range(5):
        EDGE_REQUESTS["call-initiator"](forcing)
    sentry_sdk.flush()
    assert sentry_sink.transactions() == []


@pytest.mark.parametrize("service", EDGE_REQUESTS.keys())
def test_a_request_at_the_edge_starts_its_own_trace(sentry_sink, service):
    """The call-initiator's request is its own transaction; the webhook-receiver's empty webhook is refused before
    any call's trace is known, and its event is in the request's own trace."""
    _send_to(sentry_sink, service, sentry_traces_sample_rate=1.0)
    EDGE_REQUESTS[service](FORCING_HEADERS["the sampled flag"])
    sentry_sdk.flush()
    assert len(sentry_sink.transactions() + sentry_sink.events()) == 1
    [sent] = sentry_sink.of_type("transaction" if service == "call-initiator" else "event")
    trace = sent.payload["contexts"]["trace"]
    assert trace["trace_id"] != CLIENT_TRACE_ID
    assert trace.get("parent_span_id") is None


def test_webhooks_refused_before_their_call_is_known_are_each_in_a_trace_of_their_own(sentry_sink):
    """A webhook's request is no transaction, yet its events are not in the trace of the thread that served it, and
    they are grouped by its route, as the transaction was named."""
    client = _webhook_receiver(_send_to(sentry_sink, "webhook-receiver", sentry_traces_sample_rate=1.0))
    for _ in range(2):
        assert client.post("/webhooks/bolna", query_string={"token": WEBHOOK_SECRET}, json={}).status_code == 400
    sentry_sdk.flush()
    events = sentry_sink.events()
    assert len(events) == 2
    assert len({event.trace_id for event in events}) == 2
    assert all(event.trace_id for event in events)
    assert {event.payload["fingerprint"][1] for event in events} == {"/webhooks/bolna"}


def test_a_webhook_is_one_transaction_its_processing_and_its_request_is_not_a_second(sentry_sink):
    """At any sample rate, a webhook sends its `webhook.process` transaction and no `http.server` one: sampling
    both would send two transactions per webhook, doubling what Sentry costs the busiest path. Its request is no
    transaction at all, not even one built to be sampled out: the sampler is never asked about it."""
    client = _webhook_receiver(_send_to(sentry_sink, "webhook-receiver", sentry_traces_sample_rate=1.0))
    options = sentry_sdk.get_client().options
    sampler, asked = options["traces_sampler"], []
    options["traces_sampler"] = lambda context: asked.append(context) or sampler(context)
    for status in ("ringing", "in-progress"):
        webhook = {"id": f"edge-{uuid.uuid4()}", "status": status}
        assert client.post("/webhooks/bolna", query_string={"token": WEBHOOK_SECRET}, json=webhook).status_code == 200
    sentry_sdk.flush()
    assert [t.op for t in sentry_sink.transactions()] == ["webhook.process", "webhook.process"]
    assert [context["transaction_context"]["op"] for context in asked] == ["webhook.process", "webhook.process"]


def test_sql_statements_are_spans_in_a_sampled_transaction_and_breadcrumbs_in_an_unsampled_one(sentry_sink):
    engine = components().engine
    _send_to(sentry_sink, "queue-processor", sentry_traces_sample_rate=1.0)
    with sentry_sdk.start_transaction(name="sampled", op="test"), engine.connect() as conn:
        # Kept alive past the transaction, so that freeing it cannot finish a span the after-statement hook left open.
        result = conn.execute(text("SELECT 'in a sampled transaction'"))
    sentry_sdk.flush()
    del result
    [transaction] = sentry_sink.transactions()
    spans = [(span["op"], span["description"]) for span in transaction.payload["spans"]]
    assert ("db", "SELECT 'in a sampled transaction'") in spans

    _send_to(sentry_sink, "queue-processor", sentry_traces_sample_rate=NEVER)
    with sentry_sdk.isolation_scope(), sentry_sdk.start_transaction(name="unsampled", op="test") as unsampled:
        assert not unsampled.sampled
        with engine.connect() as conn:
            conn.execute(text("SELECT 'in an unsampled transaction'"))
        sentry_sdk.capture_message("after the statement")
    sentry_sdk.flush()
    assert len(sentry_sink.transactions()) == 1
    [event] = sentry_sink.events()
    crumbs = [(crumb["category"], crumb["message"]) for crumb in event.payload["breadcrumbs"]["values"]]
    assert ("query", "SELECT 'in an unsampled transaction'") in crumbs


def test_a_message_consumer_keeps_the_decision_of_the_trace_it_continues(sentry_sink):
    _send_to(sentry_sink, "queue-processor", sentry_traces_sample_rate=NEVER)
    sampled_by_the_api = {"sentry-trace": f"{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-1"}
    with tracing.process_transaction(sampled_by_the_api, "callflow.dispatch", "message-1", 10, redelivered=False):
        pass
    sentry_sdk.flush()
    [transaction] = sentry_sink.transactions()
    assert transaction.trace_id == CLIENT_TRACE_ID


class _RecordingBolna(BaseHTTPRequestHandler):
    headers_seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        self.headers_seen.append({name.lower(): value for name, value in self.headers.items()})
        body = b'{"id": "x", "status": "queued"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recording_bolna() -> Iterator[str]:
    _RecordingBolna.headers_seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingBolna)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_no_trace_header_reaches_bolna(sentry_sink, recording_bolna):
    _send_to(sentry_sink, "call-initiator", sentry_traces_sample_rate=1.0)
    bolna = BolnaClient(recording_bolna, BOLNA_API_KEY, 2.0, CircuitBreaker(5, 30), pool_size=1)
    with sentry_sdk.start_transaction(name="placing a call", op="test") as transaction:
        assert transaction.sampled
        bolna.get_execution("x")
    [headers] = _RecordingBolna.headers_seen
    assert headers["authorization"] == f"Bearer {BOLNA_API_KEY}"
    assert "sentry-trace" not in headers and "baggage" not in headers


# 4. Sentry's logs are scrubbed like its events.


def test_log_records_sent_to_sentry_are_scrubbed(sentry_sink):
    _send_to(sentry_sink, "call-initiator", sentry_enable_logs=True, bolna_api_key=BOLNA_API_KEY)
    logging.getLogger("callflow.edge-test").warning("dialling %s with key %s", PHONE, BOLNA_API_KEY)
    sentry_sdk.flush()
    assert sentry_sink.of_type("log"), "the log record never reached Sentry"
    everything = sentry_sink.everything().decode()
    assert "dialling +*******0123" in everything
    assert PHONE not in everything and BOLNA_API_KEY not in everything


# 5. The public API keeps refusing what PostgreSQL cannot store (the webhook stores it sanitized instead).


@pytest.mark.parametrize(
    ("value", "detail"), [("NaN", "NaN or Infinity"), ("-Infinity", "NaN or Infinity"), ('"\\ud800"', "Unicode")]
)
def test_the_public_api_refuses_json_postgresql_cannot_store(value, detail):
    owner = customer(credits=0)  # a body it accepted would be answered 402, before anything reaches Bolna
    raw = f'{{"agentId": "{owner.agent_id}", "phoneNumber": "{PHONE}", "metadata": {{"note": {value}}}}}'
    answer = create_api(components()).test_client().post("/api/calls", headers=owner.auth, data=raw)
    assert (answer.status_code, answer.json["error_type"]) == (400, "validation_error")
    assert detail in answer.json["detail"]


# 6. An answer that may mean a call is ringing always names the call.


class _FailingBolna(BaseHTTPRequestHandler):
    """Answers every request 500: Bolna may or may not have placed the call."""

    def do_POST(self) -> None:  # noqa: N802 (the http.server API)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(500)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_a_lost_answer_names_its_call_even_when_reading_the_call_back_fails(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FailingBolna)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = load_settings().model_copy(update={"bolna_api_url": f"http://127.0.0.1:{server.server_address[1]}"})
    api = create_api(build_components(settings)).test_client()
    owner = customer()
    read_back = Session.get_one

    def failing_for_calls(self: Session, entity: object, ident: object, **kwargs: object) -> object:
        if entity is Call:
            raise OperationalError("SELECT", {}, Exception("the database went away"))
        return read_back(self, entity, ident, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Session, "get_one", failing_for_calls)
    try:
        answer = api.post("/api/calls", headers=owner.auth, json={"agentId": str(owner.agent_id), "phoneNumber": PHONE})
    finally:
        server.shutdown()
    assert (answer.status_code, answer.json["status"]) == (202, "initiating"), answer.json
    monkeypatch.undo()
    assert load_call(uuid.UUID(answer.json["callId"])).status == "initiating", "the call it names holds its slot"
