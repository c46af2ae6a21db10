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
from dataclasses import replace
from pathlib import Path

import pika
import psycopg
import pytest
from sqlalchemy.exc import OperationalError

from services.queue_processor.consumer import OUTAGE_WAIT_LIMIT, Consumer, IncomingMessage, PoisonMessage
from shared.messaging import dead_letters
from shared.messaging.dead_letters import FORMER_DEAD_LETTER_QUEUE
from shared.messaging.publisher import Envelope
from shared.messaging.topology import (
    ATTEMPT_HEADER,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEAD_LETTER_REASON_HEADER,
    DELIVERY_COUNT_HEADER,
    DISPATCH_DELIVERY_LIMIT,
    DISPATCH_QUEUE,
    HEADERS_DROPPED_HEADER,
    HEARTBEAT_SECONDS,
    ORIGINAL_QUEUE_HEADER,
    OUTAGE_WAITS_HEADER,
    RETRY_DELAYS_SECONDS,
    delete_former_retry_queues,
    former_retry_queue,
    retry_queue,
)
from tests.support import broker
from tests.support.stack import wait_until


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
def _consuming(queue: str, handler, heartbeat_seconds: int = HEARTBEAT_SECONDS) -> Iterator[threading.Thread]:
    """Runs a consumer on its own thread for the block, then stops it as SIGTERM would."""
    stopping = threading.Event()
    consumer = Consumer(
        os.environ["RABBITMQ_URL"], queue, handler, prefetch=5, stopping=stopping, heartbeat_seconds=heartbeat_seconds
    )
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stopping.set()
        thread.join(10)


def _dead_letters_up_to(
    ch, queue: str, sentinel_id: str, timeout: float = 15.0
) -> dict[str, list[pika.BasicProperties]]:
    """Every copy of every letter dead-lettered from `queue`, by message id, up to `sentinel_id`, a message
    dead-lettered after the others: a second copy of an earlier letter is in the queue before it. Letters from
    other queues stay queued."""
    found: dict[str, list[pika.BasicProperties]] = {}
    others: list[int] = []
    deadline = time.monotonic() + timeout
    while sentinel_id not in found:
        method, properties, _ = ch.basic_get(DEAD_LETTER_QUEUE, auto_ack=False)
        if method is None:
            assert time.monotonic() < deadline, f"the sentinel was never dead-lettered; got {sorted(found)}"
            time.sleep(0.05)
            continue
        if (properties.headers or {}).get(ORIGINAL_QUEUE_HEADER) == queue:
            found.setdefault(properties.message_id, []).append(properties)
            ch.basic_ack(method.delivery_tag)
        else:
            others.append(method.delivery_tag)
    for delivery_tag in others:
        ch.basic_nack(delivery_tag, requeue=True)
    return found


def _handled_until(handled: list[IncomingMessage], sentinel_id: str, attempt: int, timeout: float = 15.0) -> None:
    """Waits until the sentinel was handled at `attempt`."""
    deadline = time.monotonic() + timeout
    while not any(m.message_id == sentinel_id and m.attempt == attempt for m in list(handled)):
        assert time.monotonic() < deadline, f"the sentinel was never handled at attempt {attempt}"
        time.sleep(0.05)


def _filling_a_frame(envelope: Envelope) -> Envelope:
    """The envelope with a header that brings its properties to the most one frame carries (its content header's
    payload: 12 bytes, then the properties)."""
    most = pika.spec.FRAME_MAX_SIZE - 8 - 12
    filled = replace(envelope, headers={"filler": ""})
    size = sum(len(part) for part in filled.properties().encode())
    return replace(envelope, headers={"filler": "x" * (most - size)})


def test_a_message_that_would_kill_the_connection_again_is_dead_lettered_and_those_behind_it_are_handled(work_queue):
    handled: list[IncomingMessage] = []
    full = _filling_a_frame(Envelope("test.bad", {}))  # a copy with a reason header more would not fit a frame
    given_back = {DELIVERY_COUNT_HEADER: DISPATCH_DELIVERY_LIMIT}  # as the queue counts a message it gave back
    returned = Envelope("test.good", {"n": 1}, headers=given_back)
    good = Envelope("test.good", {"n": 2})
    sentinel = Envelope("test.bad", {})
    with broker.channel() as ch:
        ch.basic_publish("", work_queue, b"{not json", full.properties())
        ch.basic_publish("", work_queue, returned.encode(), returned.properties())
        ch.basic_publish("", work_queue, good.encode(), good.properties())
        ch.basic_publish("", work_queue, b"{not json", sentinel.properties())
        with _consuming(work_queue, lambda message: handled.append(message) if message.json() else None):
            dead = _dead_letters_up_to(ch, work_queue, sentinel.message_id)

    assert [m.message_id for m in handled] == [good.message_id]
    assert set(dead) == {full.message_id, returned.message_id, sentinel.message_id}
    (full_copy,) = dead[full.message_id]
    assert full_copy.headers[DEAD_LETTER_REASON_HEADER].startswith("body is not JSON")
    assert "filler" not in full_copy.headers and HEADERS_DROPPED_HEADER in full_copy.headers
    (returned_copy,) = dead[returned.message_id]
    # The dead-letter queue counts its own deliveries; the original's count is not carried over.
    assert returned_copy.headers.get(DELIVERY_COUNT_HEADER, 0) == 0, "replayed, it would be refused again at once"
    assert returned_copy.headers[DEAD_LETTER_REASON_HEADER].startswith(
        f"given back unsettled {DISPATCH_DELIVERY_LIMIT} times"
    )


def test_good_messages_are_handled_poison_dead_lettered_and_failures_retried(work_queue):
    handled: list[IncomingMessage] = []
    handled_at: dict[str, float] = {}
    failed_once: set[str] = set()

    def handler(message: IncomingMessage) -> None:
        body = message.json()
        if body.get("flaky") and message.message_id not in failed_once:
            failed_once.add(message.message_id)
            raise RuntimeError("passing trouble")
        if body.get("always_fails"):
            raise RuntimeError("handler bug")
        handled_at[message.message_id] = time.monotonic()
        handled.append(message)

    good = Envelope("test.good", {"n": 1})
    bad_json = Envelope("test.bad", {})
    too_deep = Envelope("test.bad", {})  # nested past what the parser reads: no JSON it can use either
    flaky = Envelope("test.flaky", {"flaky": True})
    exhausted = Envelope("test.crash", {"always_fails": True}, headers={ATTEMPT_HEADER: len(RETRY_DELAYS_SECONDS)})
    # Sent last, each takes the same way as the messages before it, so it arrives after any second copy of them.
    flaky_sentinel = Envelope("test.flaky", {"flaky": True, "sentinel": True})
    poison_sentinel = Envelope("test.bad", {})
    with broker.channel() as ch:
        for envelope in (good, flaky, exhausted):
            ch.basic_publish("", work_queue, envelope.encode(), envelope.properties())
        ch.basic_publish("", work_queue, b"{not json", bad_json.properties())
        ch.basic_publish("", work_queue, b"[" * 100_000, too_deep.properties())
        ch.basic_publish("", work_queue, flaky_sentinel.encode(), flaky_sentinel.properties())
        ch.basic_publish("", work_queue, b"{not json", poison_sentinel.properties())
        consuming_from = time.monotonic()
        with _consuming(work_queue, handler) as thread:
            dead = _dead_letters_up_to(ch, work_queue, poison_sentinel.message_id)
            _handled_until(handled, flaky_sentinel.message_id, attempt=1)
        remaining = ch.queue_declare(work_queue, passive=True).method.message_count

    seen = sorted((m.message_id, m.json(), m.attempt) for m in handled if m.message_id != flaky_sentinel.message_id)
    assert seen == sorted([(good.message_id, {"n": 1}, 0), (flaky.message_id, {"flaky": True}, 1)])
    # `received_at` is when this process took delivery: after consuming began, before the handler ran. The dispatcher
    # compares it with when its reads began.
    assert all(consuming_from < m.received_at <= handled_at[m.message_id] for m in handled)
    assert {message_id: len(copies) for message_id, copies in dead.items()} == {
        bad_json.message_id: 1,
        too_deep.message_id: 1,
        exhausted.message_id: 1,
        poison_sentinel.message_id: 1,
    }
    for poison in (bad_json, too_deep):
        reason = dead[poison.message_id][0].headers[DEAD_LETTER_REASON_HEADER]
        assert reason.startswith("body is not JSON"), "dead-lettered at once, not retried as a passing failure"
    reason = dead[exhausted.message_id][0].headers[DEAD_LETTER_REASON_HEADER]
    assert reason.startswith(f"gave up after {len(RETRY_DELAYS_SECONDS) + 1} attempts") and "handler bug" in reason
    assert dead[exhausted.message_id][0].headers[ORIGINAL_QUEUE_HEADER] == work_queue
    assert remaining == 0
    assert not thread.is_alive()


def test_a_database_outage_uses_up_no_attempt_while_a_failing_statement_does(work_queue):
    """Every message meets a database outage: dead-lettering each after its retries would leave a long outage with
    every wake-up (a Bolna stop among them) in the dead-letter queue, each its own report."""
    last_attempt = len(RETRY_DELAYS_SECONDS)
    outage = Envelope("test.outage", {"outage": True}, headers={ATTEMPT_HEADER: last_attempt})
    # One that met the outage as often as a message may wait one out: its handling may be what breaks the database.
    waited_enough = {ATTEMPT_HEADER: last_attempt, OUTAGE_WAITS_HEADER: OUTAGE_WAIT_LIMIT}
    outage_too_long = Envelope("test.outage", {"outage": True}, headers=waited_enough)
    timeout = Envelope("test.timeout", {}, headers={ATTEMPT_HEADER: last_attempt})
    waits = retry_queue(work_queue, RETRY_DELAYS_SECONDS[-1])

    def handler(message: IncomingMessage) -> None:
        if message.json().get("outage"):
            raise OperationalError("SELECT 1", {}, psycopg.OperationalError("connection refused"))
        raise OperationalError("SELECT 1", {}, psycopg.errors.QueryCanceled("canceling statement due to timeout"))

    with broker.channel() as ch:
        for envelope in (outage, outage_too_long, timeout):
            ch.basic_publish("", work_queue, envelope.encode(), envelope.properties())
        with _consuming(work_queue, handler):
            dead = _dead_letters_up_to(ch, work_queue, timeout.message_id)
            ((properties, _),) = broker.get_messages(ch, waits, expected=1)
    assert sorted(dead) == sorted([outage_too_long.message_id, timeout.message_id]), "their attempts used up"
    assert (properties.message_id, properties.headers[ATTEMPT_HEADER]) == (outage.message_id, last_attempt)
    assert properties.headers[OUTAGE_WAITS_HEADER] == 1


@pytest.mark.timeout(90)
def test_consuming_starts_again_when_the_broker_cancels_it(work_queue, caplog):
    """Deleting the queue cancels its consumers while their connection lives on: nothing would be consumed again."""
    handled: list[IncomingMessage] = []
    first, second = Envelope("test.good", {"n": 1}), Envelope("test.good", {"n": 2})
    with broker.channel() as ch, _consuming(work_queue, handled.append):
        ch.basic_publish("", work_queue, first.encode(), first.properties())
        _handled_until(handled, first.message_id, attempt=0)
        ch.queue_delete(work_queue)
        # The broker cancels the consumer once the queue is gone (not if a queue of that name is back first).
        wait_until(lambda: "ConsumerCancelled" in caplog.text, 30, "the consumer hears it was cancelled")
        ch.queue_declare(
            work_queue,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE},
        )
        ch.basic_publish("", work_queue, second.encode(), second.properties())
        _handled_until(handled, second.message_id, attempt=0, timeout=60)
    assert [m.message_id for m in handled] == [first.message_id, second.message_id]


@pytest.mark.timeout(60)
def test_a_message_handled_for_longer_than_the_heartbeat_timeout_keeps_the_connection_and_is_acked_once(work_queue):
    heartbeat_seconds = 1  # RabbitMQ closes a connection silent for two heartbeats
    handled: list[IncomingMessage] = []

    def handler(message: IncomingMessage) -> None:
        handled.append(message)
        if message.json().get("slow"):
            time.sleep(5 * heartbeat_seconds)

    slow, sentinel = Envelope("test.slow", {"slow": True}), Envelope("test.sentinel", {})
    with broker.channel() as ch:
        for envelope in (slow, sentinel):
            ch.basic_publish("", work_queue, envelope.encode(), envelope.properties())
        with _consuming(work_queue, handler, heartbeat_seconds):
            _handled_until(handled, sentinel.message_id, attempt=0, timeout=30)
        remaining = ch.queue_declare(work_queue, passive=True).method.message_count
    assert [(m.message_id, m.redelivered) for m in handled] == [
        (slow.message_id, False),
        (sentinel.message_id, False),
    ], "each handled once, on the connection it was first delivered on"
    assert remaining == 0, "both acknowledged"


def test_poison_message_exception_is_dead_lettered_once(work_queue):
    def handler(message: IncomingMessage) -> None:
        raise PoisonMessage(f"unknown message type {message.message_type!r}")

    envelope, sentinel = Envelope("x", {}), Envelope("sentinel", {})
    with broker.channel() as ch:
        for message in (envelope, sentinel):
            ch.basic_publish("", work_queue, message.encode(), message.properties())
        with _consuming(work_queue, handler):
            dead = _dead_letters_up_to(ch, work_queue, sentinel.message_id)
    assert [letter.headers[DEAD_LETTER_REASON_HEADER] for letter in dead[envelope.message_id]] == [
        "unknown message type 'x'"
    ]


def _all_dead_letters(url: str) -> dict[str, dead_letters.DeadLetter]:
    """The whole dead-letter queue, however many letters earlier tests left there."""
    return {letter.message_id: letter for letter in dead_letters.list_dead_letters(url, limit=sys.maxsize)}


def test_dead_letters_can_be_listed_and_replayed_into_their_queue(work_queue):
    attempts: list[str] = []

    def handler(message: IncomingMessage) -> None:
        attempts.append(message.message_id)
        if len(attempts) == 1:
            raise PoisonMessage("first delivery refused")

    envelope = Envelope("test.replay", {"n": 7})
    sentinel = Envelope("test.sentinel", {})
    url = os.environ["RABBITMQ_URL"]
    with broker.channel() as ch:
        ch.basic_publish("", work_queue, envelope.encode(), envelope.properties())
        with _consuming(work_queue, handler):
            deadline = time.monotonic() + 10
            while envelope.message_id not in _all_dead_letters(url):
                assert time.monotonic() < deadline, "the message never reached the dead-letter queue"
                time.sleep(0.1)
            listed = _all_dead_letters(url)[envelope.message_id]
            assert listed.reason == "first delivery refused"
            assert listed.original_queue == work_queue
            assert listed.as_dict()["body"] == '{"n":7}'
            callctl = Path(sys.executable).parent / "callctl"
            every_letter = ["--limit", str(sys.maxsize)]
            shown = subprocess.run(
                [callctl, "dlq", "list", "--json", *every_letter], capture_output=True, text=True, check=True
            )
            assert listed.as_dict() in [json.loads(line) for line in shown.stdout.splitlines()]

            replayed = dead_letters.replay(url, {envelope.message_id})
            assert [letter.message_id for letter in replayed] == [envelope.message_id]
            # Queued behind whatever the replay sent back: once it is handled, so is every replayed copy.
            ch.basic_publish("", work_queue, sentinel.encode(), sentinel.properties())
            deadline = time.monotonic() + 10
            while sentinel.message_id not in attempts:
                assert time.monotonic() < deadline, "the sentinel behind the replayed message was never handled"
                time.sleep(0.1)
    assert attempts == [envelope.message_id, envelope.message_id, sentinel.message_id]
    assert envelope.message_id not in _all_dead_letters(url)


def _dead_letter_straight(ch, envelope: Envelope, original_queue: str, into: str | None = None) -> None:
    """Sends `envelope` as a dead letter from `original_queue`: to the dead-letter exchange, or `into` a queue."""
    letter = replace(envelope, headers={DEAD_LETTER_REASON_HEADER: "refused", ORIGINAL_QUEUE_HEADER: original_queue})
    if into is None:
        ch.basic_publish(DEAD_LETTER_EXCHANGE, "", letter.encode(), letter.properties())
    else:
        ch.basic_publish("", into, letter.encode(), letter.properties())


def test_dead_letters_stay_however_often_they_are_listed():
    """RabbitMQ 4.x drops a quorum queue's message returned 20 times unless the queue says otherwise. 3.10 has no
    default limit: there the listing passes whatever the declaration, and the declaration is what holds on 4.x."""
    url = os.environ["RABBITMQ_URL"]
    envelope = Envelope("test.listed", {"n": 25})
    with broker.channel() as ch:
        _dead_letter_straight(ch, envelope, "test.listed")
        try:
            for listing in range(25):
                assert envelope.message_id in _all_dead_letters(url), f"gone after {listing} listings"
            declared = ch.connection.channel()
            # The broker refuses (PRECONDITION_FAILED) a declaration that differs from the queue it has.
            declared.queue_declare(
                DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 2**31 - 1}
            )
            declared.close()
        finally:
            _dead_letters_up_to(ch, "test.listed", envelope.message_id)


def test_letters_of_the_former_dead_letter_queue_are_moved_into_the_dead_letter_queue():
    url = os.environ["RABBITMQ_URL"]
    earlier = Envelope("test.earlier", {})
    with broker.channel() as ch:
        ch.queue_declare(FORMER_DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(FORMER_DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE)
        _dead_letter_straight(ch, earlier, "test.earlier", into=FORMER_DEAD_LETTER_QUEUE)
        try:
            assert dead_letters.adopt_former_dead_letters(url) == 1
            assert dead_letters.adopt_former_dead_letters(url) is None, "the former queue is gone"
            adopted = _all_dead_letters(url)[earlier.message_id]
            assert (adopted.reason, adopted.original_queue) == ("refused", "test.earlier")
        finally:
            _dead_letters_up_to(ch, "test.earlier", earlier.message_id)
        probe = ch.connection.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as gone:
            probe.queue_declare(FORMER_DEAD_LETTER_QUEUE, passive=True)
        assert gone.value.reply_code == pika.spec.NOT_FOUND


def test_the_former_classic_delay_queues_are_deleted_once_what_waits_in_them_went_back():
    url = os.environ["RABBITMQ_URL"]
    former = [former_retry_queue(DISPATCH_QUEUE, delay) for delay in RETRY_DELAYS_SECONDS]
    with broker.channel() as ch:
        for name in former:
            arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "test.nowhere"}
            ch.queue_declare(name, durable=True, arguments=arguments)
        ch.basic_publish("", former[-1], b"on its way back")
    assert delete_former_retry_queues(url) == [former[-1]], "one still holds a message: kept"
    with broker.channel() as ch:
        ch.queue_purge(former[-1])
    assert delete_former_retry_queues(url) == []
    with broker.channel() as ch:
        for name in former:
            probe = ch.connection.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as gone:
                probe.queue_declare(name, passive=True)
            assert gone.value.reply_code == pika.spec.NOT_FOUND
