"""What README and docs/reliability.md promise, each checked where it can fail: what Bolna receives, how tokens
are kept, what another customer's call and a deep body are answered, the idempotency-key purge, and SIGTERM."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pika
import pytest
from sqlalchemy import func, select, text, update

from shared.bolna.execution import CONTEXT_CALL_ID_KEY
from shared.bootstrap import Components, build_components
from shared.calls import lifecycle
from shared.cli import accounts
from shared.core import migrate
from shared.core.config import Settings
from shared.core.models import Call, IdempotencyKey, User
from shared.http.gunicorn_config import FLUSH_SECONDS
from shared.messaging.topology import DISPATCH_QUEUE, EVENTS_EXCHANGE, MessageType, open_channel
from tests.conftest import WEBHOOK_SECRET
from tests.support.components import components
from tests.support.factories import Customer, customer
from tests.support.isolation import Isolation
from tests.support.processes import ServiceProcess, free_port
from tests.support.sentry_sink import SentrySink
from tests.support.stack import BOLNA_API_KEY, Stack, sentry_env, wait_until

PHONE = "+14155550123"
DOCUMENTED_MAX_DEPTH = 32  # docs/reliability.md: "nesting over 32 levels ... (400)"
DOCUMENTED_KEY_RETENTION = timedelta(hours=24)  # README: a retry with the same key replays "for 24 h"


def _body(owner: Customer, **overrides: Any) -> dict[str, Any]:
    return {"agentId": str(owner.agent_id), "phoneNumber": PHONE, **overrides}


def _masked(api_key: str) -> str:
    return "*" * (len(api_key) - 4) + api_key[-4:]


def _sent_to_bolna_for(stack: Stack, call_id: str) -> list[dict[str, Any]]:
    """The `POST /call` requests the simulator received for one of our calls (found by the id we send along)."""
    return [
        request
        for request in stack.sim_requests()
        if request["path"] == "/call"
        and isinstance(request["body"], dict)
        and (request["body"].get("user_data") or {}).get(CONTEXT_CALL_ID_KEY) == call_id
    ]


class TestWhatBolnaReceives:
    def test_a_call_sends_its_metadata_as_user_data_with_our_call_id_no_auto_retry_and_the_api_key(self, stack: Stack):
        owner = customer(max_concurrent_calls=1)
        first_metadata = {"first_name": "Ada", "order": {"id": 7, "items": ["lamp", "desk"]}}
        placed = stack.api("POST", "/api/calls", headers=owner.auth, json=_body(owner, metadata=first_metadata))
        queued = stack.api("POST", "/api/calls", headers=owner.auth, json=_body(owner, metadata={"first_name": "Bo"}))
        assert (placed.status_code, queued.status_code) == (201, 202), "one placed at once, one by the queue"
        queued_id = queued.json()["callId"]
        wait_until(lambda: _sent_to_bolna_for(stack, queued_id), 30, "the queue-processor places the queued call")

        for answer, metadata in ((placed, first_metadata), (queued, {"first_name": "Bo"})):
            call_id = answer.json()["callId"]
            (request,) = _sent_to_bolna_for(stack, call_id)
            assert request["method"] == "POST"
            assert request["body"] == {
                "agent_id": owner.provider_agent_id,
                "recipient_phone_number": PHONE,
                "user_data": {**metadata, CONTEXT_CALL_ID_KEY: call_id},
                "retry_config": {"enabled": False},
            }
            assert request["authorization"] == f"Bearer {_masked(BOLNA_API_KEY)}"


class TestSecurity:
    def test_an_api_token_is_stored_only_as_its_sha256_hash(self, stack: Stack):
        callctl = Path(sys.executable).parent / "callctl"
        created = subprocess.run(
            [str(callctl), "users", "create", "--email", f"{uuid.uuid4().hex[:12]}@example.com", "--json"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        user = json.loads(created.stdout)
        token = user["api_token"]

        with components().uow() as uow:
            stored_hash = uow.session.get_one(User, uuid.UUID(user["id"])).api_token_hash
            tables = uow.session.scalars(
                text("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
            ).all()
            rows_with_the_token = {
                table: uow.session.scalar(
                    text(f'SELECT count(*) FROM "{table}" AS row WHERE row::text LIKE :token'), {"token": f"%{token}%"}
                )
                for table in tables
            }
        assert stored_hash == hashlib.sha256(token.encode()).hexdigest()
        assert set(rows_with_the_token.values()) == {0}, rows_with_the_token
        unknown_call = stack.api("GET", f"/api/calls/{uuid.uuid4()}", headers={"Authorization": f"Bearer {token}"})
        assert unknown_call.status_code == 404, "the token the operator was shown is the one that works"

    def test_the_webhook_secret_in_bolnas_url_never_reaches_the_access_log(self, stack: Stack):
        request_id = f"webhook-{uuid.uuid4().hex}"
        webhook = {"id": str(uuid.uuid4()), "status": "queued"}
        assert stack.webhook(webhook, headers={"X-Request-ID": request_id}).status_code == 200
        log = stack.webhook_receiver.log_path
        wait_until(lambda: request_id in log.read_text(), 10, "the webhook's access line is written")
        (line,) = [line for line in log.read_text().splitlines() if request_id in line]
        assert '"POST /webhooks/bolna HTTP/1.1" 200' in line
        assert WEBHOOK_SECRET not in log.read_text()

    def test_another_customers_call_is_answered_byte_for_byte_like_a_missing_one(self, stack: Stack):
        owner, intruder = customer(), customer()
        theirs = stack.api("POST", "/api/calls", headers=owner.auth, json=_body(owner)).json()["callId"]
        missing = str(uuid.uuid4())
        same_request_id = {**intruder.auth, "X-Request-ID": f"peek-{uuid.uuid4().hex}"}

        def answer_for(call_id: str) -> tuple[int, dict[str, str], bytes]:
            """The whole answer, with the id asked for written as `<id>`: the one difference a client causes."""
            answer = stack.api("GET", f"/api/calls/{call_id}", headers=same_request_id)
            headers = {name: value for name, value in answer.headers.items() if name.lower() != "date"}
            return answer.status_code, headers, answer.content.replace(call_id.encode(), b"<id>")

        assert answer_for(theirs) == answer_for(missing)
        assert answer_for(missing)[0] == 404

    def test_an_api_body_nested_over_32_levels_is_400_and_one_of_32_levels_is_accepted(self, stack: Stack):
        owner = customer(max_concurrent_calls=5)

        def nested(levels: int) -> dict[str, Any]:
            """Objects inside objects, `levels` deep."""
            value: dict[str, Any] = {}
            for _ in range(levels - 1):
                value = {"next": value}
            return value

        def place(levels: int) -> httpx.Response:  # the body is one level, its metadata the rest
            return stack.api("POST", "/api/calls", headers=owner.auth, json=_body(owner, metadata=nested(levels - 1)))

        def webhook(levels: int) -> httpx.Response:
            return stack.webhook({"id": str(uuid.uuid4()), "status": "queued", "extra": nested(levels - 1)})

        assert place(DOCUMENTED_MAX_DEPTH).status_code == 201
        assert webhook(DOCUMENTED_MAX_DEPTH).status_code == 200
        deep_array = b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        for answer in (
            place(DOCUMENTED_MAX_DEPTH + 1),
            stack.api("POST", "/api/calls", headers=owner.auth, content=deep_array),
        ):
            assert answer.status_code == 400, answer.text
            assert answer.json()["error_type"] == "validation_error"
        assert "nested deeper than 32 levels" in place(DOCUMENTED_MAX_DEPTH + 1).json()["detail"]
        # An authenticated webhook is never refused for its content: what lies deeper is stored as null.
        assert webhook(DOCUMENTED_MAX_DEPTH + 1).status_code == 200


def test_idempotency_keys_are_purged_once_24_hours_old(stack: Stack):
    owner = customer(max_concurrent_calls=5)
    old_key, fresh_key = f"old-{uuid.uuid4()}", f"fresh-{uuid.uuid4()}"
    for key in (old_key, fresh_key):
        answer = stack.api("POST", "/api/calls", headers={**owner.auth, "Idempotency-Key": key}, json=_body(owner))
        assert answer.status_code == 201

    def keys() -> set[str]:
        with components().uow() as uow:
            return set(uow.session.scalars(select(IdempotencyKey.key).where(IdempotencyKey.user_id == owner.user_id)))

    with components().uow() as uow:
        uow.session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.user_id == owner.user_id, IdempotencyKey.key == old_key)
            .values(created_at=func.now() - DOCUMENTED_KEY_RETENTION - timedelta(minutes=1))
        )
        uow.commit()
    # The retention job runs at start, then every RETENTION_INTERVAL_SECONDS (an hour): restarted, the
    # queue-processor runs it over the key just aged.
    stack.queue_processor.stop()
    stack.queue_processor.start()
    wait_until(lambda: old_key not in keys(), 30, "the retention job deletes the key older than 24 h")
    assert keys() == {fresh_key}


class HeldSentry:
    """A slow Sentry in front of the sink: every envelope waits until `release()`, then reaches the sink."""

    def __init__(self, sink: SentrySink):
        self.arrived = 0
        self._released = threading.Event()
        self._lock = threading.Lock()
        parts = urlsplit(sink.dsn)
        sink_url = f"{parts.scheme}://{parts.hostname}:{parts.port}"
        held = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
                held.hold()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                forwarded = {
                    name: self.headers[name] for name in ("Content-Type", "Content-Encoding") if name in self.headers
                }
                answer = httpx.post(f"{sink_url}{self.path}", content=body, headers=forwarded)
                self.send_response(answer.status_code)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def dsn(self) -> str:
        return f"http://public@127.0.0.1:{self._server.server_port}/1"

    def hold(self) -> None:
        with self._lock:
            self.arrived += 1
        self._released.wait(60)

    def release(self) -> None:
        self._released.set()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass(frozen=True)
class OwnBackend:
    """A database and a vhost no other process uses."""

    isolation: Isolation
    components: Components

    @property
    def env(self) -> dict[str, str]:
        return {"DATABASE_URL": self.isolation.database_url, "RABBITMQ_URL": self.isolation.rabbitmq_url}

    def customer(self) -> Customer:
        created = accounts.create_user(self.components.uow, f"{uuid.uuid4().hex[:12]}@example.com", 100, 2)
        provider_agent_id = str(uuid.uuid4())
        agent = accounts.create_agent(self.components.uow, created.user.id, "Test agent", provider_agent_id)
        return Customer(created.user.id, created.api_token, agent.id, provider_agent_id)

    def call(self, call_id: uuid.UUID) -> Call:
        with self.components.uow() as uow:
            return uow.session.get_one(Call, call_id)


@pytest.fixture(scope="module")
def own_backend() -> Iterator[OwnBackend]:
    """The e2e stack's queue-processor shares the run's dispatch queue: it would take the message handed here."""
    isolation = Isolation.new()
    isolation.create()
    try:
        migrate.upgrade(isolation.database_url)
        built = build_components(Settings(database_url=isolation.database_url, rabbitmq_url=isolation.rabbitmq_url))
        yield OwnBackend(isolation, built)
        built.engine.dispose()
    finally:
        isolation.destroy()


BOLNA_LATENCY_SECONDS = 5  # how long each `POST /call` stays in flight at the slow Bolna
# The SDK's own exit hook waits 2 s for what is unsent; the service's flush on SIGTERM waits FLUSH_SECONDS. A Sentry
# that answers in between receives the event only when the service flushes.
SDK_EXIT_HOOK_SECONDS = 2
SLOW_SENTRY_SECONDS = (SDK_EXIT_HOOK_SECONDS + FLUSH_SECONDS) / 2


def _slow_bolna(tmp_path: Path) -> ServiceProcess:
    sim_env = {
        "SIM_API_KEY": BOLNA_API_KEY,
        "SIM_LATENCY_MS": str(BOLNA_LATENCY_SECONDS * 1000),
        "SIM_WEBHOOK_DROP_RATE": "1",  # the calls placed here have no webhook receiver
    }
    return ServiceProcess("services.bolna_simulator", free_port(), sim_env, tmp_path)


def _service_env(backend: OwnBackend, bolna: ServiceProcess, sink: SentrySink) -> dict[str, str]:
    return {
        **backend.env,
        **sentry_env(sink),
        "BOLNA_API_URL": bolna.url,
        "BOLNA_API_KEY": BOLNA_API_KEY,
        "BOLNA_TIMEOUT_SECONDS": str(BOLNA_LATENCY_SECONDS * 3),
    }


def _calls_received(bolna: ServiceProcess) -> int:
    requests = httpx.get(f"{bolna.url}/_sim/requests").json()["requests"]
    return sum(request["path"] == "/call" for request in requests)


class TestSigterm:
    """SIGTERM while work is in flight, on processes of their own: the stack's processes are never signalled."""

    def test_the_api_finishes_the_request_in_flight_sends_what_sentry_still_holds_and_exits_0(
        self, own_backend: OwnBackend, tmp_path: Path
    ):
        sink = SentrySink().start()
        held = HeldSentry(sink)
        bolna = _slow_bolna(tmp_path)
        # One worker: the events below wait in one SDK's queue.
        env = {**_service_env(own_backend, bolna, sink), "SENTRY_DSN": held.dsn, "WEB_CONCURRENCY": "1"}
        api = ServiceProcess("services.call_initiator", free_port(), env, tmp_path)
        owner, first_intruder, last_intruder = (own_backend.customer() for _ in range(3))
        with own_backend.components.uow() as uow:
            theirs = Call(user_id=owner.user_id, agent_id=owner.agent_id, phone_number=PHONE, status="completed")
            uow.session.add(theirs)
            uow.commit()

        def peek(intruder: Customer) -> httpx.Response:  # a security event, reported as it happens
            return httpx.get(f"{api.url}/api/calls/{theirs.id}", headers=intruder.auth)

        try:
            bolna.start()
            api.start()
            assert peek(first_intruder).status_code == 404
            wait_until(lambda: held.arrived, 30, "the SDK's sender waits on Sentry; what follows queues behind")
            with ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(
                    httpx.post, f"{api.url}/api/calls", headers=owner.auth, json=_body(owner), timeout=60
                )
                wait_until(lambda: _calls_received(bolna), 30, "the API is waiting on Bolna")
                assert peek(last_intruder).status_code == 404  # the event raised just before SIGTERM
                assert not in_flight.done(), "Bolna is slow enough that the request is in flight at SIGTERM"
                api.process.send_signal(signal.SIGTERM)
                wait_until(
                    lambda: "Worker exiting" in api.logs() or api.process.poll() is not None,
                    30,
                    "the worker finished its requests",
                )
                time.sleep(SLOW_SENTRY_SECONDS)  # Sentry is slow to answer, not a wait for an outcome
                held.release()
                exit_code = api.process.wait(30)
                placed = in_flight.result()
        finally:
            held.release()
            api.stop()
            bolna.stop()
            held.stop()
            sink.stop()
        assert exit_code == 0
        assert placed.status_code == 201, placed.text
        assert own_backend.call(uuid.UUID(placed.json()["callId"])).execution_id == placed.json()["executionId"]
        flushed = sink.events(error_type="unauthorized_call_access", user_id=str(last_intruder.user_id))
        assert len(flushed) == 1, "the event raised just before SIGTERM was sent before the process exited"

    def test_the_queue_processor_finishes_the_message_in_hand_acks_it_and_exits_0(
        self, own_backend: OwnBackend, tmp_path: Path
    ):
        sink = SentrySink().start()
        bolna = _slow_bolna(tmp_path)
        # The jobs run once at start, then not for an hour: only the message can place the call.
        jobs_once = {"SWEEP_INTERVAL_SECONDS": "3600", "PENDING_SWEEP_INTERVAL_SECONDS": "3600"}
        env = {**_service_env(own_backend, bolna, sink), **jobs_once}
        worker = ServiceProcess("services.queue_processor", free_port(), env, tmp_path)
        owner = own_backend.customer()

        def swept_once() -> bool:
            check_ins = sink.of_type("check_in")
            return any(
                (c.payload["monitor_slug"], c.payload["status"]) == ("callflow-sweep-pending-calls", "ok")
                for c in check_ins
            )

        try:
            bolna.start()
            worker.start()
            wait_until(swept_once, 30, "the periodic jobs' first round ran")
            with open_channel(own_backend.isolation.rabbitmq_url) as channel:
                # Dead-lettered and reported first: the event raised just before SIGTERM.
                poison = pika.BasicProperties(type=MessageType.CALL_QUEUED, message_id=str(uuid.uuid4()))
                channel.basic_publish(EVENTS_EXCHANGE, MessageType.CALL_QUEUED, b"not json", poison)
            with own_backend.components.uow() as uow:
                call = Call(user_id=owner.user_id, agent_id=owner.agent_id, phone_number=PHONE, status="pending")
                uow.session.add(call)
                uow.session.flush()
                lifecycle.queue(call)
                uow.commit()
            wait_until(lambda: _calls_received(bolna), 30, "the consumer is waiting on Bolna")
            assert own_backend.call(call.id).execution_id is None, "the message is in hand at SIGTERM"
            worker.process.send_signal(signal.SIGTERM)
            exit_code = worker.process.wait(30)
            bolna_calls = _calls_received(bolna)
        finally:
            worker.stop()
            bolna.stop()
            sink.stop()
        assert exit_code == 0
        placed = own_backend.call(call.id)
        assert (placed.status, placed.slot_held) == ("queued", True)
        assert placed.execution_id is not None
        assert bolna_calls == 1
        with open_channel(own_backend.isolation.rabbitmq_url) as channel:
            left = channel.queue_declare(DISPATCH_QUEUE, passive=True).method.message_count
        assert left == 0, "the message was acknowledged, not left to be redelivered"
        assert len(sink.events(error_type="message_dead_lettered")) == 1
