"""Messages are written with the change that causes them and reach the broker once it is there."""

import json
import time
import uuid

import pika
import sentry_sdk
from sqlalchemy import select

from shared.calls import lifecycle
from shared.core.config import load_settings
from shared.core.models import OutboxMessage
from shared.core.uow import UnitOfWork
from shared.messaging import outbox
from shared.messaging.outbox import AfterCommitPublisher
from shared.messaging.publisher import Publisher
from shared.observability.sentry import init_sentry
from tests.support import broker
from tests.support.components import components
from tests.support.factories import call_row, customer
from tests.support.sentry_sink import SentrySink


def _unpublished(message_id: uuid.UUID) -> OutboxMessage:
    with components().uow() as uow:
        return uow.session.scalar(select(OutboxMessage).where(OutboxMessage.message_id == message_id))


def _received_before_a_sentinel(ch, queue: str, timeout: float = 10.0) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every message the tap got before a sentinel sent after them down the same path (committed, published by
    the outbox): a second copy of any earlier message reaches the queue before the sentinel does."""
    sentinel = {"user_id": f"sentinel-{uuid.uuid4()}"}
    with components().uow() as uow:
        uow.emit("slot.released", sentinel)
        uow.commit()
    received: list[tuple[pika.BasicProperties, bytes]] = []
    deadline = time.monotonic() + timeout
    while True:
        method, properties, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            assert time.monotonic() < deadline, f"the sentinel never arrived; got {received}"
            time.sleep(0.05)
            continue
        if json.loads(body) == sentinel:
            return received
        received.append((properties, body))


def test_committed_message_is_published_right_away_with_confirms():
    marker = str(uuid.uuid4())
    with broker.channel() as ch:
        queue = broker.tap(ch, "slot.released")
        with components().uow() as uow:
            uow.emit("slot.released", {"user_id": marker})
            uow.commit()
        messages = _received_before_a_sentinel(ch, queue)
    assert len(messages) == 1, f"published {len(messages)} times"
    properties, body = messages[0]
    assert json.loads(body) == {"user_id": marker}
    assert properties.delivery_mode == 2
    assert properties.type == "slot.released"
    assert properties.message_id
    with components().uow() as uow:
        row = uow.session.scalar(
            select(OutboxMessage).where(OutboxMessage.message_id == uuid.UUID(properties.message_id))
        )
    assert row.published_at is not None


def test_rolled_back_change_publishes_nothing():
    marker = str(uuid.uuid4())
    with components().uow() as uow:
        uow.emit("slot.released", {"user_id": marker})
    with components().uow() as uow:
        assert uow.session.scalar(select(OutboxMessage).where(OutboxMessage.body["user_id"].astext == marker)) is None


def test_message_written_while_broker_is_down_is_relayed_later():
    marker = str(uuid.uuid4())
    with components().uow() as uow:
        row = outbox.add(uow.session, "slot.released", {"user_id": marker})
        uow.session.commit()
    unreachable = Publisher("amqp://guest:guest@127.0.0.1:1/%2F")
    outbox.publish_committed(components().sessions, unreachable, [row])
    failed = _unpublished(row.message_id)
    assert failed.published_at is None
    assert failed.attempts == 1
    assert failed.last_error

    with broker.channel() as ch:
        queue = broker.tap(ch, "slot.released")
        assert outbox.publish_pending(components().sessions, components().publisher, limit=1_000_000) >= 1
        assert outbox.publish_pending(components().sessions, components().publisher, limit=1_000_000) == 0
        messages = _received_before_a_sentinel(ch, queue)
    assert {"user_id": marker} in [json.loads(body) for _, body in messages]
    assert _unpublished(row.message_id).published_at is not None


def test_a_calls_announcement_is_written_once_with_its_commit_and_never_after_a_rollback():
    owner = customer()
    call = call_row(owner, status="in-progress", slot_held=True)

    def released_rows() -> int:
        with components().uow() as uow:
            query = select(OutboxMessage).where(OutboxMessage.body["user_id"].astext == str(owner.user_id))
            return len(uow.session.scalars(query).all())

    with components().uow() as uow:
        locked = uow.calls.lock_call(call.id)
        lifecycle.release_slot(locked)  # rolled back: never committed
    assert released_rows() == 0
    assert locked.messages == []

    with components().uow() as uow:
        locked = uow.calls.lock_call(call.id)
        lifecycle.release_slot(locked)
        uow.commit()
        uow.commit()  # nothing left to announce
    assert released_rows() == 1


def test_a_change_rolled_back_within_a_unit_of_work_announces_nothing_when_the_next_one_commits():
    owner = customer()
    call = call_row(owner, status="in-progress", slot_held=True)
    with components().uow() as uow:
        locked = uow.calls.lock_call(call.id)
        lifecycle.release_slot(locked)
        uow.session.flush()
        uow.rollback()  # as after a failure: the unit of work goes on with a new transaction
        uow.emit("slot.released", {"user_id": f"sentinel-{owner.user_id}"})
        uow.commit()
    with components().uow() as uow:
        bodies = uow.session.scalars(
            select(OutboxMessage.body).where(OutboxMessage.body["user_id"].astext.contains(str(owner.user_id)))
        ).all()
    assert bodies == [{"user_id": f"sentinel-{owner.user_id}"}], "only what the committed transaction wrote"


def test_the_publishing_thread_publishes_in_the_writers_trace_and_carries_nothing_of_the_request_that_started_it():
    sink = SentrySink().start()
    settings = load_settings().model_copy(
        update={"sentry_dsn": sink.dsn, "sentry_send_in_development": True, "sentry_traces_sample_rate": 1.0}
    )
    after_commit = AfterCommitPublisher(components().sessions, components().publisher)
    uow = UnitOfWork(components().sessions, after_commit, components().leases)
    init_sentry("tests", settings)
    try:
        traces = []
        for user in ("first-user", "second-user"):
            with sentry_sdk.start_transaction(op="http.server", name=f"request of {user}") as request:
                sentry_sdk.set_tag("user_id", user)
                sentry_sdk.set_user({"id": user})
                with uow:
                    uow.emit("slot.released", {"user_id": str(uuid.uuid4())})
                    uow.commit()
                traces.append(request.trace_id)
            assert after_commit.wait_until_idle(10)
        sentry_sdk.flush()
        published = sink.transactions(lambda t: t.payload["contexts"]["trace"].get("op") == "queue.publish")
    finally:
        init_sentry("tests", load_settings())  # back to no client
        sink.stop()
    assert [t.trace_id for t in published] == traces, "each message is published in the trace that wrote it"
    for transaction in published:
        assert "user_id" not in transaction.tags, "the first request's tags stay with that request"
        assert "user" not in transaction.payload, "and so does its user"
