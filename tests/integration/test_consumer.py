"""The consumer acknowledges work, and dead-letters what can never succeed with the reason."""

import os
import threading
import time
import uuid

import pika
import pytest

from shared.consumer import Consumer, IncomingMessage, PoisonMessage
from shared.messaging import DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, DEAD_LETTER_REASON_HEADER, Envelope
from tests.support import broker


@pytest.fixture
def work_queue():
    name = f"test.work.{uuid.uuid4().hex[:8]}"
    with broker.channel() as ch:
        ch.queue_declare(
            name, durable=True, arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}
        )
    yield name
    with broker.channel() as ch:
        ch.queue_delete(name)


def _run_consumer(queue: str, handler) -> tuple[threading.Event, threading.Thread]:
    stopping = threading.Event()
    consumer = Consumer(os.environ["RABBITMQ_URL"], queue, handler, prefetch=5, stopping=stopping)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    return stopping, thread


def _dead_letters(ch, message_ids: set[str], timeout: float = 10.0) -> dict[str, pika.BasicProperties]:
    found: dict[str, pika.BasicProperties] = {}
    deadline = time.monotonic() + timeout
    while set(found) != message_ids and time.monotonic() < deadline:
        method, properties, _ = ch.basic_get(DEAD_LETTER_QUEUE, auto_ack=False)
        if method is None:
            time.sleep(0.05)
            continue
        if properties.message_id in message_ids:
            found[properties.message_id] = properties
            ch.basic_ack(method.delivery_tag)
        else:
            ch.basic_nack(method.delivery_tag, requeue=True)
    return found


def test_good_messages_are_handled_and_poison_is_dead_lettered_with_reason(work_queue):
    handled: list[dict] = []

    def handler(message: IncomingMessage) -> None:
        body = message.json()
        if "boom" in body:
            raise RuntimeError("handler bug")
        handled.append(body)

    good = Envelope("test.good", {"n": 1})
    bad_json = Envelope("test.bad", {})
    crashing = Envelope("test.crash", {"boom": True})
    with broker.channel() as ch:
        ch.basic_publish("", work_queue, good.encode(), good.properties())
        ch.basic_publish("", work_queue, b"{not json", bad_json.properties())
        ch.basic_publish("", work_queue, crashing.encode(), crashing.properties())
        stopping, thread = _run_consumer(work_queue, handler)
        try:
            dead = _dead_letters(ch, {bad_json.message_id, crashing.message_id})
        finally:
            stopping.set()
            thread.join(10)
        remaining = ch.queue_declare(work_queue, passive=True).method.message_count

    assert handled == [{"n": 1}]
    assert "not JSON" in dead[bad_json.message_id].headers[DEAD_LETTER_REASON_HEADER]
    assert "handler bug" in dead[crashing.message_id].headers[DEAD_LETTER_REASON_HEADER]
    assert dead[crashing.message_id].headers["x-callflow-original-queue"] == work_queue
    assert remaining == 0
    assert not thread.is_alive()


def test_poison_message_exception_is_dead_lettered(work_queue):
    def handler(message: IncomingMessage) -> None:
        raise PoisonMessage("unknown message type 'x'")

    envelope = Envelope("x", {})
    with broker.channel() as ch:
        ch.basic_publish("", work_queue, envelope.encode(), envelope.properties())
        stopping, thread = _run_consumer(work_queue, handler)
        try:
            dead = _dead_letters(ch, {envelope.message_id})
        finally:
            stopping.set()
            thread.join(10)
    assert dead[envelope.message_id].headers[DEAD_LETTER_REASON_HEADER] == "unknown message type 'x'"
