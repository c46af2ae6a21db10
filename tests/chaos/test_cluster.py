"""Callflow on a 3-node RabbitMQ cluster: two replicas of each service, RABBITMQ_URL naming every node, and the
node the queue-processors consume from killed in the middle of 300 calls, then started again.

Queued calls are placed only through messages here (the pending sweep is set far beyond the test), so a consumer
that does not fail over to a live node leaves calls waiting, and the test fails.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from shared.bolna.execution import CONTEXT_CALL_ID_KEY
from shared.calls import statuses
from shared.core.models import CreditLedgerEntry, User
from shared.messaging.topology import DISPATCH_QUEUE
from tests.conftest import WEBHOOK_SECRET
from tests.support import rabbitmq_cluster
from tests.support.components import components
from tests.support.factories import Customer, customer
from tests.support.invariants import calls_of, unpublished_messages, violations
from tests.support.isolation import Isolation
from tests.support.processes import ServiceProcess, free_port
from tests.support.rabbitmq_cluster import RabbitMQCluster
from tests.support.slot_sampler import SlotSampler
from tests.support.stack import BOLNA_API_KEY, FAST_CALLS, KEEPALIVE_SECONDS, wait_until

pytestmark = pytest.mark.skipif(not rabbitmq_cluster.available(), reason="RabbitMQ's server scripts are not installed")

CALLS = 300
LIMITS = (2, 3, 2, 3, 2, 3)
CREDITS = 100_000
PHONE = "+14155550123"
REQUEST_EVERY_SECONDS = 0.06  # paced over ~18 s, so the node dies while requests are still coming in
KILL_AFTER_ANSWERS = 100
NODE_DOWN_SECONDS = 10
REPLICAS = 2
CLUSTER_ENV = {
    "BOLNA_TIMEOUT_SECONDS": "3",
    "WEB_CONCURRENCY": "2",
    # Only messages place queued calls: the sweep would hide consumers that never came back.
    "PENDING_SWEEP_INTERVAL_SECONDS": "3600",
    "SWEEP_INTERVAL_SECONDS": "2",
}


@dataclass
class ClusterStack:
    simulator: ServiceProcess
    call_initiators: list[ServiceProcess]
    webhook_receivers: list[ServiceProcess]
    queue_processors: list[ServiceProcess]
    http: httpx.Client

    @property
    def processes(self) -> list[ServiceProcess]:
        return [self.simulator, *self.webhook_receivers, *self.queue_processors, *self.call_initiators]

    def sim(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, f"{self.simulator.url}{path}", **kwargs)
        response.raise_for_status()
        return response


@contextmanager
def services_on(cluster: RabbitMQCluster, logs: Path) -> Iterator[ClusterStack]:
    """Two replicas of each service and one simulator, all with RABBITMQ_URL naming the cluster's three nodes."""
    sim_port = free_port()
    env = {
        "RABBITMQ_URL": cluster.url,
        "BOLNA_API_URL": f"http://127.0.0.1:{sim_port}",
        "BOLNA_API_KEY": BOLNA_API_KEY,
        **CLUSTER_ENV,
    }

    def replicas(module: str) -> list[ServiceProcess]:
        return [ServiceProcess(module, free_port(), env, logs) for _ in range(REPLICAS)]

    receivers = replicas("services.webhook_receiver")
    simulator = ServiceProcess(
        "services.bolna_simulator",
        sim_port,
        {"SIM_API_KEY": BOLNA_API_KEY, "SIM_WEBHOOK_URL": _webhook_url(receivers[0])},
        logs,
    )
    stack = ClusterStack(
        simulator=simulator,
        call_initiators=replicas("services.call_initiator"),
        webhook_receivers=receivers,
        queue_processors=replicas("services.queue_processor"),
        http=httpx.Client(timeout=30, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_SECONDS)),
    )
    try:
        with ThreadPoolExecutor(len(stack.processes)) as starting:
            for started in [starting.submit(process.start, 90) for process in stack.processes]:
                started.result()
        stack.sim("POST", "/_sim/config", json=FAST_CALLS)
        yield stack
    finally:
        for process in stack.processes:
            process.stop()
        stack.http.close()


def _webhook_url(receiver: ServiceProcess) -> str:
    return f"{receiver.url}/webhooks/bolna?token={WEBHOOK_SECRET}"


def _consumers_off(cluster: RabbitMQCluster, lost: str) -> list[str]:
    """The nodes other than `lost` that consumers of the dispatch queue are connected to, one entry per consumer."""
    return [node for node in cluster.consumer_nodes(DISPATCH_QUEUE) if node != lost]


@pytest.mark.timeout(360)
def test_300_calls_survive_losing_the_node_the_consumers_use(isolation: Isolation, tmp_path: Path, capsys):
    with ExitStack() as resources:
        started = time.monotonic()
        cluster = resources.enter_context(rabbitmq_cluster.rabbitmq_cluster())
        cluster_started = time.monotonic() - started
        stack = resources.enter_context(services_on(cluster, tmp_path))
        owners = [customer(credits=CREDITS, max_concurrent_calls=limit) for limit in LIMITS]
        user_ids = [owner.user_id for owner in owners]
        answers: list[httpx.Response] = []
        initiators = itertools.cycle(stack.call_initiators)

        def place(owner: Customer, initiator: ServiceProcess) -> None:
            body = {"agentId": str(owner.agent_id), "phoneNumber": PHONE}
            answers.append(stack.http.post(f"{initiator.url}/api/calls", headers=owner.auth, json=body))

        def lose_the_consumers_node() -> tuple[str, Counter[str]]:
            wait_until(lambda: len(answers) >= KILL_AFTER_ANSWERS, 60, "traffic before the node is lost")
            consumed_at = Counter(cluster.consumer_nodes(DISPATCH_QUEUE))
            assert sum(consumed_at.values()) == REPLICAS, f"dispatch consumers per node: {consumed_at}"
            victim = cluster.node(consumed_at.most_common(1)[0][0])
            cluster.kill(victim)
            # The webhooks go to the other receiver from now on: both replicas publish through the cluster.
            stack.sim("POST", "/_sim/config", json={"webhook_url": _webhook_url(stack.webhook_receivers[1])})
            # A quorum queue keeps listing the lost node's consumers until it is back: count those on live nodes.
            wait_until(
                lambda: len(_consumers_off(cluster, victim.name)) == REPLICAS,
                60,
                "both queue-processors consume again, from the nodes still up",
            )
            moved_to = Counter(_consumers_off(cluster, victim.name))
            time.sleep(NODE_DOWN_SECONDS)  # calls keep coming and ending while the node is away
            cluster.start_node(victim)
            cluster.await_startup(victim)
            return victim.name, moved_to

        with SlotSampler() as slots, ThreadPoolExecutor(1) as fault, ThreadPoolExecutor(8) as senders:
            lost = fault.submit(lose_the_consumers_node)
            began = time.monotonic()
            requests = []
            for i in range(CALLS):
                time.sleep(max(0.0, began + i * REQUEST_EVERY_SECONDS - time.monotonic()))
                requests.append(senders.submit(place, owners[i % len(owners)], next(initiators)))
            for request in requests:
                request.result()
            victim, moved_to = lost.result(timeout=180)
            wait_until(
                lambda: all(statuses.is_terminal(call.status) for call in calls_of(user_ids)), 180, "every call ends"
            )
        wait_until(lambda: unpublished_messages() == 0, 60, "the outbox drains through the cluster")
        calls = calls_of(user_ids)
        sim_stats = stack.sim("GET", "/_sim/stats").json()
        executions = stack.sim("GET", "/_sim/executions").json()["executions"]

    codes = Counter(answer.status_code for answer in answers)
    assert set(codes) <= {201, 202}, {a.status_code: a.text for a in answers if a.status_code not in (201, 202)}
    accepted = {answer.json()["callId"] for answer in answers}
    assert len(accepted) == CALLS, "every request got its own call"

    # None lost, each in exactly one terminal state, its slot free.
    assert {str(call.id) for call in calls} == accepted
    assert all(statuses.is_terminal(call.status) and not call.slot_held for call in calls)

    # No customer ever held more slots than their limit, neither as Callflow counts them nor at the provider.
    peaks = sim_stats["max_active_calls"]
    for owner, limit in zip(owners, LIMITS, strict=True):
        assert 0 < slots.peak(owner.user_id) <= limit, (owner.user_id, slots.peak(owner.user_id), limit)
        assert peaks.get(owner.provider_agent_id, 0) <= limit, (owner.provider_agent_id, peaks, limit)

    # Each completed call charged exactly once, and the ledger is the credits' whole story; none dialled twice.
    with components().uow() as uow:
        ledger = Counter(
            uow.session.scalars(select(CreditLedgerEntry.call_id).where(CreditLedgerEntry.user_id.in_(user_ids)))
        )
        spent = {
            user.id: CREDITS - user.credits for user in uow.session.scalars(select(User).where(User.id.in_(user_ids)))
        }
    completed = [call for call in calls if call.status == statuses.COMPLETED]
    assert set(ledger) == {call.id for call in completed} and set(ledger.values()) == {1}
    for owner in owners:
        assert spent[owner.user_id] == sum(c.credits_charged for c in completed if c.user_id == owner.user_id)
    dials = Counter(execution["user_data"].get(CONTEXT_CALL_ID_KEY) for execution in executions)
    assert max(dials[call_id] for call_id in accepted) == 1, [c for c in accepted if dials[c] > 1]
    assert violations() == {}

    with capsys.disabled():  # the figures belong in every run's output, CI's included
        print(
            f"\ncluster: 3 nodes started in {cluster_started:.0f}s; {CALLS} calls, answers {dict(codes)}; killed "
            f"{victim}, consumers moved to {dict(moved_to)}; final states {dict(Counter(c.status for c in calls))}"
        )
