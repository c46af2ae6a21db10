"""The call path end to end: limits held across processes, every call completed and charged exactly once."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from shared.calls import statuses
from tests.support.factories import Customer, call_row, credits_of, customer, ledger_total, load_call
from tests.support.slot_sampler import SlotSampler
from tests.support.stack import Stack, wait_until

PHONE = "+14155550123"


def _fire(stack: Stack, owner: Customer, count: int) -> list[httpx.Response]:
    body = {"agentId": str(owner.agent_id), "phoneNumber": PHONE, "metadata": {"first_name": "Ada"}}
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda _: stack.api("POST", "/api/calls", headers=owner.auth, json=body), range(count)))


def _wait_all_terminal(stack: Stack, owner: Customer, call_ids: list[str], timeout: float) -> list[dict]:
    def finished():
        views = [stack.call(owner.auth, call_id) for call_id in call_ids]
        return views if all(statuses.is_terminal(view["status"]) for view in views) else None

    return wait_until(finished, timeout, f"all {len(call_ids)} calls reach a terminal status")


def test_six_calls_at_limit_two_two_placed_four_queued_all_completed_and_charged(stack):
    owner = customer(credits=100, max_concurrent_calls=2)
    responses = _fire(stack, owner, 6)

    codes = sorted(response.status_code for response in responses)
    assert codes == [201, 201, 202, 202, 202, 202], [r.text for r in responses]
    for response in responses:
        body = response.json()
        if response.status_code == 201:
            assert body["executionId"] and body["status"] not in ("pending", "failed")
        else:
            assert body == {"callId": body["callId"], "status": "pending"}

    views = _wait_all_terminal(stack, owner, [r.json()["callId"] for r in responses], timeout=90)
    assert [view["status"] for view in views] == ["completed"] * 6
    assert all(view["transcript"] and view["recordingUrl"] and view["durationSeconds"] for view in views)
    assert stack.sim_stats()["max_active_calls"][owner.provider_agent_id] == 2

    charged = sum(view["creditsCharged"] for view in views)
    assert charged > 0
    assert credits_of(owner.user_id) == 100 - charged
    assert ledger_total(owner.user_id) == (6, -charged)


@pytest.mark.timeout(300)
def test_fifty_concurrent_requests_on_two_workers_never_exceed_limit_three(stack):
    owner = customer(credits=10_000, max_concurrent_calls=3)
    with SlotSampler() as slots:
        responses = _fire(stack, owner, 50)
        assert {response.status_code for response in responses} <= {201, 202}, [r.text for r in responses]
        views = _wait_all_terminal(stack, owner, [r.json()["callId"] for r in responses], timeout=240)

    assert slots.peak(owner.user_id) <= 3, f"Callflow held {slots.peak(owner.user_id)} slots at once for a limit of 3"
    assert slots.peak(owner.user_id) > 0, "the sampler never saw a slot held"
    assert sum(response.status_code == 201 for response in responses) <= 3
    assert all(view["status"] == "completed" for view in views)
    peak = stack.sim_stats()["max_active_calls"][owner.provider_agent_id]
    assert peak == 3, f"the provider saw {peak} simultaneous calls for a limit of 3"
    assert ledger_total(owner.user_id)[0] == 50


def test_duplicated_and_reordered_provider_webhooks_charge_each_call_once(sim):
    owner = customer(credits=100, max_concurrent_calls=2)
    sim.sim_config(duplicate_rate=1.0, reorder_rate=0.5)
    responses = _fire(sim, owner, 4)
    views = _wait_all_terminal(sim, owner, [r.json()["callId"] for r in responses], timeout=90)
    assert [view["status"] for view in views] == ["completed"] * 4
    charged = sum(view["creditsCharged"] for view in views)
    assert ledger_total(owner.user_id) == (4, -charged)
    assert credits_of(owner.user_id) == 100 - charged


def test_duplicate_and_out_of_order_webhooks_posted_to_the_receiver(stack):
    owner = customer(credits=10, max_concurrent_calls=1)
    execution_id = str(uuid.uuid4())
    call = call_row(owner, status="queued", execution_id=execution_id, slot_held=True)

    def event(status: str, **fields) -> dict:
        return {"id": execution_id, "agent_id": owner.provider_agent_id, "status": status, **fields}

    completed = event(
        "completed", telephony_data={"duration": "125", "recording_url": "https://rec.example/x"}, transcript="hi"
    )
    sequence = [
        event("ringing"),
        completed,
        event("in-progress"),
        completed,
        event("call-disconnected"),
        event("ringing"),
        completed,
    ]
    answers = [stack.webhook(payload) for payload in sequence]
    assert [answer.status_code for answer in answers] == [200] * len(sequence)
    assert [answer.json()["status"] for answer in answers] == [
        "accepted",
        "accepted",
        "accepted",
        "duplicate",
        "accepted",
        "duplicate",
        "duplicate",
    ]

    final = load_call(call.id)
    assert (final.status, final.credits_charged, final.duration_seconds, final.slot_held) == (
        "completed",
        3,
        125,
        False,
    )
    assert ledger_total(owner.user_id) == (1, -3)
    assert credits_of(owner.user_id) == 7
