"""Generated bodies, thousands of them, against the real processes under faults: every answer is one the API
documents for that request, the database stays consistent, and the fuzzing is shown to have reached what it must
(calls inserted, idempotency keys claimed, Bolna asked, webhooks applied to real calls)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from shared.calls import statuses
from shared.cli import accounts
from tests.conftest import WEBHOOK_SECRET
from tests.support.components import components
from tests.support.factories import Customer, call_row, customer
from tests.support.invariants import violations
from tests.support.stack import Stack

# A valid call request costs a Bolna round trip (seconds when the flaky provider times out), so the API is fuzzed
# with fewer requests than the webhook receiver: each test runs about as long as when nothing reached Bolna.
CALL_EXAMPLES = 2500
WEBHOOK_EXAMPLES = 5000
FUNDED = 1_000_000  # never runs out, however many calls complete
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
IDS = st.one_of(st.uuids().map(str), st.text(max_size=70), st.integers(), st.none(), JSON)
VALID_PHONES = st.integers(0, 9999).map(lambda n: f"+1415555{n:04d}")  # each one a valid E.164 number
PHONES = st.one_of(
    VALID_PHONES, st.from_regex(r"\+[1-9][0-9]{6,14}", fullmatch=True), st.text(max_size=30), st.integers(), st.none()
)
VALID_METADATA = st.dictionaries(st.text(max_size=12), JSON, max_size=4)
# What HTTP lets a header carry (anything else is refused by the HTTP layer itself): printable, no edge spaces.
HEADER_VALUES = (
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=300).map(str.strip).filter(bool)
)
DURATIONS = st.one_of(st.integers(0, 7200).map(str), st.text(max_size=20), JSON)

# The refusals a generated request may get, by status. A valid body of the funded customer reaches Bolna; only its
# definite refusals would be a 502 (its errors and timeouts on this stack are ambiguous: 202 `initiating`); nothing
# else may be a 5xx.
REFUSALS = {
    400: {"validation_error"},
    402: {"insufficient_credits"},
    403: {"unauthorized_agent_access"},
    404: {"agent_not_found"},
    422: {"agent_not_configured", "idempotency_key_reused"},
    502: {"bolna_api_failure"},
}
WEBHOOK_REFUSALS = {400: {"empty_webhook_payload", "missing_execution_id", "invalid_webhook_payload"}}

# What the fuzzing must at least have reached; a run reaches several times more.
MIN_CALLS_PLACED = 30
MIN_CLAIMED_KEYS = 20
MIN_EVENTS_APPLIED = 200
MIN_CALLS_ENDED_BY_WEBHOOKS = 50


def one_in(n: int, rare: st.SearchStrategy, common: st.SearchStrategy) -> st.SearchStrategy:
    """`rare` about once in `n` draws, else `common`. (one_of would weigh each alternative nested in `common` as
    much as `rare`, so real ids and valid bodies would be drowned.)"""
    return st.sampled_from(range(n)).flatmap(lambda draw: rare if draw == 0 else common)


@pytest.fixture(scope="module")
def client() -> httpx.Client:
    with httpx.Client(timeout=30) as http:
        yield http


def _refusal(answer: httpx.Response, allowed: dict[int, set[str]]) -> dict[str, Any]:
    assert answer.status_code in allowed, f"{answer.status_code}: {answer.text}"
    assert answer.headers["content-type"] == "application/problem+json", answer.text
    problem = answer.json()
    assert problem["error_type"] in allowed[answer.status_code], answer.text
    return problem


def _count(query: str, **params: object) -> int:
    with components().engine.connect() as conn:
        return conn.execute(text(query), params).scalar_one()


@pytest.mark.timeout(300)
def test_generated_call_requests_get_only_documented_answers(chaos_stack: Stack, client: httpx.Client):
    funded = customer(credits=FUNDED, max_concurrent_calls=10)
    broke, stranger = customer(credits=0), customer()
    unconfigured = accounts.create_agent(components().uow, funded.user_id, "Unconfigured", None)
    agents = [funded.agent_id, broke.agent_id, stranger.agent_id, unconfigured.id]
    fuzzed = st.one_of(
        JSON,
        st.fixed_dictionaries(
            {"agentId": one_in(2, st.sampled_from(agents).map(str), IDS), "phoneNumber": PHONES},
            optional={"metadata": one_in(2, VALID_METADATA, JSON), "priority": JSON, "phone_number": PHONES},
        ),
    )

    def requests_of(owner: Customer) -> st.SearchStrategy:
        """A customer's requests; the valid ones name its own agent (the funded reach Bolna, the broke get 402)."""
        valid = st.fixed_dictionaries(
            {"agentId": st.just(str(owner.agent_id)), "phoneNumber": VALID_PHONES},
            optional={"metadata": VALID_METADATA},
        )
        return st.tuples(st.just(owner), one_in(8, valid, fuzzed))

    requests = st.sampled_from([funded, funded, funded, broke]).flatmap(requests_of)
    url = f"{chaos_stack.call_initiator.url}/api/calls"
    placed: dict[str, str] = {}  # callId -> executionId, from 201 answers
    failed_at_bolna: set[str] = set()  # callIds from 502 answers

    @settings(max_examples=CALL_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request=requests, key=st.one_of(st.none(), HEADER_VALUES))
    def post(request: tuple[Customer, Any], key: str | None):
        owner, body = request
        headers = {**owner.auth, **({"Idempotency-Key": key} if key is not None else {})}
        answer = client.post(url, json=body, headers=headers)
        if answer.status_code in (201, 202):
            assert owner is funded, answer.text
            accepted = answer.json()
            if answer.status_code == 201:
                assert accepted["executionId"], accepted
                placed[accepted["callId"]] = accepted["executionId"]
            else:
                # Queued, or Bolna's answer lost: then the call is `initiating`, unless its webhook came first (the
                # receiver links it by our id and moves it on before the call-initiator reads it back).
                waiting = (statuses.PENDING, statuses.INITIATING)
                assert accepted["status"] in waiting or accepted["status"] in statuses.PROVIDER_STATUSES, accepted
                if accepted["status"] not in waiting:
                    with components().uow() as uow:
                        linked = uow.session.scalar(
                            text("SELECT execution_id FROM calls WHERE id = :id"), {"id": accepted["callId"]}
                        )
                    assert linked, accepted
            return
        problem = _refusal(answer, REFUSALS)
        if answer.status_code == 402:
            assert owner is broke, answer.text
        if answer.status_code == 502:
            assert owner is funded, answer.text
            failed_at_bolna.add(problem["callId"])

    post()

    assert violations() == {}
    # The fuzzing reached the inserts, the key claims and Bolna (an execution id is only Bolna's to give).
    funded_user = {"user_id": funded.user_id}
    placed_calls = _count(
        "SELECT count(*) FROM calls WHERE user_id = :user_id AND execution_id IS NOT NULL", **funded_user
    )
    assert placed_calls >= MIN_CALLS_PLACED
    assert _count("SELECT count(*) FROM idempotency_keys WHERE user_id = :user_id", **funded_user) >= MIN_CLAIMED_KEYS
    # A 201 names the execution its call is linked to; a 502 names a call failed for Bolna's failure, slot freed.
    with components().engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id::text, execution_id, status, error_type, slot_held FROM calls WHERE user_id = :user_id"),
            funded_user,
        ).all()
    calls = {row.id: row for row in rows}
    assert {call_id: calls[call_id].execution_id for call_id in placed} == placed
    failed = {
        (calls[call_id].status, calls[call_id].error_type, calls[call_id].slot_held) for call_id in failed_at_bolna
    }
    assert failed <= {("failed", "bolna_api_failure", False)}


@pytest.mark.timeout(300)
def test_generated_webhooks_get_only_documented_answers(chaos_stack: Stack, client: httpx.Client):
    # Live calls the webhooks can reach: most known by their execution id, some (not linked yet) by our call id.
    owner = customer(credits=FUNDED, max_concurrent_calls=400)
    known = [call_row(owner, status="queued", execution_id=str(uuid.uuid4()), slot_held=True) for _ in range(300)]
    unlinked = [call_row(owner, status=statuses.INITIATING, slot_held=True) for _ in range(100)]
    execution_ids = one_in(2, st.sampled_from([call.execution_id for call in known]), IDS)
    our_call_ids = one_in(2, st.sampled_from([str(call.id) for call in known + unlinked]), IDS)
    webhook_statuses = one_in(2, st.sampled_from(sorted(statuses.PROVIDER_STATUSES)), st.text(max_size=40) | JSON)
    url = f"{chaos_stack.webhook_receiver.url}/webhooks/bolna"
    bodies = st.one_of(
        JSON,
        st.fixed_dictionaries(
            {"id": execution_ids, "status": webhook_statuses},
            optional={
                "execution_id": execution_ids,
                "retry_count": st.one_of(st.integers(), JSON),
                "transcript": st.one_of(st.text(max_size=200), JSON),
                "telephony_data": st.one_of(st.fixed_dictionaries({}, optional={"duration": DURATIONS}), JSON),
                "conversation_duration": JSON,
                "context_details": st.one_of(
                    st.fixed_dictionaries(
                        {"recipient_data": st.fixed_dictionaries({"callflow_call_id": our_call_ids})}
                    ),
                    JSON,
                ),
            },
        ),
    )
    token = {"token": WEBHOOK_SECRET}

    # Generated statuses end most calls before a usable `completed` reaches them: one such webhook is always sent
    # first, so every run reaches billing, whatever the draw.
    billed = {"id": known[0].execution_id, "status": "completed", "telephony_data": {"duration": "61"}}

    @settings(max_examples=WEBHOOK_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    @example(body=billed)
    def post(body: Any):
        answer = client.post(url, params=token, json=body)
        if answer.status_code == 200:
            assert answer.json()["status"] in ("accepted", "duplicate"), answer.text
        else:
            _refusal(answer, WEBHOOK_REFUSALS)

    post()
    too_deep = client.post(url, params=token, content=b"[" * 100_000 + b"]" * 100_000)
    assert _refusal(too_deep, WEBHOOK_REFUSALS)["error_type"] == "invalid_webhook_payload"
    nul = client.post(url, params=token, json={"id": str(uuid.uuid4()), "status": "queued", "transcript": "a\x00"})
    assert (nul.status_code, nul.json()["status"]) == (200, "accepted")

    assert violations() == {}
    # The webhooks reached real calls: applied to them, ending them (which frees the slot and may charge).
    ours = {"user_id": owner.user_id}
    applied = _count(
        "SELECT count(*) FROM webhook_events e JOIN calls c ON c.id = e.call_id "
        "WHERE c.user_id = :user_id AND e.applied_at IS NOT NULL",
        **ours,
    )
    assert applied >= MIN_EVENTS_APPLIED
    ended = _count(
        "SELECT count(*) FROM calls WHERE user_id = :user_id AND status = ANY(:ended) AND NOT slot_held",
        **ours,
        ended=sorted(statuses.RELEASES_SLOT),
    )
    assert ended >= MIN_CALLS_ENDED_BY_WEBHOOKS
    assert _count("SELECT count(*) FROM credit_ledger WHERE user_id = :user_id", **ours) >= 1
