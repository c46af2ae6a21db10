"""Campaigns through the real services and the simulator: every contact ends final, within the campaign's cap and
the customer's limit, direct calls first, fair between campaigns, each call charged once, and a failing campaign
call reported with its queue context."""

from __future__ import annotations

import csv
import io
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select

from shared.bolna.execution import CONTEXT_CALL_ID_KEY
from shared.campaigns import states
from shared.cli import accounts
from shared.core.errors import ErrorType
from shared.core.models import Call, CampaignContact, CreditLedgerEntry, WebhookEvent
from tests.support.components import components
from tests.support.factories import Customer, customer
from tests.support.queue_details import expected_queue_details
from tests.support.slot_sampler import SlotSampler
from tests.support.stack import Stack, wait_until

pytestmark = pytest.mark.e2e

# Each status follows the last at once: a campaign then moves at Callflow's own pace, and a call's webhooks race its
# answer to POST /call as they can with Bolna.
QUICK_CALLS = {"step_delay_seconds": 0.0, "talk_seconds": 0.0, "completed_delay_seconds": 0.0}
RETRY_INTERVAL = timedelta(minutes=0.02)  # 1.2 s
HELD_LINE_SECONDS = 6.0


def _numbers(count: int, start: int = 0) -> list[str]:
    return [f"+1415555{start + i:04d}" for i in range(count)]


def _create(stack: Stack, owner: Customer, numbers: list[str], **settings: object) -> str:
    body = {"name": "Renewals", "agentId": str(owner.agent_id), **settings}
    body["contacts"] = [{"phoneNumber": number, "variables": {"plan": "gold"}} for number in numbers]
    answer = stack.api("POST", "/api/campaigns", headers=owner.auth, json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()["campaignId"]


def _start(stack: Stack, owner: Customer, campaign_id: str, action: str = "start") -> dict:
    answer = stack.api("POST", f"/api/campaigns/{campaign_id}/{action}", headers=owner.auth)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _view(stack: Stack, owner: Customer, campaign_id: str) -> dict:
    answer = stack.api("GET", f"/api/campaigns/{campaign_id}", headers=owner.auth)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _finished(stack: Stack, owner: Customer, campaign_id: str, timeout: float) -> dict:
    return wait_until(
        lambda: (view := _view(stack, owner, campaign_id))["status"] in states.FINISHED and view,
        timeout,
        f"campaign {campaign_id} finishes",
    )


def _campaign_calls(campaign_id: str) -> list[Call]:
    with components().uow() as uow:
        query = select(Call).where(Call.campaign_id == uuid.UUID(campaign_id)).order_by(Call.created_at)
        return list(uow.session.scalars(query))


def _database_now() -> datetime:
    """The database's clock, which stamps each call's `created_at`."""
    with components().uow() as uow:
        return uow.session.scalar(select(func.now()))


def _held_slots(user_id: uuid.UUID) -> int:
    with components().uow() as uow:
        return uow.session.scalar(select(func.count()).where(Call.user_id == user_id, Call.slot_held))


@pytest.mark.timeout(600)
def test_a_thousand_contacts_end_final_within_the_cap_with_retries_and_direct_calls_first(sim):
    some_unanswered = {"completed": 0.8, "no-answer": 0.2}
    sim.sim_config(**QUICK_CALLS, outcomes=some_unanswered)
    owner = customer(credits=100_000, max_concurrent_calls=5)
    direct_agent = accounts.create_agent(components().uow, owner.user_id, "Direct", str(uuid.uuid4()))
    retry = {"maxAttempts": 2, "onStatuses": ["no-answer"], "intervalMinutes": [RETRY_INTERVAL.total_seconds() / 60]}
    campaign_id = _create(sim, owner, _numbers(1000), maxConcurrency=3, retry=retry)
    with SlotSampler() as slots:
        _start(sim, owner, campaign_id)
        wait_until(lambda: _view(sim, owner, campaign_id)["contacts"]["done"] >= 100, 120, "a hundred done")
        # Calls placed now are answered and hold their line for seconds: while the 8 direct calls are posted, each of
        # the 5 slots takes at most one of them, so at least 3 must wait, however fast the API answers.
        sim.sim_config(talk_seconds=HELD_LINE_SECONDS, outcomes={"completed": 1.0})
        posting = time.monotonic()
        direct = [
            sim.api(
                "POST",
                "/api/calls",
                headers=owner.auth,
                json={"agentId": str(direct_agent.id), "phoneNumber": number},
            )
            for number in _numbers(8, start=5000)
        ]
        posting_seconds = time.monotonic() - posting
        sim.sim_config(**QUICK_CALLS, outcomes=some_unanswered)
        view = _finished(sim, owner, campaign_id, 480)
    assert slots.peak(owner.user_id) <= 5, "the customer's limit held"
    assert sim.sim_stats()["max_active_calls"][owner.provider_agent_id] <= 3, "Bolna never had more than 3 at once"

    assert view["status"] == states.COMPLETED and view["finishedAt"] is not None
    assert view["contacts"]["done"] == 1000 and view["contacts"]["waiting"] == view["contacts"]["calling"] == 0
    assert sum(view["results"].values()) == 1000 and set(view["results"]) <= {"completed", "no-answer"}
    calls = _campaign_calls(campaign_id)
    assert view["attempts"] == len(calls) == sum(view["calls"].values())

    # Retries: only after a no-answer, once, and not before the interval had passed since Bolna said so.
    by_contact: dict[int, list[Call]] = {}
    for call in calls:
        by_contact.setdefault(call.contact_id, []).append(call)
    retried = [attempts for attempts in by_contact.values() if len(attempts) > 1]
    assert retried and all(len(attempts) == 2 for attempts in retried)
    with components().uow() as uow:
        no_answer_at = dict(
            uow.session.execute(
                select(WebhookEvent.call_id, WebhookEvent.received_at).where(
                    WebhookEvent.call_id.in_([attempts[0].id for attempts in retried]),
                    WebhookEvent.status == "no-answer",
                )
            ).all()
        )
    for first, second in retried:
        assert first.status == "no-answer"
        assert second.created_at >= no_answer_at[first.id] + RETRY_INTERVAL

    # Charged once each, and dialled once each.
    completed = [call for call in calls if call.status == "completed"]
    with components().uow() as uow:
        charges = uow.session.scalar(
            select(func.count()).where(CreditLedgerEntry.call_id.in_([call.id for call in completed]))
        )
    assert charges == len(completed) and all(call.credits_charged for call in completed)
    dials = Counter(execution["user_data"].get(CONTEXT_CALL_ID_KEY) for execution in sim.sim_executions())
    assert {dials[str(call.id)] for call in calls} == {1}, "each campaign call dialled exactly once"

    # Direct calls posted mid-campaign: a queued one is placed before any campaign call made after it.
    assert all(answer.status_code in (201, 202) for answer in direct)
    queued = [answer.json()["callId"] for answer in direct if answer.status_code == 202]
    assert len(queued) >= 3, (
        "with every new line held, at most 5 of the 8 direct calls could be placed "
        f"(posted in {posting_seconds:.1f} s, lines held {HELD_LINE_SECONDS} s)"
    )
    with components().uow() as uow:
        waited = list(uow.session.scalars(select(Call).where(Call.id.in_([uuid.UUID(c) for c in queued]))))
    margin = timedelta(milliseconds=50)  # a transaction's now() is its start, not its commit
    for direct_call in waited:
        assert direct_call.initiated_at is not None
        jumped = [
            c for c in calls if direct_call.created_at + margin < c.created_at < direct_call.initiated_at - margin
        ]
        assert not jumped, f"campaign calls placed while direct call {direct_call.id} waited: {len(jumped)}"


@pytest.mark.timeout(300)
def test_two_campaigns_of_one_customer_share_its_slots_fairly(sim):
    sim.sim_config(**QUICK_CALLS)
    owner_limit = 4
    owner = customer(credits=100_000, max_concurrent_calls=owner_limit)
    second_agent = accounts.create_agent(components().uow, owner.user_id, "Second", str(uuid.uuid4()))
    first = _create(sim, owner, _numbers(60))
    second = _create(
        sim, Customer(owner.user_id, owner.token, second_agent.id, second_agent.provider_agent_id), _numbers(60, 100)
    )
    _start(sim, owner, first)
    _start(sim, owner, second)
    second_started = _database_now()
    _finished(sim, owner, first, 240)
    _finished(sim, owner, second, 240)
    # The first campaign runs alone until the second's start is answered (how long that takes is the machine's
    # business); from then on, the second gets the next turn, and the two share the slots.
    both_running = _campaign_calls(second)[0].created_at
    made = sorted(_campaign_calls(first) + _campaign_calls(second), key=lambda call: call.created_at)
    head_start = sum(1 for call in made if call.created_at < both_running)
    late = sum(1 for call in made[:head_start] if call.created_at > second_started)
    # At most the one batch a dispatch shares between two campaigns that were both never served in turn.
    assert late <= owner_limit, f"{late} calls of the first campaign after the second had started, before its first"
    shared = [call for call in made if call.created_at >= both_running][:60]
    share = sum(1 for call in shared if str(call.campaign_id) == first) / len(shared)
    print(f"{head_start} calls before the second's first ({late} after its start); of the next 60, {share:.0%} first")
    assert 0.4 <= share <= 0.6, f"unfair split: {share:.0%} / {1 - share:.0%} after a head start of {head_start} calls"


@pytest.mark.timeout(300)
def test_pause_resume_cancel_keep_the_counts_and_cancel_holds_no_slot(sim):
    sim.sim_config(step_delay_seconds=0.05, talk_seconds=0.3, completed_delay_seconds=0.05)
    owner = customer(credits=100_000, max_concurrent_calls=3)
    campaign_id = _create(sim, owner, _numbers(40))
    _start(sim, owner, campaign_id)
    wait_until(lambda: _view(sim, owner, campaign_id)["contacts"]["done"] >= 3, 60, "some contacts done")
    assert _start(sim, owner, campaign_id, "pause")["status"] == states.PAUSED
    assert sim.api("POST", f"/api/campaigns/{campaign_id}/pause", headers=owner.auth).status_code == 409
    wait_until(lambda: _held_slots(owner.user_id) == 0, 60, "the calls under way finish")
    paused = wait_until(
        lambda: (view := _view(sim, owner, campaign_id))["contacts"]["calling"] == 0 and view, 30, "settled"
    )
    time.sleep(2)  # two scheduler rounds: a paused campaign makes no call
    again = _view(sim, owner, campaign_id)
    assert again["attempts"] == paused["attempts"] and again["contacts"] == paused["contacts"]
    assert _consistent(again)

    _start(sim, owner, campaign_id, "resume")
    wait_until(lambda: _view(sim, owner, campaign_id)["contacts"]["done"] >= paused["contacts"]["done"] + 3, 60, "more")
    canceled = _start(sim, owner, campaign_id, "cancel")
    assert canceled["status"] == states.CANCELED
    wait_until(lambda: _held_slots(owner.user_id) == 0, 60, "no slot held after cancel")
    final = wait_until(lambda: (v := _view(sim, owner, campaign_id))["contacts"]["calling"] == 0 and v, 30, "settled")
    assert _consistent(final) and final["contacts"]["done"] == 40
    assert final["results"].get("canceled", 0) > 0 and final["results"].get("completed", 0) >= 6
    assert sim.api("POST", f"/api/campaigns/{campaign_id}/resume", headers=owner.auth).status_code == 409


def _consistent(view: dict) -> bool:
    contacts = view["contacts"]
    return (
        contacts["waiting"] + contacts["calling"] + contacts["done"] == contacts["total"]
        and sum(view["results"].values()) == contacts["done"]
        and sum(view["calls"].values()) == view["attempts"]
    )


@pytest.mark.timeout(300)
def test_running_out_of_credits_pauses_the_campaign_and_every_call_made_is_billed(sim):
    sim.sim_config(**QUICK_CALLS, duration_min_seconds=100, duration_max_seconds=110)  # 2 credits a call
    owner = customer(credits=5, max_concurrent_calls=1)
    campaign_id = _create(sim, owner, _numbers(30))
    _start(sim, owner, campaign_id)
    view = wait_until(
        lambda: (v := _view(sim, owner, campaign_id))["status"] == states.PAUSED and v, 120, "paused for credits"
    )
    assert view["pauseReason"] == states.PAUSED_NO_CREDITS
    wait_until(lambda: _held_slots(owner.user_id) == 0, 60, "the last call finishes")
    calls = _campaign_calls(campaign_id)
    assert 3 <= len(calls) <= 4, "calls stop once the credits are gone"
    wait_until(lambda: all(c.credits_charged == 2 for c in _campaign_calls(campaign_id)), 30, "every call billed")
    _start(sim, owner, campaign_id, "resume")
    view = wait_until(lambda: (v := _view(sim, owner, campaign_id))["status"] == states.PAUSED and v, 30, "again")
    assert view["pauseReason"] == states.PAUSED_NO_CREDITS and len(_campaign_calls(campaign_id)) == len(calls)


def test_a_csv_upload_reports_rejected_rows_and_duplicates_and_results_stream_back(sim):
    sim.sim_config(**QUICK_CALLS)
    owner = customer(credits=1000, max_concurrent_calls=5)
    rows = [["phone_number", "name", "plan"], ["+14155550101", "Ada", "gold"], ["not-a-number", "Bob", "x"]]
    rows += [["+14155550101", "Ada again", "gold"], ["+14155550102", '=HYPERLINK("x")', "silver"]]
    text = "\n".join(",".join(f'"{cell}"' if "," in cell or '"' in cell else cell for cell in row) for row in rows)
    text = text.replace('=HYPERLINK("x")', '"=HYPERLINK(""x"")"')
    answer = sim.api(
        "POST",
        "/api/campaigns",
        headers={**owner.auth, "Content-Type": "text/csv"},
        params={"name": "CSV", "agentId": str(owner.agent_id), "maxConcurrency": "2"},
        content=text.encode(),
    )
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert (created["contacts"], created["duplicates"]) == (2, 1)
    assert [(r["row"], r["phoneNumber"]) for r in created["rejected"]] == [(2, "not-a-number")]
    campaign_id = created["campaignId"]
    _start(sim, owner, campaign_id)
    _finished(sim, owner, campaign_id, 60)
    with components().uow() as uow:
        variables = uow.session.scalars(
            select(CampaignContact.variables).where(CampaignContact.campaign_id == uuid.UUID(campaign_id))
        ).all()
    assert sorted(v["plan"] for v in variables) == ["gold", "silver"]
    user_data = [e["user_data"] for e in sim.sim_executions() if e["user_data"].get("plan") in ("gold", "silver")]
    assert {"gold", "silver"} <= {data["plan"] for data in user_data}, "variables reach Bolna as user_data"

    results = sim.api("GET", f"/api/campaigns/{campaign_id}/results.csv", headers=owner.auth)
    assert results.status_code == 200 and results.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(results.text)))
    assert [row["phone_number"] for row in table] == ["+14155550101", "+14155550102"]
    assert all(row["final_status"] == "completed" and row["attempts"] == "1" and row["call_id"] for row in table)
    assert table[1]["name"].startswith("'="), "a formula from an upload is neutralised"

    page = sim.api("GET", f"/api/campaigns/{campaign_id}/calls", headers=owner.auth, params={"limit": 1}).json()
    rest = sim.api(
        "GET", f"/api/campaigns/{campaign_id}/calls", headers=owner.auth, params={"cursor": page["nextCursor"]}
    ).json()
    assert len(page["calls"]) == 1 and len(rest["calls"]) == 1 and rest["nextCursor"] is None
    assert {page["calls"][0]["callId"], rest["calls"][0]["callId"]} == {row["call_id"] for row in table}
    listed = sim.api("GET", "/api/campaigns", headers=owner.auth).json()["campaigns"]
    assert [c["campaignId"] for c in listed] == [campaign_id]


def test_ten_thousand_contacts_in_one_request_are_one_campaign(stack):
    owner = customer()
    numbers = _numbers(10_000)
    campaign_id = _create(stack, owner, numbers)
    view = _view(stack, owner, campaign_id)
    assert view["contactsTotal"] == view["contacts"]["waiting"] == 10_000 and view["status"] == states.DRAFT
    assert stack.api("POST", f"/api/campaigns/{campaign_id}/cancel", headers=owner.auth).status_code == 200


def test_a_retried_create_with_the_same_idempotency_key_makes_one_campaign(stack):
    owner = customer()
    body = {"name": "Once", "agentId": str(owner.agent_id), "contacts": [{"phoneNumber": "+14155550101"}]}
    headers = {**owner.auth, "Idempotency-Key": f"create-{uuid.uuid4()}"}
    first = stack.api("POST", "/api/campaigns", headers=headers, json=body)
    again = stack.api("POST", "/api/campaigns", headers=headers, json=body)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    other = stack.api("POST", "/api/campaigns", headers=headers, json={**body, "name": "Twice"})
    assert other.status_code == 422 and other.json()["error_type"] == "idempotency_key_reused"
    listed = stack.api("GET", "/api/campaigns", headers=owner.auth).json()["campaigns"]
    assert [c["campaignId"] for c in listed] == [first.json()["campaignId"]]


def test_bad_campaign_requests_are_clear_problems(stack):
    owner = customer()
    cases = [
        ({"name": "x", "agentId": str(owner.agent_id)}, "contacts"),
        ({"name": "x", "agentId": str(owner.agent_id), "contacts": [{"phoneNumber": "nope"}]}, "no valid contact"),
        ({"name": "x", "agentId": str(owner.agent_id), "contacts": [], "retry": {"maxAttempts": 9}}, "maxAttempts"),
        (
            {
                "name": "x",
                "agentId": str(owner.agent_id),
                "contacts": [{"phoneNumber": "+14155550101"}],
                "callingWindow": {"startHour": 18, "endHour": 9},
            },
            "startHour must be before endHour",
        ),
    ]
    for body, reason in cases:
        answer = stack.api("POST", "/api/campaigns", headers=owner.auth, json=body)
        assert answer.status_code == 400 and answer.headers["content-type"] == "application/problem+json"
        assert reason in answer.text, answer.text
    bad_csv = stack.api(
        "POST",
        "/api/campaigns",
        headers={**owner.auth, "Content-Type": "text/csv"},
        params={"name": "x", "agentId": str(owner.agent_id)},
        content=b"number,name\n+14155550101,Ada\n",
    )
    assert bad_csv.status_code == 400 and "phone_number" in bad_csv.json()["detail"]
    unknown = stack.api("POST", f"/api/campaigns/{uuid.uuid4()}/launch", headers=owner.auth)
    assert unknown.status_code == 404


def test_another_customers_campaign_is_404_and_a_security_event(stack):
    owner, intruder = customer(), customer()
    campaign_id = _create(stack, owner, _numbers(2))
    for method, path in (("GET", ""), ("POST", "/start"), ("GET", "/results.csv"), ("GET", "/calls")):
        answer = stack.api(method, f"/api/campaigns/{campaign_id}{path}", headers=intruder.auth)
        assert answer.status_code == 404 and answer.json()["error_type"] == "campaign_not_found"
    events = stack.sentry.wait_for_events(4, error_type="unauthorized_campaign_access", user_id=str(intruder.user_id))
    assert {event.tags["campaign_id"] for event in events} == {campaign_id}
    assert _view(stack, owner, campaign_id)["status"] == states.DRAFT


def test_a_failing_campaign_call_is_reported_with_its_queue_context_in_the_campaigns_trace(sim):
    sim.sim_config(refusal_rate=1.0)  # Bolna refuses every call (400)
    owner = customer(credits=100, max_concurrent_calls=2)
    campaign_id = _create(sim, owner, _numbers(1))
    started = _start(sim, owner, campaign_id)
    events = sim.sentry.wait_for_events(error_type=str(ErrorType.CAMPAIGN_CALL_QUEUE_FAILURE), campaign_id=campaign_id)
    assert len(events) == 1
    event = events[0]
    assert event.tags["call_type"] == "campaign" and event.tags["severity"] == "high"
    details = event.payload["contexts"]["queue_details"]
    (call,) = _campaign_calls(campaign_id)
    assert details == expected_queue_details(call, owner, campaign_id)
    crumbs = [crumb for crumb in event.payload["breadcrumbs"]["values"] if crumb.get("category") == "queue"]
    assert crumbs[0]["message"] == "Reserved campaign call slot"
    assert crumbs[0]["data"] == {"call_id": str(call.id), "user_id": str(owner.user_id)}
    (transaction,) = sim.sentry.transactions(
        lambda item: item.op == "queue.initiate_call" and item.span_data.get("campaign_id") == campaign_id
    )
    assert transaction.payload["transaction"] == "Initiate campaign Call from Queue"
    assert {"queue_id", "user_id", "call_type", "campaign_id", "priority"} <= transaction.span_data.keys()
    assert transaction.tags["campaign_id"] == campaign_id
    view = _view(sim, owner, campaign_id)
    assert event.trace_id == transaction.trace_id == view["traceId"], "the campaign's calls are in its trace"
    assert started["status"] == states.RUNNING
