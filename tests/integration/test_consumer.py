"""The consumer acknowledges work, and dead-letters what can never succeed with the reason."""

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pika
import pytest

from services.queue_processor.consumer import Consumer, IncomingMessage, PoisonMessage
from shared.messaging import dead_letters
from shared.messaging.publisher import Envelope
from shared.messaging.topology import (
    ATTEMPT_HEADER,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_REASON_HEADER,
    RETRY_DELAYS_SECONDS,
    retry_queue,
)
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
        for queue in [name, *(retry_queue(name, delay) for delay in RETRY_DELAYS_SECONDS)]:
            ch.queue_delete(queue)


@contextmanager
def _consuming(queue: str, handler) -> Iterator[threading.Thread]:
    """Runs a consumer on its own thread for the block, then stops it as SIGTERM would."""
    stopping = threading.Event()
    consumer = Consumer(os.environ["RABBITMQ_URL"], queue, handler, prefetch=5, stopping=stopping)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stopping.set()
        thread.join(10)


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


def test_good_messages_are_handled_poison_dead_lettered_and_failures_retried(work_queue):
    handled: list[tuple[dict, int]] = []
    failed_once: set[str] = set()

    def handler(message: IncomingMessage) -> None:
        body = message.json()
        if body.get("flaky") and message.message_id not in failed_once:
            failed_once.add(message.message_id)
            raise RuntimeError("passing trouble")
        if body.get("always_fails"):
            raise RuntimeError("handler bug")
        handled.append((body, message.attempt))

    good = Envelope("test.good", {"n": 1})
    bad_json = Envelope("test.bad", {})
    flaky = Envelope("test.flaky", {"flaky": True})
    exhausted = Envelope("test.crash", {"always_fails": True}, headers={ATTEMPT_HEADER: len(RETRY_DELAYS_SECONDS)})
    with broker.channel() as ch:
        for envelope in (good, flaky, exhausted):
            ch.basic_publish("", work_queue, envelope.encode(), envelope.properties())
        ch.basic_publish("", work_queue, b"{not json", bad_json.properties())
        with _consuming(work_queue, handler) as thread:
            dead = _dead_letters(ch, {bad_json.message_id, exhausted.message_id})
            deadline = time.monotonic() + 15
            while len(handled) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
        remaining = ch.queue_declare(work_queue, passive=True).method.message_count

    assert sorted(handled, key=repr) == sorted([({"n": 1}, 0), ({"flaky": True}, 1)], key=repr)
    assert "not JSON" in dead[bad_json.message_id].headers[DEAD_LETTER_REASON_HEADER]
    reason = dead[exhausted.message_id].headers[DEAD_LETTER_REASON_HEADER]
    assert reason.startswith(f"gave up after {len(RETRY_DELAYS_SECONDS) + 1} attempts") and "handler bug" in reason
    assert dead[exhausted.message_id].headers["x-callflow-original-queue"] == work_queue
    assert remaining == 0
    assert not thread.is_alive()


def test_poison_message_exception_is_dead_lettered(work_queue):
    def handler(message: IncomingMessage) -> None:
        raise PoisonMessage("unknown message type 'x'")

    envelope = Envelope("x", {})
    with broker.channel() as ch:
        ch.basic_publish("", work_queue, envelope.encode(), envelope.properties())
        with _consuming(work_queue, handler):
            dead = _dead_letters(ch, {envelope.message_id})
    assert dead[envelope.message_id].headers[DEAD_LETTER_REASON_HEADER] == "unknown message type 'x'"


def test_dead_letters_can_be_listed_and_replayed_into_their_queue(work_queue):
    attempts: list[str] = []

    def handler(message: IncomingMessage) -> None:
        attempts.append(message.message_id)
        if len(attempts) == 1:
            raise PoisonMessage("first delivery refused")

    envelope = Envelope("test.replay", {"n": 7})
    url = os.environ["RABBITMQ_URL"]
    with broker.channel() as ch:
        ch.basic_publish("", work_queue, envelope.encode(), envelope.properties())
        with _consuming(work_queue, handler):
            deadline = time.monotonic() + 10
            while envelope.message_id not in {d.message_id for d in dead_letters.list_dead_letters(url, 1000)}:
                assert time.monotonic() < deadline, "the message never reached the dead-letter queue"
                time.sleep(0.1)
            listed = next(d for d in dead_letters.list_dead_letters(url, 1000) if d.message_id == envelope.message_id)
            assert listed.reason == "first delivery refused"
            assert listed.original_queue == work_queue
            assert listed.as_dict()["body"] == '{"n":7}'
            callctl = Path(sys.executable).parent / "callctl"
            shown = subprocess.run([callctl, "dlq", "list", "--json"], capture_output=True, text=True, check=True)
            assert listed.as_dict() in [json.loads(line) for line in shown.stdout.splitlines()]

            replayed = dead_letters.replay(url, {envelope.message_id})
            assert [letter.message_id for letter in replayed] == [envelope.message_id]
            deadline = time.monotonic() + 10
            while len(attempts) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
    assert attempts == [envelope.message_id, envelope.message_id]
    assert envelope.message_id not in {d.message_id for d in dead_letters.list_dead_letters(url, 1000)}
