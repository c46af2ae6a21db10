"""Reliability against the real processes: idempotency, provider retries and breaker, leases, webhook security."""

from __future__ import annotations

import base64
import json
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import func, select, update
from standardwebhooks.webhooks import Webhook

from shared.core.errors import ErrorType
from shared.core.models import Call
from shared.messaging.publisher import Envelope
from shared.messaging.topology import EVENTS_EXCHANGE, MessageType
from tests.conftest import WEBHOOK_SECRET
from tests.support import broker
from tests.support.components import components
from tests.support.factories import call_row, credits_of, customer, ledger_total, load_call
from tests.support.processes import ServiceProcess, free_port
from tests.support.sentry_sink import SentrySink
from tests.support.stack import BOLNA_API_KEY, Stack, sentry_env, wait_until

PHONE = "+14155550123"
DOCUMENTED_MAX_LEASES = 3  # docs/reliability.md: a call Bolna reports live keeps its slot "up to 3 leases"


def _body(owner, **overrides) -> dict:
    return {"agentId": str(owner.agent_id), "phoneNumber": PHONE, **overrides}


def _calls_of(user_id: uuid.UUID) -> int:
    with components().uow() as uow:
        return uow.session.scalar(select(func.count()).where(Call.user_id == user_id))


def _wake_dispatcher(user_id: uuid.UUID, message_id: str | None = None) -> None:
    envelope = Envelope(MessageType.CALL_QUEUED, {"user_id": str(user_id)}, message_id or str(uuid.uuid4()))
    with broker.channel() as ch:
        ch.basic_publish(EVENTS_EXCHANGE, envelope.message_type, envelope.encode(), envelope.properties())


def _expire_lease(call_id: uuid.UUID, leases_ago: int = 0) -> None:
    """Ends the call's lease now; with `leases_ago`, as if it had been created that many leases ago."""
    lease = timedelta(seconds=components().settings.slot_lease_seconds)
    changes = {"slot_lease_expires_at": func.now() - timedelta(seconds=1)}
    if leases_ago:
        changes["created_at"] = changes["initiated_at"] = func.now() - leases_ago * lease - timedelta(minutes=1)
    with components().uow() as uow:
        uow.session.execute(update(Call).where(Call.id == call_id).values(**changes))
        uow.commit()


def _lease_left(call_id: uuid.UUID) -> timedelta | None:
    with components().uow() as uow:
        return uow.session.scalar(select(Call.slot_lease_expires_at - func.now()).where(Call.id == call_id))


def _completed_at_bolna(execution: dict, seconds: int) -> dict:
    """Bolna's execution object as its `completed` webhook carries it, for a call that talked `seconds`."""
    telephony = {**execution["telephony_data"], "duration": str(seconds)}
    return {**execution, "status": "completed", "conversation_duration": float(seconds), "telephony_data": telephony}


class TestIdempotencyKey:
    def test_same_key_and_body_replays_the_first_answer_and_makes_one_call(self, stack: Stack):
        owner = customer()
        headers = {**owner.auth, "Idempotency-Key": f"order-{uuid.uuid4()}"}
        first = stack.api("POST", "/api/calls", headers=headers, json=_body(owner))
        again = stack.api("POST", "/api/calls", headers=headers, json=_body(owner))
        assert first.status_code == 201
        assert (again.status_code, again.json()) == (201, first.json())
        assert again.headers["Idempotent-Replayed"] == "true"
        assert _calls_of(owner.user_id) == 1

    def test_same_key_with_another_body_is_422(self, stack: Stack):
        owner = customer()
        headers = {**owner.auth, "Idempotency-Key": "k-1"}
        assert stack.api("POST", "/api/calls", headers=headers, json=_body(owner)).status_code == 201
        reused = stack.api("POST", "/api/calls", headers=headers, json=_body(owner, metadata={"x": 1}))
        assert reused.status_code == 422
        assert reused.json()["error_type"] == "idempotency_key_reused"
        assert _calls_of(owner.user_id) == 1

    def test_concurrent_requests_with_one_key_make_exactly_one_call(self, stack: Stack):
        owner = customer(max_concurrent_calls=5)
        headers = {**owner.auth, "Idempotency-Key": "burst"}
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(lambda _: stack.api("POST", "/api/calls", headers=headers, json=_body(owner)), range(8))
            )
        created = [a for a in answers if a.status_code in (201, 202) and "Idempotent-Replayed" not in a.headers]
        assert len(created) == 1
        for answer in answers:
            assert answer.status_code in (201, 202, 409), answer.text
            if answer.status_code == 409:
                assert answer.json()["error_type"] == "idempotency_key_in_progress"
            else:
                assert answer.json()["callId"] == created[0].json()["callId"]
        assert _calls_of(owner.user_id) == 1

    def test_a_failed_call_is_replayed_not_retried(self, sim: Stack):
        owner = customer()
        headers = {**owner.auth, "Idempotency-Key": "fails"}
        sim.sim_config(refusal_rate=1.0)  # Bolna's definite refusal
        first = sim.api("POST", "/api/calls", headers=headers, json=_body(owner))
        sim.sim_config(refusal_rate=0.0)
        again = sim.api("POST", "/api/calls", headers=headers, json=_body(owner))
        assert first.status_code == again.status_code == 502
        assert again.json() == first.json()
        assert again.headers["content-type"] == "application/problem+json"
        assert _calls_of(owner.user_id) == 1

    def test_malformed_key_is_400(self, stack: Stack):
        owner = customer()
        answer = stack.api(
            "POST", "/api/calls", headers={**owner.auth, "Idempotency-Key": "x" * 256}, json=_body(owner)
        )
        assert answer.status_code == 400
        assert answer.json()["error_type"] == "validation_error"


class TestProviderFailures:
    def test_queued_call_is_retried_after_a_transient_failure_then_placed(self, sim: Stack):
        owner = customer()
        # A 429 without Retry-After: Bolna did nothing, and says so. (A 5xx may follow a placed call: never retried.)
        # Set before the call exists, or the sweep may place it first.
        sim.sim_config(rate_limit_rate=1.0, retry_after_seconds=None)
        call = call_row(owner)
        _wake_dispatcher(owner.user_id)
        wait_until(lambda: load_call(call.id).dispatch_attempts == 1, 20, "a first attempt fails")
        requeued = load_call(call.id)
        assert (requeued.status, requeued.slot_held) == ("pending", False)
        assert requeued.next_attempt_at is not None
        sim.sim_config(rate_limit_rate=0.0)
        wait_until(lambda: load_call(call.id).status == "completed", 30, "the retry is placed and completes")
        assert load_call(call.id).dispatch_attempts == 1

    def test_429_is_retried_after_bolnas_retry_after(self, sim: Stack):
        owner = customer()
        sim.sim_config(rate_limit_rate=1.0, retry_after_seconds=3)
        call = call_row(owner)
        _wake_dispatcher(owner.user_id)
        wait_until(lambda: load_call(call.id).dispatch_attempts == 1, 20, "the first attempt is rate-limited")
        requeued = load_call(call.id)
        assert requeued.status == "pending"
        assert requeued.next_attempt_at - requeued.updated_at == timedelta(seconds=3)
        sim.sim_config(rate_limit_rate=0.0)
        wait_until(lambda: load_call(call.id).status == "completed", 30, "placed once Bolna allows it")

    def test_bolna_redialling_an_ended_call_on_its_own_is_stopped_before_it_dials(self, sim: Stack):
        owner = customer()
        # Bolna's auto-retry takes the unanswered call up again and dials 10 s later: Callflow has those seconds to
        # stop it.
        sim.sim_config(outcomes={"no-answer": 1.0}, redial_rate=1.0, redial_delay_seconds=10.0)
        placed = sim.api("POST", "/api/calls", headers=owner.auth, json=_body(owner))
        call_id, execution_id = placed.json()["callId"], placed.json()["executionId"]

        wait_until(lambda: sim.sim_execution(execution_id)["status"] == "stopped", 30, "Callflow stops the redial")
        (execution,) = [e for e in sim.sim_executions() if e["id"] == execution_id]
        assert (execution["retry_count"], execution["dials"]) == (1, 1), "the redial dialled nobody"
        assert sim.call(owner.auth, call_id)["status"] == "no-answer"
        assert ledger_total(owner.user_id) == (0, 0)
        reported = sim.sentry.wait_for_events(expected=2, error_type=str(ErrorType.BOLNA_REDIALLED), call_id=call_id)
        by_status = {event.payload["contexts"]["redial_details"]["status"]: event for event in reported}
        assert set(by_status) == {"scheduled", "stopped"}, "each status of the redial, and nothing else"
        assert by_status["scheduled"].tags["execution_id"] == execution_id
        assert by_status["scheduled"].payload["contexts"]["redial_details"]["stop_requested"] is True

    def test_a_redial_bolna_will_not_stop_at_first_is_asked_again(self, sim: Stack):
        owner = customer()
        # Bolna answers 500 to the stop (and to anything else but placing a call).
        sim.sim_config(
            outcomes={"no-answer": 1.0}, redial_rate=1.0, redial_delay_seconds=30.0, other_requests_error_rate=1.0
        )
        placed = sim.api("POST", "/api/calls", headers=owner.auth, json=_body(owner))
        execution_id = placed.json()["executionId"]

        def asked_to_stop() -> int:
            return sum(1 for r in sim.sim_requests() if r["path"] == f"/call/{execution_id}/stop")

        def execution() -> dict:
            (found,) = [e for e in sim.sim_executions() if e["id"] == execution_id]
            return found

        wait_until(lambda: asked_to_stop() >= 1, 30, "Callflow asks Bolna to stop the redial")
        sim.sim_config(other_requests_error_rate=0.0)
        wait_until(lambda: execution()["status"] == "stopped", 30, "asked again, it stops")
        assert (execution()["dials"], asked_to_stop() >= 2) == (1, True)

    def test_a_queued_call_waits_while_bolna_refuses_callflows_key(self, sim: Stack):
        owner = customer()
        sim.sim_config(api_key="a-key-callflow-does-not-have")  # Bolna answers 403
        call = call_row(owner)
        _wake_dispatcher(owner.user_id)

        def refused() -> int:
            return sum(
                1
                for r in sim.sim_requests()
                if r["path"] == "/call"
                and (r["body"] or {}).get("user_data", {}).get("callflow_call_id") == str(call.id)
            )

        wait_until(lambda: refused() >= 2, 30, "the call is tried, and tried again")
        waiting = load_call(call.id)
        assert waiting.status in ("pending", "initiating"), "back in the queue, or being tried again"
        assert (waiting.dispatch_attempts, waiting.error_type) == (0, None), "neither failed nor an attempt used"
        sim.sim_config(api_key=BOLNA_API_KEY)
        wait_until(lambda: load_call(call.id).status == "completed", 30, "placed once the key is mended")

    def test_a_refused_key_opens_the_breaker_queues_calls_and_is_reported_once(self, stack: Stack, tmp_path):
        """An API process with a key Bolna refuses; the stack's queue-processor, whose key works, places them."""
        owner = customer(max_concurrent_calls=5)
        refused = {
            **sentry_env(stack.sentry),
            "BOLNA_API_URL": stack.simulator.url,
            "BOLNA_API_KEY": "a-key-bolna-refuses",
            "BOLNA_BREAKER_THRESHOLD": "2",
            "WEB_CONCURRENCY": "1",
        }
        process = ServiceProcess("services.call_initiator", free_port(), refused, tmp_path)
        try:
            process.start()
            answers = [httpx.post(f"{process.url}/api/calls", headers=owner.auth, json=_body(owner)) for _ in range(4)]
        finally:
            assert process.stop() == 0
        assert [(a.status_code, a.json()["status"]) for a in answers] == [(202, "pending")] * 4
        queued = [answer.json()["callId"] for answer in answers]
        wait_until(
            lambda: all(stack.call(owner.auth, call_id)["status"] == "completed" for call_id in queued),
            30,
            "queued, then placed",
        )
        outage = stack.sentry.wait_for_events(error_type=str(ErrorType.BOLNA_UNAVAILABLE), service="call-initiator")
        assert len(outage) == 1
        assert outage[0].payload["contexts"]["bolna_api"]["status_code"] == 403
        assert outage[0].payload["fingerprint"] == ["bolna_unavailable", "bolna.breaker"]
        assert {load_call(uuid.UUID(call_id)).dispatch_attempts for call_id in queued} == {0}, "no attempt used"

    def test_open_breaker_queues_calls_instead_of_failing_them(self, stack: Stack, tmp_path):
        """An API process whose Bolna is down; the stack's queue-processor, whose Bolna works, places them later."""
        owner = customer(max_concurrent_calls=5)
        down = {"BOLNA_API_URL": f"http://127.0.0.1:{free_port()}", "BOLNA_BREAKER_THRESHOLD": "2"}
        process = ServiceProcess("services.call_initiator", free_port(), {**down, "WEB_CONCURRENCY": "1"}, tmp_path)
        try:
            process.start()
            answers = [httpx.post(f"{process.url}/api/calls", headers=owner.auth, json=_body(owner)) for _ in range(4)]
        finally:
            assert process.stop() == 0
        assert [a.status_code for a in answers] == [502, 502, 202, 202]
        assert {a.json()["status"] for a in answers[2:]} == {"pending"}
        queued = [answer.json()["callId"] for answer in answers[2:]]
        wait_until(
            lambda: all(stack.call(owner.auth, call_id)["status"] == "completed" for call_id in queued),
            30,
            "queued, then placed",
        )

    def test_redelivered_wake_up_places_nothing_twice(self, stack: Stack):
        owner = customer(max_concurrent_calls=3)
        call = call_row(owner)
        message_id = str(uuid.uuid4())
        for _ in range(3):
            _wake_dispatcher(owner.user_id, message_id)
        wait_until(lambda: load_call(call.id).status == "completed", 30, "the call completes")
        assert stack.sim_stats()["max_active_calls"][owner.provider_agent_id] == 1
        assert ledger_total(owner.user_id)[0] == 1


class TestLeases:
    def test_call_whose_webhooks_never_come_is_reconciled_from_bolna(self, sim: Stack):
        owner = customer(credits=50, max_concurrent_calls=1)
        sim.sim_config(webhook_drop_rate=1.0)
        placed = sim.api("POST", "/api/calls", headers=owner.auth, json=_body(owner))
        assert placed.status_code == 201
        call_id, execution_id = uuid.UUID(placed.json()["callId"]), placed.json()["executionId"]
        wait_until(lambda: sim.sim_execution(execution_id)["status"] == "completed", 30, "Bolna finishes the call")
        assert load_call(call_id).slot_held, "no webhook came: the slot is still held"

        _expire_lease(call_id)
        wait_until(lambda: load_call(call_id).status == "completed", 30, "the lease job applies Bolna's final state")
        final = load_call(call_id)
        assert not final.slot_held
        assert final.credits_charged == ledger_total(owner.user_id)[1] * -1 > 0
        assert credits_of(owner.user_id) == 50 - final.credits_charged

    def test_call_bolna_does_not_know_is_failed_with_slot_lease_expired(self, stack: Stack):
        owner = customer(max_concurrent_calls=1)
        call = call_row(owner, status="ringing", execution_id=str(uuid.uuid4()), slot_held=True)
        _expire_lease(call.id)
        wait_until(lambda: load_call(call.id).status == "failed", 30, "the lease job fails the call")
        expired = load_call(call.id)
        assert (expired.error_type, expired.slot_held) == ("slot_lease_expired", False)
        events = stack.sentry.wait_for_events(error_type=str(ErrorType.SLOT_LEASE_EXPIRED), call_id=str(call.id))
        assert len(events) == 1
        assert events[0].payload["level"] == "warning"
        assert events[0].payload["fingerprint"] == ["slot_lease_expired", "slot.reconcile"]
        assert events[0].tags["service"] == "queue-processor"
        assert stack.api("POST", "/api/calls", headers=owner.auth, json=_body(owner)).status_code == 201

    def test_a_call_bolna_still_reports_live_at_the_end_of_its_second_lease_is_given_a_third(self, sim: Stack):
        owner = customer(max_concurrent_calls=1)
        sim.sim_config(step_delay_seconds=120)  # Bolna keeps the call `queued` for the whole test
        placed = sim.api("POST", "/api/calls", headers=owner.auth, json=_body(owner))
        call_id, execution_id = uuid.UUID(placed.json()["callId"]), placed.json()["executionId"]

        def reconciled() -> tuple[Call, timedelta | None] | None:
            """The call once the lease job dealt with it (a new lease, or its slot released), with its lease left."""
            call, left = load_call(call_id), _lease_left(call_id)
            return (call, left) if left is None or left > timedelta(0) else None

        try:
            _expire_lease(call_id, leases_ago=DOCUMENTED_MAX_LEASES - 1)
            extended, lease_left = wait_until(reconciled, 30, "the lease job deals with the expired lease")
        finally:
            sim.sim_stop(execution_id)
        assert (extended.status, extended.error_type, extended.slot_held) == ("queued", None, True)
        assert lease_left > timedelta(seconds=components().settings.slot_lease_seconds) / 2, "a whole new lease"

    def test_a_call_still_live_at_the_end_of_its_third_lease_is_expired_and_a_late_completed_bills_it(self, sim: Stack):
        owner = customer(credits=50, max_concurrent_calls=1)
        sim.sim_config(step_delay_seconds=120)  # Bolna keeps the call `queued` for the whole test
        placed = sim.api("POST", "/api/calls", headers=owner.auth, json=_body(owner))
        call_id, execution_id = uuid.UUID(placed.json()["callId"]), placed.json()["executionId"]
        try:
            _expire_lease(call_id, leases_ago=DOCUMENTED_MAX_LEASES)
            wait_until(lambda: load_call(call_id).status == "failed", 30, "the lease job gives up on the call")
            expired = load_call(call_id)
            assert (expired.error_type, expired.slot_held) == ("slot_lease_expired", False)
            assert "Bolna reports queued" in expired.error_detail
            assert ledger_total(owner.user_id) == (0, 0)

            late = _completed_at_bolna(sim.sim_execution(execution_id), seconds=61)
            assert sim.webhook(late).status_code == 200
            wait_until(lambda: load_call(call_id).status == "completed", 30, "Bolna's late word overrules the lease")
        finally:
            sim.sim_stop(execution_id)
        billed = load_call(call_id)
        assert (billed.error_type, billed.error_detail, billed.slot_held) == (None, None, False)
        assert billed.credits_charged == 2
        assert ledger_total(owner.user_id) == (1, -2)
        assert credits_of(owner.user_id) == 48

    def test_a_call_that_never_reached_bolna_is_failed_once_a_search_of_bolna_cannot_find_it(self, stack: Stack):
        owner = customer(max_concurrent_calls=1)
        call = call_row(owner, status="initiating", slot_held=True)
        _expire_lease(call.id)
        wait_until(lambda: load_call(call.id).status == "failed", 40, "the reconcile job gives up on the call")
        expired = load_call(call.id)
        assert (expired.error_type, expired.slot_held) == ("bolna_outcome_unknown", False)
        searches = [r for r in stack.sim_requests() if r["path"] == f"/v2/agent/{owner.provider_agent_id}/executions"]
        assert searches, "Bolna was searched for the call before it was given up"
        assert stack.api("POST", "/api/calls", headers=owner.auth, json=_body(owner)).status_code == 201


class TestWebhookSecurity:
    SIGNING_SECRET = "whsec_" + base64.b64encode(b"callflow-test-signing-key-32byte").decode()

    def _receiver(self, tmp_path, sentry: SentrySink, **env) -> ServiceProcess:
        return ServiceProcess("services.webhook_receiver", free_port(), {**sentry_env(sentry), **env}, tmp_path).start()

    def test_allow_list_honours_the_trusted_proxy(self, tmp_path, sentry):
        receiver = self._receiver(tmp_path, sentry, WEBHOOK_ALLOWED_IPS="10.0.0.0/8", TRUSTED_PROXY_COUNT="1")
        url = f"{receiver.url}/webhooks/bolna?token={WEBHOOK_SECRET}"
        payload = {"id": str(uuid.uuid4()), "status": "queued"}
        try:
            direct = httpx.post(url, json=payload)
            proxied = httpx.post(url, json=payload, headers={"X-Forwarded-For": "10.1.2.3"})
            spoofed = httpx.post(url, json=payload, headers={"X-Forwarded-For": "10.1.2.3, 192.0.2.9"})
        finally:
            assert receiver.stop() == 0
        assert direct.status_code == 403 and direct.json()["error_type"] == "webhook_source_forbidden"
        assert proxied.status_code == 200
        assert spoofed.status_code == 403, "only the address the trusted proxy saw counts"
        reported = sentry.wait_for_events(expected=2, error_type="webhook_source_forbidden")
        assert {event.tags["request_id"] for event in reported} == {
            direct.headers["X-Request-ID"],
            spoofed.headers["X-Request-ID"],
        }
        assert {event.payload["fingerprint"][1] for event in reported} == {"/webhooks/bolna"}

    def test_signed_webhooks_are_verified_over_the_raw_body(self, tmp_path, sentry):
        receiver = self._receiver(tmp_path, sentry, WEBHOOK_SIGNING_SECRET=self.SIGNING_SECRET)
        url = f"{receiver.url}/webhooks/bolna"
        body = json.dumps({"id": str(uuid.uuid4()), "status": "queued"})

        def headers(at: datetime, content: str) -> dict[str, str]:
            message_id = f"msg_{uuid.uuid4().hex}"
            signature = Webhook(self.SIGNING_SECRET).sign(message_id, at, content)
            return {
                "webhook-id": message_id,
                "webhook-timestamp": str(int(at.timestamp())),
                "webhook-signature": signature,
                "Content-Type": "application/json",
            }

        now = datetime.now(UTC)
        try:
            signed = httpx.post(url, content=body, headers=headers(now, body))
            tampered = httpx.post(url, content=body.replace("queued", "completed"), headers=headers(now, body))
            stale = httpx.post(url, content=body, headers=headers(now - timedelta(minutes=6), body))
            unsigned = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        finally:
            assert receiver.stop() == 0
        assert signed.status_code == 200
        assert [a.status_code for a in (tampered, stale, unsigned)] == [401, 401, 401]
        assert {a.json()["error_type"] for a in (tampered, stale, unsigned)} == {"webhook_auth_failed"}


def test_oversized_body_is_413_problem_json(stack: Stack):
    owner = customer()
    answer = stack.api("POST", "/api/calls", headers=owner.auth, content=b"{" + b" " * 300_000 + b"}")
    assert answer.status_code == 413
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["error_type"] == "payload_too_large"


def test_what_gunicorn_refuses_before_the_app_is_problem_json_too(stack: Stack):
    """An oversized header or request line, or a request that is no HTTP, never reaches Flask: gunicorn answers it."""
    # With a body the server never reads: the answer must still reach the client before the connection closes.
    webhook = {"id": "x", "status": "queued", "transcript": "a" * 500_000}
    too_long_header = stack.webhook(webhook, headers={"X-Padding": "a" * 10_000})
    too_long_line = stack.api("GET", "/api/calls", params={"page": "1" * 5_000})
    with socket.create_connection(("127.0.0.1", stack.call_initiator.port), timeout=10) as raw:
        raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        not_http = b""
        while chunk := raw.recv(65536):
            not_http += chunk
    head, _, body = not_http.partition(b"\r\n\r\n")

    assert (too_long_header.status_code, too_long_line.status_code, head.split()[1]) == (431, 414, b"400")
    for answer in (too_long_header, too_long_line):
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["error_type"] == "validation_error" and answer.json()["status"] == answer.status_code
    assert b"content-type: application/problem+json" in head.lower()
    assert json.loads(body)["error_type"] == "validation_error"


def test_another_users_call_is_404_and_a_security_event(stack: Stack):
    owner, intruder = customer(), customer()
    placed = stack.api("POST", "/api/calls", headers=owner.auth, json=_body(owner))
    answer = stack.api("GET", f"/api/calls/{placed.json()['callId']}", headers=intruder.auth)
    assert answer.status_code == 404 and answer.json()["error_type"] == "call_not_found"
    assert "phoneNumber" not in answer.text
    events = stack.sentry.wait_for_events(error_type="unauthorized_call_access", user_id=str(intruder.user_id))
    assert len(events) == 1
    assert events[0].tags["call_id"] == placed.json()["callId"]
