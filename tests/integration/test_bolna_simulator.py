"""The Bolna simulator's API, lifecycles, webhook delivery, line accounting and injectable faults, against a local
receiver; the faults a client must see on the wire are checked against the simulator's real process (gunicorn)."""

from __future__ import annotations

import errno
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from pydantic import ValidationError
from urllib3.exceptions import ProtocolError

from services.bolna_simulator.api import create_app
from services.bolna_simulator.config import TERMINAL_STATUSES, SimulatorConfig
from services.bolna_simulator.state import RECORDED_REQUESTS
from tests.support.processes import ServiceProcess, free_port

AGENT_ID = "123e4567-e89b-12d3-a456-426655440000"
OTHER_AGENT_ID = "9b2f4a8e-5c1d-4e7f-8a3b-6d0c2e1f4a5b"
PHONE = "+14155552671"
AUTH = {"Authorization": "Bearer test-key"}
COMPLETED_STATUSES = ["queued", "initiated", "ringing", "in-progress", "call-disconnected", "completed"]


class WebhookReceiver:
    """A local HTTP server recording the webhooks it accepts; it can refuse the next N with a 500."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.attempts = 0
        self.fail_next = 0
        self.on_webhook: Callable[[dict[str, Any]], None] | None = None
        self._changed = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_port}/webhooks/bolna?token=secret"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(receiver.record(self.path, body))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - overridden signature
                pass

        return Handler

    def record(self, path: str, body: dict[str, Any]) -> int:
        with self._changed:
            self.attempts += 1
            if self.fail_next:
                self.fail_next -= 1
                return 500
        if self.on_webhook is not None:
            self.on_webhook(body)
        with self._changed:
            self.bodies.append(body)
            self.paths.append(path)
            self._changed.notify_all()
        return 200

    def statuses(self, execution_id: str) -> list[str]:
        with self._changed:
            return [body["status"] for body in self.bodies if body["id"] == execution_id]

    def wait_for(self, execution_id: str, status: str, timeout: float = 5.0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            matches = [b for b in self.bodies if b["id"] == execution_id and b["status"] == status]
            return matches[-1] if matches else None

        with self._changed:
            body = self._changed.wait_for(found, timeout)
        assert body is not None, f"no {status} webhook for {execution_id}; got {self.statuses(execution_id)}"
        return body

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def make_app(receiver: WebhookReceiver) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        settings = {
            "webhook_url": receiver.url,
            "step_delay_seconds": 0.01,
            "talk_seconds": 0.02,
            "completed_delay_seconds": 0.02,
            **overrides,
        }
        app = create_app(SimulatorConfig(**settings))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.test_client().post("/_sim/reset")


@pytest.fixture
def make_client(make_app: Callable[..., Flask]) -> Callable[..., FlaskClient]:
    return lambda **overrides: make_app(**overrides).test_client()


def place(client: FlaskClient, **fields: Any) -> str:
    response = client.post(
        "/call", json={"agent_id": AGENT_ID, "recipient_phone_number": PHONE, **fields}, headers=AUTH
    )
    assert response.status_code == 200, response.json
    return response.json["execution_id"]


def stats(client: FlaskClient) -> dict[str, Any]:
    return client.get("/_sim/stats").json


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Waits for the simulator's own bookkeeping, which lags the receiver by one HTTP answer."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def wait_until_ended(client: FlaskClient, execution_id: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/executions/{execution_id}", headers=AUTH).json
        if body["status"] in TERMINAL_STATUSES:
            return body
        time.sleep(0.02)
    raise AssertionError(f"call {execution_id} did not end within {timeout} s")


def test_health(make_client: Callable[..., FlaskClient]) -> None:
    response = make_client().get("/health")

    assert response.status_code == 200
    assert response.json == {"status": "ok", "service": "bolna-simulator"}


def test_place_call_answers_queued_with_a_new_execution_id(make_client: Callable[..., FlaskClient]) -> None:
    client = make_client()

    response = client.post(
        "/call",
        json={
            "agent_id": AGENT_ID,
            "recipient_phone_number": PHONE,
            "from_phone_number": "+919876543210",
            "user_data": {"name": "Asha"},
            "scheduled_at": "2025-08-21T10:35:00+00:00",
            "retry_config": {"enabled": False},
            "agent_data": {"voice_id": "Sam"},
        },
        headers=AUTH,
    )

    assert response.status_code == 200
    assert response.json["message"] == "done"
    assert response.json["status"] == "queued"
    assert uuid.UUID(response.json["execution_id"]).version == 4
    assert stats(client)["calls_accepted"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"agent_id": "not-a-uuid", "recipient_phone_number": PHONE}, "agent_id"),
        ({"recipient_phone_number": PHONE}, "agent_id"),
        ({"agent_id": AGENT_ID, "recipient_phone_number": "+10123456789"}, "recipient_phone_number"),
        ({"agent_id": AGENT_ID, "recipient_phone_number": "4155552671"}, "recipient_phone_number"),
        ({"agent_id": AGENT_ID}, "recipient_phone_number"),
        (
            {"agent_id": AGENT_ID, "recipient_phone_number": PHONE, "from_phone_number": "12"},
            "from_phone_number",
        ),
        ({"agent_id": AGENT_ID, "recipient_phone_number": PHONE, "user_data": ["x"]}, "user_data"),
    ],
)
def test_place_call_rejects_bad_input(
    make_client: Callable[..., FlaskClient], body: dict[str, Any], field: str
) -> None:
    client = make_client()

    response = client.post("/call", json=body, headers=AUTH)

    assert response.status_code == 400
    assert response.json["error"] == 400
    assert field in response.json["message"]
    assert stats(client)["calls_received"] == 1
    assert stats(client)["calls_accepted"] == 0


def test_place_call_rejects_a_body_that_is_not_an_object(make_client: Callable[..., FlaskClient]) -> None:
    response = make_client().post("/call", data="[1]", content_type="application/json", headers=AUTH)

    assert response.status_code == 400
    assert response.json["error"] == 400


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer "}])
def test_api_requires_a_bearer_token(make_client: Callable[..., FlaskClient], headers: dict[str, str]) -> None:
    client = make_client()

    response = client.post("/call", json={"agent_id": AGENT_ID, "recipient_phone_number": PHONE}, headers=headers)

    assert response.status_code == 401
    assert response.json["error"] == 401
    assert response.json["message"]
    assert client.get(f"/executions/{uuid.uuid4()}", headers=headers).status_code == 401


def test_a_configured_api_key_must_match(make_client: Callable[..., FlaskClient]) -> None:
    client = make_client(api_key="sk-right")
    body = {"agent_id": AGENT_ID, "recipient_phone_number": PHONE}

    wrong = client.post("/call", json=body, headers={"Authorization": "Bearer sk-wrong"})
    right = client.post("/call", json=body, headers={"Authorization": "Bearer sk-right"})

    assert wrong.status_code == 403
    assert wrong.json == {"detail": "Invalid API key"}
    assert right.status_code == 200
    assert stats(client)["calls_accepted"] == 1


def test_completed_call_goes_through_every_status_with_full_bodies(
    make_client: Callable[..., FlaskClient], receiver: WebhookReceiver
) -> None:
    client = make_client(duration_min_seconds=42, duration_max_seconds=42)
    user_data = {"name": "Asha", "order_id": 7}

    execution_id = place(client, user_data=user_data)
    completed = receiver.wait_for(execution_id, "completed")

    assert receiver.statuses(execution_id) == COMPLETED_STATUSES
    assert all(path == "/webhooks/bolna?token=secret" for path in receiver.paths)
    by_status = {body["status"]: body for body in receiver.bodies}
    ringing, disconnected = by_status["ringing"], by_status["call-disconnected"]
    assert ringing["transcript"] is None
    assert ringing["telephony_data"]["recording_url"] is None
    assert ringing["total_cost"] == 0
    assert disconnected["telephony_data"]["duration"] == "42"
    assert "user:" in disconnected["transcript"]

    assert completed["id"] == execution_id
    assert completed["agent_id"] == AGENT_ID
    assert completed["batch_id"] is None
    assert completed["telephony_data"]["duration"] == "42"
    assert completed["conversation_duration"] == 42
    assert completed["transcript"].startswith("assistant: ")
    assert "\nuser: " in completed["transcript"]
    assert completed["telephony_data"]["recording_url"].startswith("https://")
    assert completed["telephony_data"]["to_number"] == PHONE
    assert completed["telephony_data"]["hosted_telephony"] is True
    assert completed["telephony_data"]["provider_call_id"]
    assert completed["context_details"] == {"recipient_data": user_data, "recipient_phone_number": PHONE}
    assert completed["total_cost"] > 0
    assert completed["total_cost"] == pytest.approx(sum(completed["cost_breakdown"].values()))
    assert set(completed["cost_breakdown"]) == {"llm", "network", "platform", "synthesizer", "transcriber"}
    assert isinstance(completed["extracted_data"], dict)
    assert completed["error_message"] is None
    assert completed["answered_by_voice_mail"] is False
    assert datetime.fromisoformat(completed["updated_at"]) >= datetime.fromisoformat(completed["created_at"])

    assert client.get(f"/executions/{execution_id}", headers=AUTH).json == completed
    eventually(lambda: stats(client)["webhooks_sent"] == len(COMPLETED_STATUSES))
    final = stats(client)
    assert final["webhook_failures"] == 0
    assert final["executions_by_status"] == {"completed": 1}


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        ("busy", ["queued", "initiated", "ringing", "busy"]),
        ("no-answer", ["queued", "initiated", "ringing", "no-answer"]),
        ("failed", ["queued", "initiated", "failed"]),
        ("error", ["queued", "initiated", "error"]),
        ("balance-low", ["queued", "balance-low"]),
        ("canceled", ["queued", "canceled"]),
        ("stopped", ["queued", "initiated", "stopped"]),
    ],
)
def test_unanswered_outcomes(
    make_client: Callable[..., FlaskClient], receiver: WebhookReceiver, outcome: str, expected: list[str]
) -> None:
    client = make_client(outcomes={outcome: 1})

    execution_id = place(client)
    final = receiver.wait_for(execution_id, outcome)

    assert receiver.statuses(execution_id) == expected
    assert final["conversation_duration"] == 0
    assert final["telephony_data"]["duration"] == "0"
    assert final["total_cost"] == 0
    assert final["transcript"] is None
    assert final["telephony_data"]["recording_url"] is None
    assert (final["error_message"] is not None) == (outcome in ("failed", "error", "balance-low"))
    assert final["retry_count"] == 0
    assert stats(client)["active_calls"] == {AGENT_ID: 0}
    assert stats(client)["executions_by_status"] == {outcome: 1}
    assert client.get("/_sim/executions").json["executions"][0]["dials"] == expected.count("initiated")


def test_bolna_redials_an_unanswered_call_on_its_own(
    make_client: Callable[..., FlaskClient], receiver: WebhookReceiver
) -> None:
    client = make_client(outcomes={"no-answer": 1}, redial_rate=1, redial_delay_seconds=0.05)

    execution_id = place(client, retry_config={"enabled": False})  # Bolna's agent setting wins
    eventually(lambda: receiver.statuses(execution_id).count("no-answer") == 2)

    dial = ["queued", "initiated", "ringing", "no-answer"]
    assert receiver.statuses(execution_id) == [*dial, "scheduled", *dial]
    assert [body["retry_count"] for body in receiver.bodies] == [0] * 4 + [1] * 5
    assert client.get(f"/executions/{execution_id}", headers=AUTH).json["retry_count"] == 1
    (execution,) = client.get("/_sim/executions").json["executions"]
    assert (execution["status"], execution["retry_count"], execution["dials"]) == ("no-answer", 1, 2)
    final = stats(client)
    assert (final["redials"], final["active_calls"], final["max_active_calls"]) == (1, {AGENT_ID: 0}, {AGENT_ID: 1})


def test_a_redial_stopped_while_scheduled_dials_nobody(
    make_client: Callable[..., FlaskClient], receiver: WebhookReceiver
) -> None:
    client = make_client(outcomes={"busy": 1}, redial_rate=1, redial_delay_seconds=0.05)
    stops: list[int] = []

    def stop_the_redial(body: dict[str, Any]) -> None:
        # Before the webhook is answered: the redial cannot move on meanwhile.
        if body["status"] == "scheduled":
            stops.append(client.post(f"/call/{body['id']}/stop", headers=AUTH).status_code)

    receiver.on_webhook = stop_the_redial
    execution_id = place(client)
    receiver.wait_for(execution_id, "stopped")

    assert stops == [200]
    assert receiver.statuses(execution_id) == ["queued", "initiated", "ringing", "busy", "scheduled", "stopped"]
    (execution,) = client.get("/_sim/executions").json["executions"]
    assert (execution["status"], execution["retry_count"], execution["dials"]) == ("stopped", 1, 1)
    assert stats(client)["active_calls"] == {AGENT_ID: 0}


def test_a_completed_can_come_before_its_duration(
    make_client: Callable[..., FlaskClient], receiver: WebhookReceiver
) -> None:
    client = make_client(completed_without_duration_rate=1, duration_min_seconds=42, duration_max_seconds=42)

    execution_id = place(client)
    completed = receiver.wait_for(execution_id, "completed")

    assert (completed["conversation_duration"], completed["telephony_data"]["duration"]) == (None, None)
    assert completed["transcript"] and completed["total_cost"] > 0
    record = client.get(f"/executions/{execution_id}", headers=AUTH).json
    assert (record["status"], record["conversation_duration"], record["telephony_data"]["duration"]) == (
        "completed",
        42,
        "42",
    )


def test_bolnas_record_can_lag_its_completed_for_the_duration(
    make_client: Callable[..., FlaskClient], receiver: WebhookReceiver
) -> None:
    client = make_client(completed_without_duration_rate=1, duration_lag_seconds=0.5, duration_min_seconds=42)

    execution_id = place(client)
    receiver.wait_for(execution_id, "completed")

    def record() -> dict[str, Any]:
        return client.get(f"/executions/{execution_id}", headers=AUTH).json

    assert (record()["status"], record()["conversation_duration"]) == ("completed", None)
    eventually(lambda: record()["conversation_duration"] is not None)
    assert record()["telephony_data"]["duration"] == str(int(record()["conversation_duration"]))


def test_refusal_rate_answers_400_without_creating_a_call(make_client: Callable[..., FlaskClient]) -> None:
    client = make_client(refusal_rate=1)

    response = client.post("/call", json={"agent_id": AGENT_ID, "recipient_phone_number": PHONE}, headers=AUTH)

    assert (response.status_code, response.json["error"]) == (400, 400)
    after = stats(client)
    assert (after["calls_received"], after["calls_accepted"], after["refused"]) == (1, 0, 1)
    assert after["executions_by_status"] == {}


def test_error_rate_answers_500_without_creating_a_call(make_client: Callable[..., FlaskClient]) -> None:
    client = make_client(error_rate=1)

    response = client.post("/call", json={"agent_id": AGENT_ID, "recipient_phone_number": PHONE}, headers=AUTH)

    assert response.status_code == 500
    assert response.json == {"error": 500, "message": "Internal Server Error"}
    after = stats(client)
    assert (after["calls_received"], after["calls_accepted"], after["api_errors"]) == (1, 0, 1)
    assert after["active_calls"] == {}
    assert after["executions_by_status"] == {}


def test_rate_limit_rate_answers_429_with_retry_after(make_client: Callable[..., FlaskClient]) -> None:
    client = make_client(rate_limit_rate=1, retry_after_seconds=7)

    response = client.post("/call", json={"agent_id": str(uuid.uuid4()), "recipient_phone_number": PHONE}, headers=AUTH)

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert stats(client)["rate_limited"] == 1
    assert stats(client)["calls_accepted"] == 0


def test_timeout_rate_hangs_then_answers_504(make_client: Callable[..., FlaskClient]) -> None:
    client = make_client(timeout_rate=1, timeout_seconds=0.2)

    started = time.monotonic()
    response = client.post("/call", json={"agent_id": AGENT_ID, "recipient_phone_number": PHONE}, headers=AUTH)

    assert time.monotonic() - started >= 0.2
    assert response.status_code == 504
    assert response.json["error"] == 504
    assert stats(client)["api_timeouts"] == 1
    assert stats(client)["calls_accepted"] == 0


def test_get_execution(make_client: Callable[..., FlaskClient], receiver: WebhookReceiver) -> None:
    client = make_client(step_delay_seconds=5)
    execution_id = place(client, user_data={"k": "v"})

    found = client.get(f"/executions/{execution_id}", headers=AUTH)
    missing = client.get(f"/executions/{uuid.uuid4()}", headers=AUTH)

    assert found.status_code == 200
    assert found.json["id"] == execution_id
    assert found.json["status"] == "queued"
    assert found.json["context_details"]["recipient_data"] == {"k": "v"}
    assert missing.status_code == 404
    assert missing.json["error"] == 404
    assert missing.json["message"]


def test_stop_a_queued_call(make_client: Callable[..., FlaskClient], receiver: WebhookReceiver) -> None:
    client = make_client(step_delay_seconds=5)
    execution_id = place(client)
    receiver.wait_for(execution_id, "queued")
    assert stats(client)["executions_by_status"] == {"queued": 1}

    response = client.post(f"/call/{execution_id}/stop", headers=AUTH)

    assert response.status_code == 200
    assert response.json == {"message": "done", "status": "stopped", "execution_id": execution_id}
    assert stats(client)["active_calls"] == {AGENT_ID: 0}
    assert stats(client)["executions_by_status"] == {"stopped": 1}
    # The stop cuts the 5 s step short: the webhook arrives well before the next status would have.
    receiver.wait_for(execution_id, "stopped", timeout=2)
    assert receiver.statuses(execution_id) == ["queued", "stopped"]
    assert client.get(f"/executions/{execution_id}", headers=AUTH).json["status"] == "stopped"
    again = client.post(f"/call/{execution_id}/stop", headers=AUTH)
    assert again.status_code == 400
    assert again.json["error"] == 400
    assert client.post(f"/call/{uuid.uuid4()}/stop", headers=AUTH).status_code == 404
    assert stats(client)["stop_requests"] == 3


def test_other_requests_can_fail_without_acting(
    make_client: Callable[..., FlaskClient], receiver: WebhookReceiver
) -> None:
    client = make_client(step_delay_seconds=5, other_requests_error_rate=1)
    execution_id = place(client)  # POST /call is not one of them
    receiver.wait_for(execution_id, "queued")

    answers = [
        client.get(f"/executions/{execution_id}", headers=AUTH),
        client.get(f"/v2/agent/{AGENT_ID}/executions", headers=AUTH),
        client.post(f"/call/{execution_id}/stop", headers=AUTH),
    ]

    assert [(answer.status_code, answer.json["error"]) for answer in answers] == [(500, 500)] * 3
    assert (stats(client)["other_requests_failed"], stats(client)["stop_requests"]) == (3, 0)
    assert stats(client)["executions_by_status"] == {"queued": 1}, "the stop was not acted on"
    client.post("/_sim/config", json={"other_requests_error_rate": 0})
    assert client.post(f"/call/{execution_id}/stop", headers=AUTH).status_code == 200


def test_a_ringing_call_cannot_be_stopped(make_client: Callable[..., FlaskClient], receiver: WebhookReceiver) -> None:
    client = make_client(step_delay_seconds=0.3, outcomes={"no-answer": 1})
    execution_id = place(client)
    receiver.wait_for(execution_id, "ringing")

    response = client.post(f"/call/{execution_id}/stop", headers=AUTH)

    assert response.status_code == 400
    assert "ringing" in response.json["message"]
    receiver.wait_for(execution_id, "no-answer")
    assert receiver.statuses(execution_id) == ["queued", "initiated", "ringing", "no-answer"]


def test_sequential_calls_never_count_as_simultaneous(
    make_client: Callable[..., FlaskClient], receiver: WebhookReceiver
) -> None:
    client = make_client()

    receiver.wait_for(place(client), "completed")
    receiver.wait_for(place(client), "completed")

    after = stats(client)
    assert after["max_active_calls"] == {AGENT_ID: 1}
    assert after["active_calls"] == {AGENT_ID: 0}
    assert after["executions_by_status"] == {"completed": 2}


def test_overlapping_calls_count_per_agent(make_client: Callable[..., FlaskClient], receiver: WebhookReceiver) -> None:
    client = make_client(talk_seconds=0.3)

    first, second = place(client), place(client)
    other = place(client, agent_id=OTHER_AGENT_ID)
    during = stats(client)
    for execution_id in (first, second, other):
        receiver.wait_for(execution_id, "completed")

    assert during["active_calls"] == {AGENT_ID: 2, OTHER_AGENT_ID: 1}
    after = stats(client)
    assert after["max_active_calls"] == {AGENT_ID: 2, OTHER_AGENT_ID: 1}
    assert after["active_calls"] == {AGENT_ID: 0, OTHER_AGENT_ID: 0}


@pytest.mark.parametrize("reorder_rate", [0, 1])
def test_line_is_free_before_the_disconnect_webhook_arrives(
    make_app: Callable[..., Flask], receiver: WebhookReceiver, reorder_rate: float
) -> None:
    app = make_app(reorder_rate=reorder_rate)
    placed: list[str] = []
    active_when_released: list[int] = []

    def react(body: dict[str, Any]) -> None:
        # Like the product: the moment the line is reported free, the same agent's next call is placed.
        if body["status"] in ("call-disconnected", "completed") and len(placed) == 1 and body["id"] == placed[0]:
            active_when_released.append(stats(app.test_client())["active_calls"][AGENT_ID])
            placed.append(place(app.test_client()))

    receiver.on_webhook = react
    placed.append(place(app.test_client()))
    receiver.wait_for(placed[0], "completed")
    receiver.wait_for(placed[0], "call-disconnected")
    receiver.wait_for(placed[1], "completed")

    assert active_when_released == [0]
    assert stats(app.test_client())["max_active_calls"] == {AGENT_ID: 1}


def test_duplicate_rate_delivers_every_webhook_twice(
    make_client: Callable[..., FlaskClient], receiver: WebhookReceiver
) -> None:
    client = make_client(duplicate_rate=1, outcomes={"failed": 1})

    execution_id = place(client)
    eventually(lambda: stats(client)["webhooks_sent"] == 6)

    assert receiver.statuses(execution_id) == [
        "queued",
        "queued",
        "initiated",
        "initiated",
        "failed",
        "failed",
    ]


def test_webhook_drop_rate_runs_the_call_without_telling_anyone(
    make_client: Callable[..., FlaskClient], receiver: WebhookReceiver
) -> None:
    client = make_client(webhook_drop_rate=1, outcomes={"failed": 1})

    execution_id = place(client)
    eventually(lambda: client.get(f"/executions/{execution_id}", headers=AUTH).json["status"] == "failed")

    assert receiver.statuses(execution_id) == []
    assert stats(client)["webhooks_sent"] == 0


def test_reorder_rate_swaps_neighbouring_webhooks(
    make_client: Callable[..., FlaskClient], receiver: WebhookReceiver
) -> None:
    client = make_client(reorder_rate=1)

    execution_id = place(client)
    receiver.wait_for(execution_id, "call-disconnected")

    assert receiver.statuses(execution_id) == [
        "initiated",
        "queued",
        "in-progress",
        "ringing",
        "completed",
        "call-disconnected",
    ]


def test_a_refused_webhook_is_retried(make_client: Callable[..., FlaskClient], receiver: WebhookReceiver) -> None:
    receiver.fail_next = 2
    client = make_client(outcomes={"busy": 1})

    execution_id = place(client)
    receiver.wait_for(execution_id, "busy")

    assert receiver.statuses(execution_id) == ["queued", "initiated", "ringing", "busy"]
    assert receiver.attempts == 6
    eventually(lambda: stats(client)["webhooks_sent"] == 4)
    assert stats(client)["webhook_failures"] == 0


def test_config_endpoint(make_client: Callable[..., FlaskClient]) -> None:
    client = make_client()

    unknown = client.post("/_sim/config", json={"error_rate": 1, "bogus": 2})
    invalid = client.post("/_sim/config", json={"error_rate": 2})
    updated = client.post("/_sim/config", json={"error_rate": 1, "outcomes": {"busy": 1}})

    assert unknown.status_code == 400
    assert "bogus" in unknown.json["message"]
    assert invalid.status_code == 400
    assert "error_rate" in invalid.json["message"]
    assert updated.status_code == 200
    assert updated.json["error_rate"] == 1
    assert updated.json["outcomes"] == {
        "completed": 0,
        "busy": 1,
        "no-answer": 0,
        "failed": 0,
        "error": 0,
        "balance-low": 0,
        "canceled": 0,
        "stopped": 0,
    }
    assert updated.json["step_delay_seconds"] == 0.01
    assert client.get("/_sim/config").json == updated.json
    refused = client.post("/call", json={"agent_id": AGENT_ID, "recipient_phone_number": PHONE}, headers=AUTH)
    assert refused.status_code == 500


def test_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_OUTCOMES", "completed=0.7,busy=0.1,no-answer=0.1,balance-low=0.1")
    monkeypatch.setenv("SIM_ERROR_RATE", "0.25")
    monkeypatch.setenv("SIM_REDIAL_RATE", "0.5")
    monkeypatch.setenv("SIM_SEED", "7")

    config = SimulatorConfig()

    unused = {"failed": 0.0, "error": 0.0, "canceled": 0.0, "stopped": 0.0}
    assert config.outcomes == {"completed": 0.7, "busy": 0.1, "no-answer": 0.1, "balance-low": 0.1, **unused}
    assert (config.error_rate, config.redial_rate, config.seed) == (0.25, 0.5, 7)
    monkeypatch.setenv("SIM_OUTCOMES", "completed=1,voicemail=1")
    with pytest.raises(ValidationError, match="voicemail"):
        SimulatorConfig()


def test_a_seed_reproduces_the_outcomes(make_client: Callable[..., FlaskClient]) -> None:
    def outcomes_of_eight_calls() -> list[str]:
        client = make_client(seed=7, outcomes={"busy": 1, "no-answer": 1, "failed": 1})
        execution_ids = [place(client) for _ in range(8)]
        return [wait_until_ended(client, execution_id)["status"] for execution_id in execution_ids]

    first, second = outcomes_of_eight_calls(), outcomes_of_eight_calls()

    assert first == second
    assert len(set(first)) > 1


def test_requests_are_recorded_with_their_bodies_and_a_masked_api_key(make_client: Callable[..., FlaskClient]) -> None:
    client = make_client(api_key="sk-live-0123456789abcd", step_delay_seconds=5)
    key = {"Authorization": "Bearer sk-live-0123456789abcd"}
    body = {"agent_id": AGENT_ID, "recipient_phone_number": PHONE, "user_data": {"order": {"id": 7}}}

    execution_id = client.post("/call", json=body, headers=key).json["execution_id"]
    client.get(f"/executions/{execution_id}", headers={"Authorization": "Bearer short"})
    client.post("/call", data="not json", content_type="text/plain")
    client.post(f"/call/{execution_id}/stop", headers=key)
    client.get("/_sim/stats")

    recorded = client.get("/_sim/requests").json["requests"]
    assert [(r["method"], r["path"], r["body"], r["authorization"]) for r in recorded] == [
        ("POST", "/call", body, "Bearer ******************abcd"),
        ("GET", f"/executions/{execution_id}", None, "Bearer *****"),
        ("POST", "/call", "not json", None),
        ("POST", f"/call/{execution_id}/stop", None, "Bearer ******************abcd"),
    ]
    received_at = [datetime.fromisoformat(r["received_at"]) for r in recorded]
    assert received_at == sorted(received_at)
    assert "sk-live" not in client.get("/_sim/requests").text
    client.post("/_sim/reset")
    assert client.get("/_sim/requests").json == {"requests": []}


def test_only_the_latest_requests_are_kept(make_client: Callable[..., FlaskClient]) -> None:
    client = make_client(error_rate=1)

    for number in range(RECORDED_REQUESTS + 5):
        client.post("/call", json={"n": number}, headers=AUTH)

    recorded = client.get("/_sim/requests").json["requests"]
    assert len(recorded) == RECORDED_REQUESTS
    assert [r["body"]["n"] for r in (recorded[0], recorded[-1])] == [5, RECORDED_REQUESTS + 4]


def test_reset_clears_calls_and_counters_but_keeps_config(
    make_client: Callable[..., FlaskClient], receiver: WebhookReceiver
) -> None:
    client = make_client(step_delay_seconds=5, latency_ms=1)
    execution_id = place(client)

    response = client.post("/_sim/reset")

    assert response.status_code == 200
    after = stats(client)
    assert (after["calls_received"], after["calls_accepted"], after["webhooks_sent"]) == (0, 0, 0)
    assert after["active_calls"] == {}
    assert after["max_active_calls"] == {}
    assert after["executions_by_status"] == {}
    assert client.get(f"/executions/{execution_id}", headers=AUTH).status_code == 404
    assert client.get("/_sim/config").json["latency_ms"] == 1


class LiveSimulator:
    """The simulator's real process, reached over HTTP with `requests`, reset and set to fast calls per test."""

    def __init__(self, process: ServiceProcess, receiver: WebhookReceiver) -> None:
        self.url = process.url
        self.receiver = receiver
        self.http = requests.Session()
        self.http.trust_env = False  # an environment proxy must not capture 127.0.0.1

    def start_test(self) -> None:
        fast = SimulatorConfig(
            webhook_url=self.receiver.url, step_delay_seconds=0.01, talk_seconds=0.02, completed_delay_seconds=0.02
        )
        self.http.post(f"{self.url}/_sim/reset").raise_for_status()
        # Every key, so nothing an earlier test set survives.
        self.configure(**fast.model_dump())

    def configure(self, **changes: Any) -> dict[str, Any]:
        response = self.http.post(f"{self.url}/_sim/config", json=changes)
        assert response.status_code == 200, response.text
        return response.json()

    def place(self, timeout: float | tuple[float, float] = 10, **fields: Any) -> requests.Response:
        body = {"agent_id": AGENT_ID, "recipient_phone_number": PHONE, **fields}
        return self.http.post(f"{self.url}/call", json=body, headers=AUTH, timeout=timeout)

    def execution(self, execution_id: str) -> requests.Response:
        return self.http.get(f"{self.url}/executions/{execution_id}", headers=AUTH)

    def list(self, agent_id: str = AGENT_ID, headers: dict[str, str] = AUTH, **query: Any) -> requests.Response:
        return self.http.get(f"{self.url}/v2/agent/{agent_id}/executions", params=query, headers=headers)

    def executions(self) -> list[dict[str, Any]]:
        return self.http.get(f"{self.url}/_sim/executions").json()["executions"]

    def the_only_execution(self) -> dict[str, Any]:
        """The one execution held, waited for: the server may still be placing it when the client gives up."""
        eventually(lambda: len(self.executions()) == 1)
        return self.executions()[0]

    def stats(self) -> dict[str, Any]:
        return self.http.get(f"{self.url}/_sim/stats").json()

    def requests(self) -> list[dict[str, Any]]:
        return self.http.get(f"{self.url}/_sim/requests").json()["requests"]


@pytest.fixture(scope="module")
def live_simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSimulator]:
    receiver = WebhookReceiver()
    process = ServiceProcess("services.bolna_simulator", free_port(), {}, tmp_path_factory.mktemp("simulator"))
    try:
        process.start()
        yield LiveSimulator(process, receiver)
    finally:
        process.stop()
        receiver.close()


@pytest.fixture
def live(live_simulator: LiveSimulator) -> LiveSimulator:
    live_simulator.start_test()
    return live_simulator


def test_a_lost_answer_times_the_client_out_but_the_call_is_placed(live: LiveSimulator) -> None:
    live.configure(lost_answer_rate=1, lost_answer_mode="timeout", timeout_seconds=1)

    # The answer is held a whole second, so a 0.1 s read timeout fires however slow the machine is.
    with pytest.raises(requests.ReadTimeout):
        live.place(timeout=(5, 0.1), user_data={"callflow_call_id": "c-1"})
    placed = live.the_only_execution()
    held = live.place(timeout=10)

    assert held.status_code == 504
    assert held.json() == {"error": 504, "message": "Gateway Timeout"}
    assert placed["user_data"] == {"callflow_call_id": "c-1"}
    live.receiver.wait_for(placed["id"], "completed")
    assert live.execution(placed["id"]).json()["status"] == "completed"
    after = live.stats()
    assert (after["calls_received"], after["calls_accepted"], after["answers_lost"]) == (2, 2, 2)


def test_a_lost_answer_can_reset_the_connection_after_placing_the_call(live: LiveSimulator) -> None:
    live.configure(lost_answer_rate=1, lost_answer_mode="reset")

    with pytest.raises(requests.ConnectionError) as raised:
        live.place()

    # A reset once the request was sent ("Connection aborted.", ECONNRESET), neither a refused connection
    # (NewConnectionError) nor a server closing politely without an answer (RemoteDisconnected, whose errno is None).
    reason = raised.value.args[0]
    assert isinstance(reason, ProtocolError), repr(reason)
    assert getattr(reason.args[1], "errno", None) == errno.ECONNRESET, repr(reason)
    placed = live.the_only_execution()
    assert live.execution(placed["id"]).status_code == 200
    live.receiver.wait_for(placed["id"], "completed")
    assert live.stats()["answers_lost"] == 1
    assert live.http.get(f"{live.url}/health").status_code == 200


def test_an_error_after_placing_answers_5xx_but_the_call_runs(live: LiveSimulator) -> None:
    live.configure(error_after_placing_rate=1, seed=3)

    answers = [live.place(user_data={"n": n}) for n in range(6)]

    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {500, 502, 504}
    assert len(set(statuses)) > 1, statuses
    for answer in answers:  # Bolna's error shape
        assert answer.json() == {"error": answer.status_code, "message": answer.json()["message"]}
        assert answer.json()["message"]
    executions = live.executions()
    assert [execution["user_data"] for execution in executions] == [{"n": n} for n in range(6)]
    live.receiver.wait_for(executions[0]["id"], "completed")
    after = live.stats()
    assert (after["calls_accepted"], after["errors_after_placing"], after["api_errors"]) == (6, 6, 0)


def test_dropped_webhooks_never_arrive_but_the_call_moves_on(live: LiveSimulator) -> None:
    live.configure(dropped_webhooks={"call-disconnected": 1})

    execution_id = live.place().json()["execution_id"]
    live.receiver.wait_for(execution_id, "completed")

    # Webhooks of a call go out one after another, so call-disconnected, had it been sent, came before completed.
    assert live.receiver.statuses(execution_id) == ["queued", "initiated", "ringing", "in-progress", "completed"]
    final = live.execution(execution_id).json()
    assert final["status"] == "completed"
    assert final["transcript"]
    eventually(lambda: live.stats()["webhooks_sent"] == 5)
    after = live.stats()
    assert (after["webhooks_dropped"], after["webhook_failures"]) == (1, 0)


def test_listing_an_agents_executions(live: LiveSimulator) -> None:
    live.configure(step_delay_seconds=30)  # every call stays queued unless stopped
    placed = [live.place(user_data={"n": n}).json()["execution_id"] for n in range(5)]
    other = live.place(agent_id=OTHER_AGENT_ID).json()["execution_id"]
    stopped = live.http.post(f"{live.url}/call/{placed[1]}/stop", headers=AUTH)
    assert stopped.status_code == 200
    created = [live.execution(execution_id).json()["created_at"] for execution_id in placed]

    def ids(**query: Any) -> list[str]:
        response = live.list(**query)
        assert response.status_code == 200, response.text
        return [execution["id"] for execution in response.json()["data"]]

    everything = live.list().json()
    assert {key: everything[key] for key in ("page_number", "page_size", "total", "has_more")} == {
        "page_number": 1,
        "page_size": 20,
        "total": 5,
        "has_more": False,
    }
    assert [execution["id"] for execution in everything["data"]] == placed[::-1]
    assert everything["data"][0] == live.execution(placed[4]).json()
    assert everything["data"][0]["context_details"]["recipient_data"] == {"n": 4}

    first_page = live.list(page_size=2).json()
    assert [e["id"] for e in first_page["data"]] == [placed[4], placed[3]]
    assert (first_page["total"], first_page["has_more"]) == (5, True)
    last_page = live.list(page_size=2, page_number=3).json()
    assert ([e["id"] for e in last_page["data"]], last_page["has_more"]) == ([placed[0]], False)
    assert live.list(page_size=2, page_number=4).json()["data"] == []
    assert live.list(page_size=5).json()["has_more"] is False  # a page ending exactly at the last one
    assert ids(page_size=50) == placed[::-1]

    assert ids(status="stopped") == [placed[1]]
    assert ids(status="queued") == [placed[4], placed[3], placed[2], placed[0]]
    # Both ends inclusive.
    assert ids(**{"from": created[1], "to": created[3]}) == [placed[3], placed[2], placed[1]]
    assert ids(**{"from": created[3]}) == [placed[4], placed[3]]
    assert ids(to=created[0]) == [placed[0]]
    assert ids(agent_id=OTHER_AGENT_ID.upper()) == [other]

    for query in ({"page_size": 51}, {"page_number": 0}, {"status": "bogus"}, {"to": "2025-05-07T00:00:00"}):
        refused = live.list(**query)
        assert refused.status_code == 400, query
        assert refused.json()["error"] == 400
        assert next(iter(query)) in refused.json()["message"]
    assert live.list(headers={}).status_code == 401
    listed = [r for r in live.requests() if r["path"] == f"/v2/agent/{AGENT_ID}/executions"]
    assert listed and all(r["method"] == "GET" for r in listed)


def test_sim_executions_count_the_dials_of_each_call(live: LiveSimulator) -> None:
    live.configure(error_after_placing_rate=1)  # a dial counts even when its answer was an error
    for callflow_call_id in ("a", "b", "a"):
        live.place(user_data={"callflow_call_id": callflow_call_id})

    executions = live.executions()

    assert Counter(e["user_data"]["callflow_call_id"] for e in executions) == {"a": 2, "b": 1}
    for execution in executions:
        assert (execution["agent_id"], execution["to_number"]) == (AGENT_ID, PHONE)
        assert execution["status"] in COMPLETED_STATUSES
        assert datetime.fromisoformat(execution["created_at"])
        assert live.execution(execution["id"]).status_code == 200


def test_requests_are_recorded_with_their_headers(live: LiveSimulator) -> None:
    live.configure(api_key="sk-live-0123456789abcd")
    key = "Bearer sk-live-0123456789abcd"
    body = {"agent_id": AGENT_ID, "recipient_phone_number": PHONE}

    live.http.post(
        f"{live.url}/call", json=body, headers={"Authorization": key, "sentry-trace": "ab-cd-1", "baggage": "x=1"}
    )
    live.http.post(f"{live.url}/call", json=body, headers={"Authorization": key})

    traced, plain = (r["headers"] for r in live.requests())
    assert (traced["sentry-trace"], traced["baggage"]) == ("ab-cd-1", "x=1")
    assert "sentry-trace" not in plain
    assert "baggage" not in plain
    assert traced["authorization"] == plain["authorization"] == "Bearer ******************abcd"
    assert traced["content-type"] == "application/json"
    assert "sk-live" not in live.http.get(f"{live.url}/_sim/requests").text


def test_new_faults_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_LOST_ANSWER_RATE", "0.1")
    monkeypatch.setenv("SIM_LOST_ANSWER_MODE", "reset")
    monkeypatch.setenv("SIM_ERROR_AFTER_PLACING_RATE", "0.2")
    monkeypatch.setenv("SIM_DROPPED_WEBHOOKS", "completed=0.1,call-disconnected=1")

    config = SimulatorConfig()

    assert (config.lost_answer_rate, config.lost_answer_mode, config.error_after_placing_rate) == (0.1, "reset", 0.2)
    assert config.dropped_webhooks == {"completed": 0.1, "call-disconnected": 1.0}
    assert SimulatorConfig(dropped_webhooks="").dropped_webhooks == {}
    for name, value, problem in (
        ("SIM_DROPPED_WEBHOOKS", "hung-up=1", "hung-up"),
        ("SIM_DROPPED_WEBHOOKS", "completed=1.5", "dropped_webhooks"),
        ("SIM_LOST_ANSWER_MODE", "drop", "lost_answer_mode"),
    ):
        with monkeypatch.context() as patched:
            patched.setenv(name, value)
            with pytest.raises(ValidationError, match=problem):
                SimulatorConfig()


def test_a_seed_reproduces_the_faults_after_placing_and_the_dropped_webhooks(
    make_client: Callable[..., FlaskClient], receiver: WebhookReceiver
) -> None:
    def one_run() -> tuple[list[int], list[list[str]]]:
        client = make_client(
            seed=8,
            lost_answer_rate=0.2,
            timeout_seconds=0,
            error_after_placing_rate=0.3,
            dropped_webhooks={"queued": 0.5, "ringing": 0.5, "completed": 0.5},
        )
        answers = [
            client.post("/call", json={"agent_id": AGENT_ID, "recipient_phone_number": PHONE}, headers=AUTH)
            for _ in range(8)
        ]
        executions = client.get("/_sim/executions").json["executions"]
        eventually(lambda: stats(client)["webhooks_sent"] + stats(client)["webhooks_dropped"] == 6 * 8)
        return [a.status_code for a in answers], [receiver.statuses(e["id"]) for e in executions]

    first, second = one_run(), one_run()

    assert first == second
    codes, delivered = first
    assert len(set(codes)) > 2, codes
    assert len(set(map(tuple, delivered))) > 1, delivered
