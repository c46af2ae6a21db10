"""Nothing lost, nothing billed twice, no limit exceeded: 500 calls through a broker outage, a flaky provider,
duplicated and reordered webhooks, and a killed queue-processor."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import func, select

from shared.calls import statuses
from shared.core.models import Call, CreditLedgerEntry, OutboxMessage, User
from tests.support import broker
from tests.support.components import components
from tests.support.factories import Customer, call_row, customer, load_call
from tests.support.invariants import violations
from tests.support.stack import Stack, wait_until

CALLS = 500
LIMITS = (2, 3, 4, 5, 2, 3, 4, 5)
CREDITS = 100_000
PHONE = "+14155550123"


def _place(stack: Stack, owner: Customer) -> httpx.Response:
    body = {"agentId": str(owner.agent_id), "phoneNumber": PHONE}
    return stack.api("POST", "/api/calls", headers=owner.auth, json=body)


def _calls(user_ids: list[uuid.UUID]) -> list[Call]:
    with components().uow() as uow:
        return list(uow.session.scalars(select(Call).where(Call.user_id.in_(user_ids))))


def _unpublished() -> int:
    with components().uow() as uow:
        return uow.session.scalar(select(func.count()).where(OutboxMessage.published_at.is_(None)))


def test_500_calls_survive_broker_outage_flaky_provider_and_a_killed_consumer(
    chaos_stack: Stack, broker_restored, capsys
):
    stack = chaos_stack
    owners = [customer(credits=CREDITS, max_concurrent_calls=limit) for limit in LIMITS]
    answers: list[httpx.Response] = []
    faults: list[str] = []

    def inject_faults() -> None:
        wait_until(lambda: len(answers) >= 80, 120, "traffic before the broker outage")
        broker.stop_broker()
        faults.append(f"RabbitMQ stopped after {len(answers)} answers")
        time.sleep(8)
        broker.start_broker()
        faults.append(f"RabbitMQ back after {len(answers)} answers")
        wait_until(lambda: len(answers) >= 300, 120, "traffic before the kill")
        stack.queue_processor.stop(signal.SIGKILL)
        faults.append(f"queue-processor killed after {len(answers)} answers")
        time.sleep(2)
        stack.queue_processor.start(timeout=60)
        faults.append("queue-processor restarted")

    chaos = threading.Thread(target=inject_faults)
    chaos.start()
    with ThreadPoolExecutor(12) as pool:
        for answer in pool.map(lambda i: _place(stack, owners[i % len(owners)]), range(CALLS)):
            answers.append(answer)
            time.sleep(0.04)  # spread the load so the faults land mid-traffic
    chaos.join(timeout=300)
    assert len(faults) == 4, faults

    codes = Counter(answer.status_code for answer in answers)
    assert set(codes) <= {201, 202, 502}, {
        a.status_code: a.text for a in answers if a.status_code not in (201, 202, 502)
    }
    accepted = {answer.json()["callId"] for answer in answers}
    assert len(accepted) == CALLS, "every request got its own call"

    user_ids = [owner.user_id for owner in owners]
    wait_until(lambda: all(statuses.is_terminal(call.status) for call in _calls(user_ids)), 300, "every call ends")
    wait_until(lambda: _unpublished() == 0, 60, "the outbox drains once the broker is back")
    calls = _calls(user_ids)

    # None lost, each in exactly one terminal state.
    assert {str(call.id) for call in calls} == accepted
    assert all(statuses.is_terminal(call.status) and not call.slot_held for call in calls)

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

    # The provider never saw a customer above their limit.
    peaks = stack.sim_stats()["max_active_calls"]
    for owner, limit in zip(owners, LIMITS, strict=True):
        assert peaks.get(owner.provider_agent_id, 0) <= limit, (owner.provider_agent_id, peaks, limit)
    assert violations() == {}

    outcome = Counter(call.status for call in calls)
    errors = Counter(call.error_type for call in calls if call.error_type)
    with capsys.disabled():  # the counts belong in every run's output, CI's included
        print(
            f"\nchaos: {CALLS} calls; answers {dict(codes)}; faults {faults}\n"
            f"chaos: final states {dict(outcome)}; errors {dict(errors)}\n"
            f"chaos: completed {len(completed)}, charged once each ({sum(spent.values())} credits); "
            f"provider peaks {[peaks.get(o.provider_agent_id, 0) for o in owners]} for limits {list(LIMITS)}\n"
            f"chaos: queued calls retried {sum(call.dispatch_attempts for call in calls)} times"
        )


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
        assert _unpublished() >= len(live), "the slot releases wait in the outbox"
    finally:
        broker.start_broker()

    wait_until(lambda: _unpublished() == 0, 60, "the outbox is relayed once the broker is back")
    wait_until(
        lambda: all(statuses.is_terminal(load_call(call.id).status) for call in waiting), 90, "the waiting calls run"
    )
    assert all(load_call(call.id).credits_charged == 1 for call in live)
