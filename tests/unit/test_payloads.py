import uuid

import pytest
from pydantic import ValidationError

from services.call_initiator.request_models import PlaceCallRequest
from shared.bolna.execution import AgentExecution

AGENT = str(uuid.uuid4())


def test_place_call_accepts_e164():
    request = PlaceCallRequest.model_validate({"agentId": AGENT, "phoneNumber": "+14155550123"})
    assert request.phone_number == "+14155550123"
    assert request.metadata == {}


@pytest.mark.parametrize("phone", ["4155550123", "+1 415 555 0123", "+1415555", "+99912345678", "", "+1415555012a"])
def test_place_call_rejects_what_is_not_valid_e164(phone):
    with pytest.raises(ValidationError, match="phoneNumber"):
        PlaceCallRequest.model_validate({"agentId": AGENT, "phoneNumber": phone})


def test_place_call_rejects_unknown_fields_and_wrong_types():
    with pytest.raises(ValidationError, match="extra"):
        PlaceCallRequest.model_validate({"agentId": AGENT, "phoneNumber": "+14155550123", "priority": 1})
    with pytest.raises(ValidationError):
        PlaceCallRequest.model_validate({"agentId": AGENT, "phoneNumber": 14155550123})
    with pytest.raises(ValidationError):
        PlaceCallRequest.model_validate({"agentId": "not-a-uuid", "phoneNumber": "+14155550123"})


def test_place_call_bounds_metadata():
    with pytest.raises(ValidationError, match="metadata"):
        PlaceCallRequest.model_validate(
            {"agentId": AGENT, "phoneNumber": "+14155550123", "metadata": {"x": "y" * 20000}}
        )


def test_webhook_reads_execution_id_from_id_or_execution_id():
    assert AgentExecution({"id": "a"}).execution_id == "a"
    assert AgentExecution({"execution_id": "b"}).execution_id == "b"
    assert AgentExecution({"status": "queued"}).execution_id is None


@pytest.mark.parametrize(
    ("payload", "seconds"),
    [
        ({"telephony_data": {"duration": "61"}, "conversation_duration": 5}, 61),
        ({"telephony_data": {"duration": None}, "conversation_duration": 42.2}, 43),
        ({"conversation_time": "7"}, 7),
        ({"telephony_data": {"duration": "n/a"}}, None),
        ({"conversation_duration": -3}, None),
        ({"telephony_data": {"duration": "0"}, "conversation_duration": 33}, 33),  # a 0 never hides a real one
        ({"telephony_data": {"duration": "0"}}, 0),
    ],
)
def test_webhook_duration_prefers_telephony_then_conversation(payload, seconds):
    assert AgentExecution(payload).duration_seconds == seconds


def test_webhook_finds_our_call_id_in_context_details():
    call_id = uuid.uuid4()
    payload = {"context_details": {"recipient_data": {"callflow_call_id": str(call_id)}}}
    assert AgentExecution(payload).context_call_id == call_id
    assert AgentExecution({"context_details": {"recipient_data": {"callflow_call_id": "junk"}}}).context_call_id is None
    assert AgentExecution({"context_details": "junk"}).context_call_id is None


def test_webhook_attempt_comes_from_retry_count():
    assert AgentExecution({"retry_count": 2}).attempt == 2
    for garbage in ("2", True, False, -1, 10**12, None):
        attempt = AgentExecution({"retry_count": garbage}).attempt
        assert attempt == 0 and type(attempt) is int, garbage
