"""A broker that accepts connections but holds up its answers (blocked by a memory or disk alarm, or slow) never
holds up the API: POST /api/calls answers, and the message its commit announced is left to the outbox relay once
the publishing thread has given up on it.

The API reaches the broker through a proxy the test holds up, on this run's vhost, so no other process or test run
sees the slow broker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from shared.core.models import OutboxMessage
from tests.support.components import components
from tests.support.factories import call_row, customer
from tests.support.processes import ServiceProcess, free_port
from tests.support.slow_broker import HoldingBrokerProxy
from tests.support.stack import wait_until


@pytest.fixture(scope="module")
def blocked_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, HoldingBrokerProxy]]:
    """The call API, started while its broker answers."""
    logs: Path = tmp_path_factory.mktemp("slow-broker-logs")
    with HoldingBrokerProxy(os.environ["RABBITMQ_URL"]) as proxy:
        env = {"RABBITMQ_URL": proxy.url, "BOLNA_API_URL": "http://127.0.0.1:9"}  # never reached: no slot is free
        api = ServiceProcess("services.call_initiator", free_port(), env, logs).start()
        try:
            yield api, proxy
        finally:
            api.stop()


def _announcements(user_id: object) -> list[OutboxMessage]:
    with components().uow() as uow:
        query = select(OutboxMessage).where(OutboxMessage.body["user_id"].astext == str(user_id))
        return list(uow.session.scalars(query))


@pytest.mark.timeout(120)
def test_calls_are_accepted_while_the_broker_is_blocked_and_their_messages_left_to_the_relay(blocked_broker):
    api, proxy = blocked_broker
    owner = customer(max_concurrent_calls=1)
    call_row(owner, status="in-progress", slot_held=True)  # new calls are queued, announced by call.queued
    proxy.block_clients()
    body = {"agentId": str(owner.agent_id), "phoneNumber": "+14155550123"}
    responses = [httpx.post(f"{api.url}/api/calls", headers=owner.auth, json=body, timeout=10) for _ in range(2)]
    assert [response.status_code for response in responses] == [202, 202], [r.text for r in responses]

    def given_up() -> list[OutboxMessage]:
        # The first message is tried and given up on; one committed during the pause that follows is not even
        # tried. Either way it waits, unpublished, for the relay.
        rows = sorted(_announcements(owner.user_id), key=lambda row: row.id)
        return rows if len(rows) == 2 and rows[0].attempts >= 1 else []

    rows = wait_until(given_up, 30, "the publishing thread gives up on the first message")
    assert "BrokerTooSlow" in rows[0].last_error, rows[0].last_error
    assert [row.published_at for row in rows] == [None, None], "left to the relay"
