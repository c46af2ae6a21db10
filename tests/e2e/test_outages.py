"""A queue-processor that loses PostgreSQL or RabbitMQ: a message waits the database's outage out without using an
attempt, and is handled once it is back; /health names the dependency that is down; the consumer reconnects when the
broker is back.

Its connections go through proxies the tests cut, on a vhost of its own, so no other process or test run sees the
outage.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pika
import pytest
from sqlalchemy.engine import make_url

from shared.messaging.publisher import Envelope
from shared.messaging.topology import (
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_REASON_HEADER,
    DISPATCH_QUEUE,
    EVENTS_EXCHANGE,
    RETRY_DELAYS_SECONDS,
    MessageType,
    open_channel,
    retry_queue,
)
from tests.support.isolation import RABBITMQ_HOST_URL, Isolation
from tests.support.processes import ServiceProcess, free_port
from tests.support.stack import wait_until
from tests.support.tcp_proxy import TcpProxy


@dataclass
class Outage:
    queue_processor: ServiceProcess
    database: TcpProxy
    broker: TcpProxy
    broker_url: str  # the vhost, reached directly (not through the proxy)

    def health(self) -> tuple[int, dict]:
        response = httpx.get(f"{self.queue_processor.url}/health", timeout=10)
        return response.status_code, response.json()

    def publish(self, message_type: str, body: bytes) -> str:
        envelope = Envelope(message_type, {})
        with open_channel(self.broker_url) as channel:
            channel.basic_publish(EVENTS_EXCHANGE, message_type, body, envelope.properties())
        return envelope.message_id

    def dead_letter(self, message_id: str) -> pika.BasicProperties | None:
        with open_channel(self.broker_url) as channel:
            while True:
                method, properties, _ = channel.basic_get(DEAD_LETTER_QUEUE, auto_ack=False)
                if method is None:
                    return None
                if properties.message_id == message_id:
                    channel.basic_ack(method.delivery_tag)
                    return properties
                # Closing the channel returns the others to the queue.


@pytest.fixture(scope="module")
def outage(isolation: Isolation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    vhost = Isolation(f"{isolation.name}_outage")
    vhost.create()
    database_url = make_url(isolation.database_url)
    with TcpProxy(database_url.port or 5432) as database, TcpProxy(5672) as broker:
        proxied_database = database_url.set(port=database.port).render_as_string(hide_password=False)
        env = {
            "DATABASE_URL": proxied_database,
            "RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{broker.port}/{vhost.name}",
            "BOLNA_API_URL": "http://127.0.0.1:9",  # never reached: the handlers fail on the database first
        }
        logs: Path = tmp_path_factory.mktemp("outage-logs")
        process = ServiceProcess("services.queue_processor", free_port(), env, logs).start()
        try:
            yield Outage(process, database, broker, f"{RABBITMQ_HOST_URL}/{vhost.name}")
        finally:
            process.stop()
            vhost.destroy()


def _x_death_queues(properties: pika.BasicProperties) -> dict[str, int]:
    """The retry queues a message waited in (RabbitMQ records each dead-lettering by TTL in `x-death`)."""
    return {entry["queue"]: entry["count"] for entry in (properties.headers or {}).get("x-death", [])}


def _waiting(broker_url: str) -> int:
    """The messages ready in the dispatch queue and its retry queues."""
    with open_channel(broker_url) as channel:
        queues = [DISPATCH_QUEUE, *(retry_queue(DISPATCH_QUEUE, delay) for delay in RETRY_DELAYS_SECONDS)]
        return sum(channel.queue_declare(queue, passive=True).method.message_count for queue in queues)


@pytest.mark.timeout(240)
def test_database_down_a_message_waits_the_outage_out_without_using_an_attempt_then_is_handled(outage: Outage):
    failed_as_first_attempt = "again in 30s, as attempt 0"
    outage.database.cut()
    try:
        wait_until(lambda: outage.health()[0] == 503, 30, "/health answers 503 while the database is away")
        _, body = outage.health()
        assert body["checks"]["database"].startswith("error"), body
        assert body["checks"]["rabbitmq"] == "ok", body

        message_id = outage.publish(MessageType.CALL_QUEUED, f'{{"user_id": "{uuid.uuid4()}"}}'.encode())

        def failures() -> list[str]:
            log = outage.queue_processor.log_path.read_text()
            return [line for line in log.splitlines() if f"message {message_id} failed" in line]

        wait_until(lambda: len(failures()) >= 2, 120, "the message meets the outage twice, 30 s apart")
        assert all(failed_as_first_attempt in line for line in failures()), failures()
        assert outage.dead_letter(message_id) is None, "an outage uses up no attempt"
    finally:
        outage.database.restore()

    wait_until(lambda: outage.health()[0] == 200, 30, "/health recovers with the database")
    wait_until(lambda: _waiting(outage.broker_url) == 0, 60, "the message is handled once the database is back")
    sentinel = outage.publish(MessageType.CALL_QUEUED, b"{not json")  # dead-lettered at once, after ours is settled
    wait_until(lambda: outage.dead_letter(sentinel), 30, "the sentinel is dead-lettered")
    assert outage.dead_letter(message_id) is None


@pytest.mark.timeout(240)
def test_broker_down_health_names_it_and_the_consumer_reconnects_when_it_is_back(outage: Outage):
    outage.broker.cut()
    try:
        wait_until(lambda: outage.health()[0] == 503, 30, "/health answers 503 while the broker is away")
        _, body = outage.health()
        assert body["checks"]["rabbitmq"].startswith("error"), body
        assert body["checks"]["database"] == "ok", body
        # Published straight to the broker: only a consumer that has reconnected through the proxy can take it.
        message_id = outage.publish(MessageType.CALL_QUEUED, b"{not json")
    finally:
        outage.broker.restore()

    wait_until(lambda: outage.health()[0] == 200, 30, "/health recovers with the broker")
    dead = wait_until(lambda: outage.dead_letter(message_id), 60, "the reconnected consumer takes the message")
    assert "not JSON" in dead.headers[DEAD_LETTER_REASON_HEADER]
