"""Every error path of the API and the webhook receiver, against the real processes: status and error_type."""

import uuid

import pytest

from tests.conftest import WEBHOOK_SECRET
from tests.support.factories import customer
from tests.support.stack import wait_until

PHONE = "+14155550123"


def _assert_problem(response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["error_type"] == error_type
    assert body["status"] == status
    assert body["type"] == f"urn:callflow:problem:{error_type}"
    assert body["title"] and body["detail"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


def _place(stack, owner, **overrides):
    body = {"agentId": str(owner.agent_id), "phoneNumber": PHONE, **overrides}
    return stack.api("POST", "/api/calls", headers=owner.auth, json=body)


def test_missing_token_is_401(stack):
    _assert_problem(stack.api("POST", "/api/calls", json={}), 401, "unauthorized")


def test_wrong_token_is_401_even_with_a_bad_body(stack):
    response = stack.api("POST", "/api/calls", headers={"Authorization": "Bearer cf_nope"}, content=b"{")
    _assert_problem(response, 401, "unauthorized")


def test_body_that_is_not_json_is_400(stack):
    owner = customer()
    response = stack.api("POST", "/api/calls", headers=owner.auth, content=b"{not json")
    _assert_problem(response, 400, "validation_error")


@pytest.mark.parametrize("phone", ["4155550123", "+1415555", "+1 415 555 0123"])
def test_phone_that_is_not_e164_is_400(stack, phone):
    body = _assert_problem(_place(stack, customer(), phoneNumber=phone), 400, "validation_error")
    assert body["errors"][0]["field"] == "phoneNumber"


@pytest.mark.parametrize("raw", [b'{"agentId": NaN}', b'{"phoneNumber": Infinity}', b'{"agentId": "\\ud800"}'])
def test_json_postgresql_cannot_store_is_400(stack, raw):
    owner = customer()
    _assert_problem(stack.api("POST", "/api/calls", headers=owner.auth, content=raw), 400, "validation_error")
    hook = stack.http.post(
        f"{stack.webhook_receiver.url}/webhooks/bolna", params={"token": WEBHOOK_SECRET}, content=raw
    )
    # A webhook is never refused for its content: sanitized, this one is refused only for having no execution id.
    _assert_problem(hook, 400, "missing_execution_id")


def test_unknown_field_is_400(stack):
    body = _assert_problem(_place(stack, customer(), priority=3), 400, "validation_error")
    assert body["errors"][0]["field"] == "priority"


def test_unknown_agent_is_404(stack):
    _assert_problem(_place(stack, customer(), agentId=str(uuid.uuid4())), 404, "agent_not_found")


def test_agent_of_another_user_is_403(stack):
    owner, intruder = customer(), customer()
    _assert_problem(_place(stack, intruder, agentId=str(owner.agent_id)), 403, "unauthorized_agent_access")


def test_agent_without_provider_id_is_422(stack):
    _assert_problem(_place(stack, customer(configured=False)), 422, "agent_not_configured")


def test_no_credits_is_402(stack):
    _assert_problem(_place(stack, customer(credits=0)), 402, "insufficient_credits")


def test_provider_refusal_is_502_fails_the_call_and_frees_the_slot(sim):
    owner = customer(max_concurrent_calls=1)
    sim.sim_config(refusal_rate=1.0)  # Bolna's definite 400: nothing was placed
    try:
        body = _assert_problem(_place(sim, owner), 502, "bolna_api_failure")
    finally:
        sim.sim_config(refusal_rate=0.0)
    failed = sim.call(owner.auth, body["callId"])
    assert failed["status"] == "failed"
    assert failed["errorType"] == "bolna_api_failure"

    retry = _place(sim, owner)
    assert retry.status_code == 201, "the failed call's slot must have been released"
    wait_until(lambda: sim.call(owner.auth, retry.json()["callId"])["status"] == "completed", 30, "call completes")


@pytest.mark.parametrize("fault", [{"error_rate": 1.0}, {"timeout_rate": 1.0, "timeout_seconds": 6}])
def test_provider_5xx_or_timeout_is_202_initiating_because_bolna_may_have_placed_the_call(sim, fault):
    owner = customer(max_concurrent_calls=1)
    sim.sim_config(**fault)
    response = _place(sim, owner)
    assert response.status_code == 202, response.text
    assert response.json() == {"callId": response.json()["callId"], "status": "initiating"}


def test_call_of_another_user_is_404(stack):
    owner, other = customer(), customer()
    placed = _place(stack, owner)
    assert placed.status_code == 201
    _assert_problem(
        stack.api("GET", f"/api/calls/{placed.json()['callId']}", headers=other.auth), 404, "call_not_found"
    )
    _assert_problem(stack.api("GET", "/api/calls/not-a-uuid", headers=owner.auth), 404, "call_not_found")


def test_unknown_route_is_problem_json(stack):
    _assert_problem(stack.api("GET", "/api/nothing-here"), 404, "not_found")


@pytest.mark.parametrize("token", [None, "", "wrong-secret"])
def test_webhook_with_missing_or_wrong_token_is_401(stack, token):
    _assert_problem(stack.webhook({"id": "x", "status": "ringing"}, token=token), 401, "webhook_auth_failed")


def test_empty_webhook_is_400(stack):
    _assert_problem(stack.webhook(None), 400, "empty_webhook_payload")
    _assert_problem(stack.webhook({}), 400, "empty_webhook_payload")


def test_repeated_webhook_with_a_boolean_retry_count_is_a_duplicate_not_a_500(stack):
    payload = {"id": str(uuid.uuid4()), "status": "balance-low", "retry_count": False}
    answers = [stack.webhook(payload) for _ in range(2)]
    assert [answer.status_code for answer in answers] == [200, 200]
    assert [answer.json()["status"] for answer in answers] == ["accepted", "duplicate"]


def test_webhook_without_execution_id_is_400(stack):
    _assert_problem(stack.webhook({"status": "completed"}), 400, "missing_execution_id")
