"""Generated bodies, thousands of them, against the real processes: never a 5xx, never an inconsistent database."""

from __future__ import annotations

import uuid

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.calls import statuses
from tests.conftest import WEBHOOK_SECRET
from tests.support.factories import customer
from tests.support.invariants import violations
from tests.support.stack import Stack

EXAMPLES = 5000
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
IDS = st.one_of(st.uuids().map(str), st.text(max_size=70), st.integers(), st.none(), JSON)
PHONES = st.one_of(st.from_regex(r"\+[1-9][0-9]{6,14}", fullmatch=True), st.text(max_size=30), st.integers(), st.none())
# What HTTP lets a header carry (anything else is refused by the HTTP layer itself): printable, no edge spaces.
HEADER_VALUES = (
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=300).map(str.strip).filter(bool)
)
STATUSES = st.one_of(st.sampled_from(sorted(statuses.PROVIDER_STATUSES)), st.text(max_size=40), JSON)


@pytest.fixture(scope="module")
def client() -> httpx.Client:
    with httpx.Client(timeout=30) as http:
        yield http


def _never_5xx(answer: httpx.Response) -> None:
    assert answer.status_code < 500, f"{answer.status_code}: {answer.text}"
    if answer.status_code >= 400:
        assert answer.headers["content-type"] == "application/problem+json"


@pytest.mark.timeout(900)
def test_generated_call_requests_never_get_a_5xx(chaos_stack: Stack, client: httpx.Client):
    # No credits: a valid body is refused (402) before the provider, whose failures are a legitimate 502.
    owner = customer(credits=0)
    agent_ids = st.one_of(st.just(str(owner.agent_id)), IDS)
    bodies = st.one_of(
        JSON,
        st.fixed_dictionaries(
            {"agentId": agent_ids, "phoneNumber": PHONES},
            optional={"metadata": JSON, "priority": JSON, "phone_number": PHONES},
        ),
    )
    url = f"{chaos_stack.call_initiator.url}/api/calls"

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, key=st.one_of(st.none(), HEADER_VALUES))
    def post(body, key):
        headers = {**owner.auth, **({"Idempotency-Key": key} if key is not None else {})}
        _never_5xx(client.post(url, json=body, headers=headers))

    post()
    assert violations() == {}


@pytest.mark.timeout(900)
def test_generated_webhooks_never_get_a_5xx(chaos_stack: Stack, client: httpx.Client):
    url = f"{chaos_stack.webhook_receiver.url}/webhooks/bolna"
    bodies = st.one_of(
        JSON,
        st.fixed_dictionaries(
            {"id": IDS, "status": STATUSES},
            optional={
                "execution_id": IDS,
                "retry_count": st.one_of(st.integers(), JSON),
                "transcript": st.one_of(st.text(max_size=200), JSON),
                "telephony_data": st.one_of(
                    st.fixed_dictionaries({}, optional={"duration": st.one_of(st.text(max_size=20), JSON)}), JSON
                ),
                "conversation_duration": JSON,
                "context_details": st.one_of(
                    st.fixed_dictionaries({"recipient_data": st.fixed_dictionaries({"callflow_call_id": IDS})}), JSON
                ),
            },
        ),
    )

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def post(body):
        _never_5xx(client.post(url, params={"token": WEBHOOK_SECRET}, json=body))

    post()
    token = {"token": WEBHOOK_SECRET}
    _never_5xx(client.post(url, params=token, content=b"[" * 100_000 + b"]" * 100_000))
    _never_5xx(
        client.post(url, params=token, json={"id": str(uuid.uuid4()), "status": "queued", "transcript": "a\x00"})
    )
    assert violations() == {}
