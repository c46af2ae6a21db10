"""Nothing lost, nothing dialled or billed twice, no limit exceeded: 500 calls and a campaign through a broker
outage, a flaky provider that loses answers after placing, drops `completed` webhooks or sends them before their
duration, and ends calls in failures of its own, duplicated and reordered webhooks, and a killed queue-processor."""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import func, select

from services.queue_processor.dispatch import TRIGGER_SPAN_DATA, DispatchTrigger
from shared.calls import statuses
from shared.core.errors import ErrorType
from shared.core.models import Call, CampaignContact, CreditLedgerEntry, User
from tests.support import broker
from tests.support.components import components
from tests.support.factories import Customer, call_row, customer, load_call
from tests.support.invariants import calls_of, unpublished_messages, violations
from tests.support.sentry_sink import Item
from tests.support.slot_sampler import SlotSampler
from tests.support.stack import Stack, wait_until

CALLS = 500
LIMITS = (2, 3, 4, 5, 2, 3, 4, 5)
CREDITS = 100_000
PHONE = "+14155550123"
REQUEST_EVERY_SECONDS = 0.08  # paced over ~40 s, so every fault lands while requests are still coming in
OUTAGE_AFTER_ANSWERS = 100
OUTAGE_SECONDS = 8
DISPATCH_OP = "queue.initiate_call"
CAMPAIGN_CONTACTS = 120
CAMPAIGN_LIMIT, CAMPAIGN_CAP = 4, 3


@dataclass(frozen=True)
class Answer:
    response: httpx.Response
    answered_at: float  # time.time()


@dataclass(frozen=True)
class FaultTimes:
    """When each fault happened (time.time()), to compare with the answers' and the dispatches' times."""

    broker_stopped: float
    broker_starting: float
    broker_back: float
    consumer_killed: float


def _place(stack: Stack, owner: Customer) -> Answer:
    body = {"agentId": str(owner.agent_id), "phoneNumber": PHONE}
    response = stack.api("POST", "/api/calls", headers=owner.auth, json=body)
    return Answer(response, time.time())


def _dispatches(stack: Stack, user_ids: list[uuid.UUID], since: float) -> list[Item]:
    """The queued calls of these customers whose placing started at `since` or later."""
    users = {str(user_id) for user_id in user_ids}
    return [
        dispatch
        for dispatch in stack.sentry.transactions_of(DISPATCH_OP)
        if dispatch.span_data.get("user_id") in users and dispatch.started_at >= since
    ]


def _through_messages(dispatches: list[Item]) -> list[Item]:
    return [dispatch for dispatch in dispatches if dispatch.span_data.get(TRIGGER_SPAN_DATA) == DispatchTrigger.MESSAGE]


@pytest.mark.broker_outage
@pytest.mark.timeout(420)
def test_500_calls_survive_broker_outage_flaky_provider_and_a_killed_consumer(
    chaos_stack: Stack, broker_restored, capsys
):
    stack = chaos_stack
    owners = [customer(credits=CREDITS, max_concurrent_calls=limit) for limit in LIMITS]
    user_ids = [owner.user_id for owner in owners]
    answers: list[Answer] = []
    campaigner = customer(credits=CREDITS, max_concurrent_calls=CAMPAIGN_LIMIT)
    campaign_id = _start_campaign(stack, campaigner)

    def inject_faults() -> FaultTimes:
        wait_until(lambda: len(answers) >= OUTAGE_AFTER_ANSWERS, 60, "traffic before the broker outage")
        broker.stop_broker()
        stopped = time.time()
        time.sleep(OUTAGE_SECONDS)
        starting = time.time()
        broker.start_broker()
        back = time.time()
        # The consumer that lived through the outage reconnects and places queued calls again, through messages:
        # the sweep (PENDING_SWEEP_INTERVAL_SECONDS, 60 s here) would hide a consumer that never came back.
        wait_until(
            lambda: _through_messages(_dispatches(stack, user_ids, since=back)),
            90,
            "a queued call placed through a message after the broker came back",
        )
        stack.queue_processor.stop(signal.SIGKILL)
        killed = time.time()
        stack.queue_processor.start(timeout=60)
        return FaultTimes(stopped, starting, back, killed)

    def record(owner: Customer) -> None:
        answers.append(_place(stack, owner))

    with SlotSampler() as slots, ThreadPoolExecutor(1) as fault_thread, ThreadPoolExecutor(12) as senders:
        faults = fault_thread.submit(inject_faults)
        started = time.monotonic()
        requests: list[Future[None]] = []
        for i in range(CALLS):
            time.sleep(max(0.0, started + i * REQUEST_EVERY_SECONDS - time.monotonic()))
            requests.append(senders.submit(record, owners[i % len(owners)]))
        for request in requests:
            request.result()
        times = faults.result(timeout=180)
        # Calls whose answer was lost hold their slot until Bolna's word or the bound: the queue drains slower.

        def every_call_ended() -> bool:
            return all(statuses.is_terminal(call.status) for call in calls_of(user_ids))

        wait_until(every_call_ended, 180, "every call ends")
        all_ended = time.time()
        wait_until(lambda: _campaign_status(stack, campaigner, campaign_id) == "completed", 180, "the campaign ends")
    wait_until(lambda: unpublished_messages() == 0, 30, "the outbox drains once the broker is back")
    calls = calls_of(user_ids)

    codes = Counter(answer.response.status_code for answer in answers)
    assert set(codes) <= {201, 202, 502}, {
        a.response.status_code: a.response.text for a in answers if a.response.status_code not in (201, 202, 502)
    }
    accepted = {answer.response.json()["callId"] for answer in answers}
    assert len(accepted) == CALLS, "every request got its own call"

    # The outage overlapped the traffic: the API kept accepting calls while RabbitMQ was down.
    during_outage = [
        answer
        for answer in answers
        if times.broker_stopped < answer.answered_at < times.broker_starting
        and answer.response.status_code in (201, 202)
    ]
    assert len(during_outage) >= 10, f"only {len(during_outage)} calls were accepted while RabbitMQ was down"

    # Once the broker was back, queued calls were placed through the messages, not by the sweep.
    after_outage = _dispatches(stack, user_ids, since=times.broker_back)
    before_kill = [dispatch for dispatch in after_outage if dispatch.started_at < times.consumer_killed]
    assert _through_messages(before_kill), "the consumer placed nothing through a message after the outage"
    triggers = Counter(dispatch.span_data.get(TRIGGER_SPAN_DATA) for dispatch in after_outage)
    assert triggers[DispatchTrigger.MESSAGE] > triggers[DispatchTrigger.SWEEP], triggers

    # None lost, each in exactly one terminal state.
    assert {str(call.id) for call in calls} == accepted
    assert all(statuses.is_terminal(call.status) and not call.slot_held for call in calls)

    # No customer ever held more slots than their limit, as Callflow itself counts them.
    held = [slots.peak(owner.user_id) for owner in owners]
    for owner, limit in zip(owners, LIMITS, strict=True):
        assert slots.peak(owner.user_id) <= limit, f"{owner.user_id} held {held} slots for limits {list(LIMITS)}"
        assert slots.peak(owner.user_id) > 0, f"the sampler never saw {owner.user_id} hold a slot"

    # Each completed call charged exactly once, and the ledger is the credits' whole story.
    with components().uow() as uow:
        ledger = dict(
            uow.session.execute(
                select(CreditLedgerEntry.call_id, func.count())
                .where(CreditLedgerEntry.user_id.in_(user_ids))
                .group_by(CreditLedgerEntry.call_id)
            ).all()
        )
        spent = {
            user.id: CREDITS - user.credits for user in uow.session.scalars(select(User).where(User.id.in_(user_ids)))
        }
    completed = [call for call in calls if call.status == statuses.COMPLETED]
    assert {call.id for call in completed} == set(ledger)
    assert set(ledger.values()) == {1}
    for owner in owners:
        charged = sum(call.credits_charged for call in completed if call.user_id == owner.user_id)
        assert spent[owner.user_id] == charged

    # The provider never saw a customer above their limit either.
    peaks = stack.sim_stats()["max_active_calls"]
    for owner, limit in zip(owners, LIMITS, strict=True):
        assert peaks.get(owner.provider_agent_id, 0) <= limit, (owner.provider_agent_id, peaks, limit)
    assert violations() == {}

    # Bolna's side of the story: no call dialled twice, and every call Bolna completed charged exactly once, even
    # when Bolna's answer to POST /call or its `completed` webhook was lost.
    executions = stack.sim_executions()
    dials = Counter(execution["user_data"].get("callflow_call_id") for execution in executions)
    ours = {call_id: count for call_id, count in dials.items() if call_id in accepted}
    assert max(ours.values()) == 1, [call_id for call_id, count in ours.items() if count > 1]
    by_id = {str(call.id): call for call in calls}
    completed_at_bolna = {
        execution["user_data"]["callflow_call_id"] for execution in executions if execution["status"] == "completed"
    } & accepted
    assert {call_id for call_id in completed_at_bolna if ledger.get(uuid.UUID(call_id)) != 1} == set()
    assert all(by_id[call_id].status == statuses.COMPLETED for call_id in completed_at_bolna)
    given_up = [call for call in calls if call.error_type == ErrorType.BOLNA_OUTCOME_UNKNOWN]
    assert [call.id for call in given_up if str(call.id) in ours] == [], "a call Bolna placed was given up"
    sim_stats = stack.sim_stats()
    assert sim_stats["answers_lost"] > 0 and sim_stats["webhooks_dropped"] > 0, sim_stats

    # Every call Bolna ended in a failure of its own is reported once (the reports leave after their commit).
    for status, error_type in (("error", ErrorType.BOLNA_CALL_ERROR), ("balance-low", ErrorType.BOLNA_BALANCE_LOW)):
        ended_so = {str(call.id) for call in calls if call.status == status}

        def reports(error_type: ErrorType = error_type, ended_so: set[str] = ended_so) -> dict[str, int]:
            reported = Counter(event.tags.get("call_id") for event in stack.sentry.events(error_type=str(error_type)))
            return {call_id: reported[call_id] for call_id in ended_so}

        wait_until(lambda: 0 not in reports().values(), 30, f"every {status} call reported")
        assert ended_so and reports() == dict.fromkeys(ended_so, 1)
    campaign_summary = _assert_campaign_kept_its_promises(stack, campaigner, campaign_id, slots, executions)

    outcome = Counter(call.status for call in calls)
    errors = Counter(call.error_type for call in calls if call.error_type)
    answered = [answer.answered_at for answer in answers]
    with capsys.disabled():  # the counts belong in every run's output, CI's included
        print(
            f"\nchaos: {CALLS} calls answered over {max(answered) - min(answered):.0f}s; answers {dict(codes)}; "
            f"{len(during_outage)} accepted during the {times.broker_starting - times.broker_stopped:.0f}s outage\n"
            f"chaos: broker back {times.broker_back - min(answered):.0f}s in, queue-processor killed "
            f"{times.consumer_killed - times.broker_back:.0f}s later; dispatches after the outage {dict(triggers)}\n"
            f"chaos: every call ended {all_ended - max(answered):.0f}s after the last answer; final states "
            f"{dict(outcome)}; errors {dict(errors)}\n"
            f"chaos: completed {len(completed)}, charged once each ({sum(spent.values())} credits); "
            f"slot peaks {held} (sampled {slots.samples} times), provider peaks "
            f"{[peaks.get(o.provider_agent_id, 0) for o in owners]} for limits {list(LIMITS)}\n"
            f"chaos: queued calls retried {sum(call.dispatch_attempts for call in calls)} times; Bolna lost "
            f"{sim_stats['answers_lost']} answers after placing and dropped {sim_stats['webhooks_dropped']} webhooks; "
            f"{len(ours)} calls dialled once each, {len(completed_at_bolna)} completed at Bolna\n"
            f"chaos: campaign of {CAMPAIGN_CONTACTS} contacts: {campaign_summary}"
        )


def _start_campaign(stack: Stack, owner: Customer) -> str:
    contacts = [{"phoneNumber": f"+1415556{i:04d}"} for i in range(CAMPAIGN_CONTACTS)]
    body = {
        "name": "Chaos",
        "agentId": str(owner.agent_id),
        "contacts": contacts,
        "maxConcurrency": CAMPAIGN_CAP,
        "retry": {"maxAttempts": 2, "onStatuses": ["no-answer", "busy", "balance-low"], "intervalMinutes": [0]},
    }
    created = stack.api("POST", "/api/campaigns", headers=owner.auth, json=body)
    assert created.status_code == 201, created.text
    campaign_id = created.json()["campaignId"]
    assert stack.api("POST", f"/api/campaigns/{campaign_id}/start", headers=owner.auth).status_code == 200
    return campaign_id


def _campaign_status(stack: Stack, owner: Customer, campaign_id: str) -> str:
    return stack.api("GET", f"/api/campaigns/{campaign_id}", headers=owner.auth).json()["status"]


def _assert_campaign_kept_its_promises(
    stack: Stack, owner: Customer, campaign_id: str, slots: SlotSampler, executions: list[dict]
) -> str:
    """Every contact has its final result; each attempt was dialled once; each completed call charged once; the
    campaign's cap and the customer's limit held."""
    view = stack.api("GET", f"/api/campaigns/{campaign_id}", headers=owner.auth).json()
    assert view["contacts"]["done"] == CAMPAIGN_CONTACTS == sum(view["results"].values()), view
    with components().uow() as uow:
        calls = list(uow.session.scalars(select(Call).where(Call.campaign_id == uuid.UUID(campaign_id))))
        attempts = dict(
            uow.session.execute(
                select(CampaignContact.id, CampaignContact.attempts).where(
                    CampaignContact.campaign_id == uuid.UUID(campaign_id)
                )
            ).all()
        )
        charged = dict(
            uow.session.execute(
                select(CreditLedgerEntry.call_id, func.count())
                .where(CreditLedgerEntry.user_id == owner.user_id)
                .group_by(CreditLedgerEntry.call_id)
            ).all()
        )
    assert Counter(call.contact_id for call in calls) == Counter({k: v for k, v in attempts.items() if v})
    assert max(attempts.values()) <= 2
    campaign_call_ids = {str(call.id) for call in calls}
    dials = Counter(e["user_data"].get("callflow_call_id") for e in executions)
    assert max(dials[call_id] for call_id in campaign_call_ids) <= 1, "a campaign call dialled twice"
    completed = {call.id for call in calls if call.status == statuses.COMPLETED}
    assert set(charged) == completed and set(charged.values()) <= {1}
    assert slots.peak(owner.user_id) <= CAMPAIGN_LIMIT
    assert stack.sim_stats()["max_active_calls"].get(owner.provider_agent_id, 0) <= CAMPAIGN_CAP
    return (
        f"{len(calls)} calls for {CAMPAIGN_CONTACTS} contacts, results {view['results']}, "
        f"{len(completed)} charged once each, slot peak {slots.peak(owner.user_id)}"
    )


@pytest.mark.broker_outage
@pytest.mark.timeout(300)
def test_webhooks_posted_while_the_broker_is_down_are_applied_and_announced_after(chaos_stack: Stack, broker_restored):
    stack = chaos_stack
    owners = [customer(max_concurrent_calls=1) for _ in range(5)]
    live = [call_row(owner, status="in-progress", execution_id=str(uuid.uuid4()), slot_held=True) for owner in owners]
    waiting = [call_row(owner) for owner in owners]

    broker.stop_broker()
    try:
        for call in live:
            completed = {"id": call.execution_id, "status": "completed", "telephony_data": {"duration": "30"}}
            assert stack.webhook(completed).status_code == 200
        assert all(load_call(call.id).status == "completed" for call in live)
        assert unpublished_messages() >= len(live), "the slot releases wait in the outbox"
    finally:
        broker.start_broker()

    wait_until(lambda: unpublished_messages() == 0, 60, "the outbox is relayed once the broker is back")
    wait_until(
        lambda: all(statuses.is_terminal(load_call(call.id).status) for call in waiting), 90, "the waiting calls run"
    )
    assert all(load_call(call.id).credits_charged == 1 for call in live)
