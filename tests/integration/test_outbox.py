"""Messages are written with the change that causes them and reach the broker once it is there."""

import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import pika
import pytest
import sentry_sdk
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from shared.calls import lifecycle
from shared.core.config import load_settings
from shared.core.errors import ErrorType
from shared.core.models import OutboxMessage
from shared.core.uow import UnitOfWork
from shared.messaging import outbox
from shared.messaging.outbox import PUBLISH_AFTER_COMMIT_SECONDS, AfterCommitPublisher
from shared.messaging.publisher import Envelope, Publisher
from shared.messaging.topology import EVENTS_EXCHANGE
from shared.observability.sentry import FirstTimes, init_sentry
from tests.support import broker
from tests.support.components import components
from tests.support.factories import call_row, customer
from tests.support.faults import failing_writes
from tests.support.sentry_sink import SentrySink
from tests.support.slow_broker import BlackHoleBroker, HoldingBrokerProxy
from tests.support.tcp_connections import open_connections_to

# Far less than a publish held up by the broker took before it was bounded (a handshake that never comes waited
# 15 s, twice; a blocked connection 10 s, then a reconnect), far more than the bound.
GIVEN_UP_WITHIN_SECONDS = 5 * PUBLISH_AFTER_COMMIT_SECONDS


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


def test_a_message_no_queue_takes_is_reported_once_and_holds_up_none_of_those_behind_it(monkeypatch):
    reported: list[tuple[str | None, ErrorType]] = []
    monkeypatch.setattr(outbox, "report", lambda error, place=None: reported.append((place, error.error_type)))
    monkeypatch.setattr(outbox, "_UNROUTABLE_TYPES", FirstTimes())
    with components().uow() as uow:
        stray = outbox.add(uow.session, "test.routed-nowhere", {"n": 1})  # no binding matches its type
        another = outbox.add(uow.session, "test.routed-nowhere", {"n": 2})
        behind = outbox.add(uow.session, "slot.released", {"user_id": str(uuid.uuid4())})
        uow.session.commit()
    for _ in range(2):
        outbox.publish_pending(components().sessions, components().publisher, limit=1_000_000)
    for row in (stray, another):
        assert (_unpublished(row.message_id).published_at, _unpublished(row.message_id).attempts) == (None, 2)
    assert _unpublished(behind.message_id).published_at is not None
    assert reported == [(outbox.RELAY_PLACE, ErrorType.OUTBOX_STALLED)], "once for its type"


def test_publishing_after_commit_leaves_a_message_no_queue_takes_to_the_relay_and_publishes_the_rest(monkeypatch):
    monkeypatch.setattr(outbox, "report", lambda error, place=None: None)
    with components().uow() as uow:
        stray = outbox.add(uow.session, "test.routed-nowhere", {"n": 1})
        behind = outbox.add(uow.session, "slot.released", {"user_id": str(uuid.uuid4())})
        uow.session.commit()
    assert outbox.publish_committed(components().sessions, components().publisher, [stray, behind]) is None
    assert (_unpublished(stray.message_id).published_at, _unpublished(stray.message_id).attempts) == (None, 1)
    assert _unpublished(behind.message_id).published_at is not None


class _BrokerAway:
    def publish(self, envelope: Envelope) -> None:
        raise pika.exceptions.AMQPConnectionError("the broker is away")


def _waiting_for(age: timedelta) -> OutboxMessage:
    with components().uow() as uow:
        row = outbox.add(uow.session, "slot.released", {"user_id": str(uuid.uuid4())})
        uow.session.flush()
        row.created_at = func.now() - age
        uow.session.commit()
    return row


def test_a_relay_that_publishes_nothing_for_minutes_is_reported_once_until_it_publishes_again(monkeypatch):
    reported: list[str] = []
    monkeypatch.setattr(outbox, "report", lambda error, place=None: reported.append(error.detail))
    monkeypatch.setattr(outbox._Stall, "reported", False)
    an_hour = timedelta(hours=1)
    monkeypatch.setattr(outbox._Stall, "last_progress", time.monotonic() - an_hour.total_seconds())

    def relay(publisher: object) -> None:  # the rows of this test alone: those other tests left are younger
        outbox.publish_pending(components().sessions, publisher, min_age=an_hour, limit=1_000_000)  # type: ignore[arg-type]

    waiting = _waiting_for(an_hour)
    monkeypatch.setattr(outbox, "OUTBOX_STALL_AFTER", an_hour * 2)
    relay(_BrokerAway())
    assert reported == [], "a stall is reported once its oldest message has waited OUTBOX_STALL_AFTER"
    monkeypatch.setattr(outbox, "OUTBOX_STALL_AFTER", an_hour / 2)
    for _ in range(3):
        relay(_BrokerAway())
    assert len(reported) == 1 and "the broker is away" in reported[0]

    relay(components().publisher)
    assert _unpublished(waiting.message_id).published_at is not None
    _waiting_for(an_hour)
    relay(_BrokerAway())
    assert len(reported) == 1, "the relay published within OUTBOX_STALL_AFTER: a broker that comes and goes"
    monkeypatch.setattr(outbox._Stall, "last_progress", time.monotonic() - an_hour.total_seconds())
    relay(_BrokerAway())
    assert len(reported) == 2, "a new stall"


class _BrokerGoneAfter:
    """Publishes through the broker `taken` times, then through a broker that is not there (a real failure)."""

    def __init__(self, taken: int):
        self._taken = taken
        self._unreachable = Publisher("amqp://guest:guest@127.0.0.1:1/%2F")

    def publish(self, envelope: Envelope) -> None:
        self._taken -= 1
        (components().publisher if self._taken >= 0 else self._unreachable).publish(envelope)


def test_a_batch_whose_publish_fails_midway_keeps_what_was_published_and_leaves_the_rest_to_the_relay():
    with components().uow() as uow:
        rows = [outbox.add(uow.session, "slot.released", {"user_id": str(uuid.uuid4())}) for _ in range(3)]
        uow.session.commit()
    failure = outbox.publish_committed(components().sessions, _BrokerGoneAfter(taken=1), rows)
    assert failure is not None
    taken, failed, untried = (_unpublished(row.message_id) for row in rows)
    assert taken.published_at is not None and taken.attempts == 0
    assert (failed.published_at, failed.attempts) == (None, 1) and failed.last_error
    assert (untried.published_at, untried.attempts) == (None, 0), "left to the relay, untried"


def test_a_batch_whose_transaction_fails_after_the_claim_leaves_every_row_to_the_relay():
    """The claim marks the rows published; only its commit may make that true. A failure before it (here, writing
    the failed publish) rolls every mark back: a row the broker took is published again by the relay (a duplicate
    is harmless), none is lost."""
    with components().uow() as uow:
        rows = [outbox.add(uow.session, "slot.released", {"user_id": str(uuid.uuid4())}) for _ in range(3)]
        uow.session.commit()
    ids = ", ".join(str(row.id) for row in rows)
    unmarking = f"OLD.id IN ({ids}) AND OLD.published_at IS NOT NULL AND NEW.published_at IS NULL"
    with failing_writes("outbox", unmarking), pytest.raises(DBAPIError, match="injected fault"):
        outbox.publish_committed(components().sessions, _BrokerGoneAfter(taken=1), rows)
    left = [_unpublished(row.message_id) for row in rows]
    assert [(row.published_at, row.attempts) for row in left] == [(None, 0)] * 3


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


def _commit_a_message(after_commit: AfterCommitPublisher) -> str:
    """Commits one message through a unit of work that publishes with `after_commit`; the user id it names."""
    marker = str(uuid.uuid4())
    with UnitOfWork(components().sessions, after_commit, components().leases) as uow:
        uow.emit("slot.released", {"user_id": marker})
        uow.commit()
    return marker


def _row(marker: str) -> OutboxMessage:
    with components().uow() as uow:
        return uow.session.scalar(select(OutboxMessage).where(OutboxMessage.body["user_id"].astext == marker))


def _relayed(marker: str) -> None:
    with broker.channel() as ch:
        queue = broker.tap(ch, "slot.released")
        outbox.publish_pending(components().sessions, components().publisher, limit=1_000_000)
        messages = _received_before_a_sentinel(ch, queue)
    assert {"user_id": marker} in [json.loads(body) for _, body in messages], "the relay published it"
    assert _row(marker).published_at is not None


def test_publishing_after_commit_gives_up_on_a_broker_that_never_answers_and_the_relay_publishes_later():
    with BlackHoleBroker() as black_hole:
        after_commit = AfterCommitPublisher(components().sessions, Publisher(black_hole.url))
        marker = _commit_a_message(after_commit)
        assert after_commit.wait_until_idle(GIVEN_UP_WITHIN_SECONDS), "still waiting for the handshake"
    left = _row(marker)
    assert left.published_at is None
    assert left.attempts == 1
    assert "BrokerTooSlow" in left.last_error
    _relayed(marker)


@pytest.mark.parametrize(
    "hold_up",
    [HoldingBrokerProxy.hold_answers, HoldingBrokerProxy.block_clients],
    ids=["slow-to-confirm", "connection-blocked"],
)
@pytest.mark.timeout(60)
def test_publishing_after_commit_gives_up_on_a_broker_that_holds_it_up_and_the_relay_publishes_later(
    hold_up: Callable[[HoldingBrokerProxy], None],
):
    """The publish given up on is abandoned, its connection closed, before its row is let go: no confirm of it can
    come once the relay may publish the row again."""
    with HoldingBrokerProxy(os.environ["RABBITMQ_URL"]) as proxy:
        after_commit = AfterCommitPublisher(components().sessions, Publisher(proxy.url))
        answered = _commit_a_message(after_commit)
        assert after_commit.wait_until_idle(10)
        assert _row(answered).published_at is not None, "published through the proxy while it answered"

        hold_up(proxy)
        held_up = _commit_a_message(after_commit)
        assert after_commit.wait_until_idle(GIVEN_UP_WITHIN_SECONDS), "still waiting for the broker"
        assert open_connections_to(proxy.port) == 0, "the publish given up on still waits for its confirm"
        left = _row(held_up)
        assert left.published_at is None
        assert left.attempts == 1
    _relayed(held_up)


def _committed_batches(batches: int) -> list[list[OutboxMessage]]:
    """Rows committed at once, as AfterCommitPublisher.BATCH-sized submissions."""
    size = AfterCommitPublisher.BATCH
    with components().uow() as uow:
        rows = [outbox.add(uow.session, "slot.released", {"user_id": str(uuid.uuid4())}) for _ in range(batches * size)]
        uow.session.commit()
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def _published_once_by_the_relay(rows: list[OutboxMessage]) -> None:
    with broker.channel() as ch:
        queue = broker.tap(ch, "slot.released")
        outbox.publish_pending(components().sessions, components().publisher, limit=1_000_000)
        received = Counter(json.loads(body)["user_id"] for _, body in _received_before_a_sentinel(ch, queue))
    assert {received[row.body["user_id"]] for row in rows} == {1}, "each published once"
    assert all(_row(row.body["user_id"]).published_at is not None for row in rows)


@pytest.mark.timeout(120)
def test_a_burst_committed_while_the_broker_never_answers_costs_one_wait_and_is_left_to_the_relay(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(outbox, "BROKER_AWAY_PAUSE_SECONDS", 60.0)  # outlasts the test however slow the machine
    *burst, after_the_burst = batches = _committed_batches(21)
    with BlackHoleBroker() as black_hole:
        after_commit = AfterCommitPublisher(components().sessions, Publisher(black_hole.url))
        for batch in burst:
            after_commit.submit(batch)
        # Far less than a wait for the broker per batch.
        assert after_commit.wait_until_idle(GIVEN_UP_WITHIN_SECONDS), "each batch waited for the broker"
        after_commit.submit(after_the_burst)  # the broker was found away: left to the relay untried
        assert after_commit.wait_until_idle(GIVEN_UP_WITHIN_SECONDS)
    rows = [row for batch in batches for row in batch]
    with components().uow() as uow:
        left = {
            row.id: row
            for row in uow.session.scalars(select(OutboxMessage).where(OutboxMessage.id.in_([row.id for row in rows])))
        }
    assert all(row.published_at is None for row in left.values())
    given_up = [row for row in left.values() if row.attempts]
    assert 0 < len(given_up) <= AfterCommitPublisher.MAX_WAITING, "rows held in memory, given up on"
    assert all(row.attempts == 1 and "BrokerTooSlow" in row.last_error for row in given_up)
    assert all(left[row.id].attempts == 0 for row in after_the_burst), "rows submitted during the pause are not held"
    _published_once_by_the_relay(rows)


class _GatedPublisher(Publisher):
    """Takes every message once `gate` is open: a broker slower than the commits."""

    def __init__(self) -> None:
        super().__init__(os.environ["RABBITMQ_URL"])
        self.gate = threading.Event()

    def giving_up_after(self, seconds: float) -> Publisher:
        return self

    def publish(self, envelope: Envelope, exchange: str = EVENTS_EXCHANGE, routing_key: str | None = None) -> None:
        assert self.gate.wait(30), "the test never opened the gate"


@pytest.mark.timeout(60)
def test_rows_committed_faster_than_the_broker_takes_them_wait_in_memory_up_to_a_bound_and_the_rest_for_the_relay(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(AfterCommitPublisher, "MAX_WAITING", 2 * AfterCommitPublisher.BATCH)
    batches = _committed_batches(5)
    rows = [row for batch in batches for row in batch]
    slow_broker = _GatedPublisher()
    after_commit = AfterCommitPublisher(components().sessions, slow_broker)
    for batch in batches:
        after_commit.submit(batch)
    slow_broker.gate.set()
    assert after_commit.wait_until_idle(10)
    with components().uow() as uow:
        published = uow.session.scalars(
            select(OutboxMessage.id).where(
                OutboxMessage.id.in_([row.id for row in rows]), OutboxMessage.published_at.is_not(None)
            )
        ).all()
    assert set(published) == {row.id for row in rows[: AfterCommitPublisher.MAX_WAITING]}
    _published_once_by_the_relay(rows[AfterCommitPublisher.MAX_WAITING :])
