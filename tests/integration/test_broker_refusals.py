"""RabbitMQ refusing Callflow for a reason no retry mends (its credentials, its vhost) is reported once per place,
however long the services keep trying; a broker that is merely away is not reported at all."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
import sentry_sdk

from services.queue_processor.consumer import Consumer
from shared.core.config import load_settings
from shared.messaging import outbox
from shared.messaging.publisher import Publisher
from shared.messaging.topology import MessageType
from shared.observability.sentry import broker_accepted, init_sentry
from tests.support.components import components
from tests.support.sentry_sink import SentrySink
from tests.support.stack import wait_until


@pytest.fixture
def sentry_sink() -> Iterator[SentrySink]:
    sink = SentrySink().start()
    init_sentry(
        "tests", load_settings().model_copy(update={"sentry_dsn": sink.dsn, "sentry_send_in_development": True})
    )
    yield sink
    init_sentry("tests", load_settings())  # back to no client
    sink.stop()
    for place in ("broker.consume", "broker.publish", "broker.declare"):
        broker_accepted(place)  # what this process remembers of refusals goes with the test


def _reconnects(caplog: pytest.LogCaptureFixture) -> int:
    return sum("broker unreachable" in record.getMessage() for record in caplog.records)


def _consume_until_tried(url: str, caplog: pytest.LogCaptureFixture, tries: int) -> None:
    """Runs a consumer against `url` until it has failed to connect `tries` times, then stops it."""
    stopping = threading.Event()
    consumer = Consumer(url, "callflow.dispatch", lambda _: None, prefetch=1, stopping=stopping)
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        wait_until(lambda: _reconnects(caplog) >= tries, 30, f"the consumer failed to connect {tries} times")
    finally:
        stopping.set()
        thread.join(10)
    assert not thread.is_alive()


_NOBODY = {"user_id": str(uuid.uuid4())}  # a wake-up for a customer who does not exist: harmless once relayed


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{parts.hostname}:{parts.port}"))


def _refusals(sink: SentrySink) -> list[str]:
    sentry_sdk.flush(timeout=10)
    return sorted(event.payload["fingerprint"][1] for event in sink.events(error_type="broker_refused"))


def test_a_consumer_the_broker_keeps_refusing_is_reported_once_however_often_it_tries(sentry_sink, caplog):
    _consume_until_tried(_with_password(os.environ["RABBITMQ_URL"], "not-the-password"), caplog, tries=3)
    assert _refusals(sentry_sink) == ["broker.consume"]


def test_the_relay_refused_by_the_broker_is_reported_once_and_again_after_it_was_let_in(sentry_sink):
    with components().uow() as uow:
        outbox.add(uow.session, MessageType.SLOT_RELEASED, _NOBODY)
        uow.commit()
    refused = Publisher(_with_password(os.environ["RABBITMQ_URL"], "not-the-password"))
    for _ in range(3):
        assert outbox.publish_pending(components().sessions, refused, limit=1_000_000) == 0
    assert _refusals(sentry_sink) == ["broker.publish"]

    assert outbox.publish_pending(components().sessions, components().publisher, limit=1_000_000) >= 1
    with components().uow() as uow:
        outbox.add(uow.session, MessageType.SLOT_RELEASED, _NOBODY)
        uow.commit()
    assert outbox.publish_pending(components().sessions, refused, limit=1_000_000) == 0
    assert _refusals(sentry_sink) == ["broker.publish", "broker.publish"]


def test_a_broker_that_is_merely_away_is_not_reported(sentry_sink, caplog):
    _consume_until_tried("amqp://guest:guest@127.0.0.1:1/%2F", caplog, tries=2)  # nothing listens on port 1
    assert _refusals(sentry_sink) == []
