"""The transactional outbox: messages are rows written with the change that causes them, published after commit.

A row is published right after its transaction commits, by a thread of the process that wrote it (the request
does not wait for the broker), which gives up within PUBLISH_AFTER_COMMIT_SECONDS; the relay job publishes whatever
is left (broker down, slow or blocked, process stopped between commit and publish), as patiently as the connection
settings allow. A lost message is impossible; a double one is possible: a publish given up on (its connection
closed before the row is let go, so the relay never races it) may have reached the queue unconfirmed, and the relay
publishes it again. Every message is a wake-up for the consumer to read the database (a duplicate finds its work
done: see services/queue_processor/handlers.py), so a second copy is harmless.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import sentry_sdk
from pika.exceptions import AMQPConnectionError, UnroutableError
from sqlalchemy import BindParameter, Select, bindparam, func, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.dml import ReturningUpdate

from shared.core.errors import CallflowError, ErrorType
from shared.core.models import OutboxMessage
from shared.messaging.publisher import BrokerTooSlow, Envelope, Publisher
from shared.messaging.topology import EVENTS_EXCHANGE
from shared.observability import tracing
from shared.observability.sentry import FirstTimes, broker_accepted, report, report_broker_failure

log = logging.getLogger(__name__)
_OUTBOX = OutboxMessage.__table__

# A broker that does not take a message within this (not answering, blocked by an alarm, slow to confirm) leaves it
# to the relay, rather than holding up every message committed after it.
PUBLISH_AFTER_COMMIT_SECONDS = 2.0
# Once the broker was too slow or unreachable, rows committed in this long are left to the relay untried, and those
# waiting are given up on with the same error (they are safe in the outbox): otherwise each batch would wait
# PUBLISH_AFTER_COMMIT_SECONDS for it again, holding its rows locked, while commits pile up in memory faster than
# that drains them.
BROKER_AWAY_PAUSE_SECONDS = 5.0
PUBLISH_PLACE = "broker.publish"  # where the broker's refusal of what is published is reported
RELAY_PLACE = "outbox.relay"  # where messages the relay cannot publish are reported
# A relay that has published nothing while its oldest message waited this long is stalled: RabbitMQ is away,
# blocked by an alarm, or refuses what it is given, and the services' wake-ups (a Bolna stop among them) wait.
OUTBOX_STALL_AFTER = timedelta(minutes=2)


def add(session: Session, message_type: str, body: dict[str, Any]) -> OutboxMessage:
    row = OutboxMessage(message_type=message_type, body=body, headers=tracing.current_trace_headers())
    session.add(row)
    return row


class AfterCommitPublisher:
    """Publishes committed rows on a thread of its own, in batches: each batch is marked published by one
    statement. Started on first use, so each process (after any fork) has its own. `publisher` is used as one that
    gives up after PUBLISH_AFTER_COMMIT_SECONDS. Rows it does not take (more than MAX_WAITING wait already, or the
    broker was found away within BROKER_AWAY_PAUSE_SECONDS) are left to the relay."""

    BATCH = 100
    # Bounds the memory held by rows committed faster than the broker takes them.
    MAX_WAITING = 10 * BATCH

    def __init__(self, sessions: sessionmaker[Session], publisher: Publisher):
        self._sessions = sessions
        self._publisher = publisher.giving_up_after(PUBLISH_AFTER_COMMIT_SECONDS)
        self._rows: queue.SimpleQueue[OutboxMessage] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._unfinished = 0
        self._paused_until = 0.0  # time.monotonic()
        self._paused_by: Exception | None = None

    def submit(self, rows: Sequence[OutboxMessage]) -> None:
        with self._idle:
            if self._paused() or self._unfinished + len(rows) > self.MAX_WAITING:
                return
            self._unfinished += len(rows)
        for row in rows:
            self._rows.put(row)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="outbox-publisher", daemon=True)
                self._thread.start()

    def wait_until_idle(self, timeout: float) -> bool:
        """Whether everything submitted so far was published (or left to the relay) within `timeout`."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout)

    def _run(self) -> None:
        # The thread was started inside some request and inherited copies of its scopes (tags, user, breadcrumbs):
        # cleared once, so nothing of that request reaches what this thread sends.
        sentry_sdk.get_isolation_scope().clear()
        sentry_sdk.get_current_scope().clear()
        while True:
            batch = [self._rows.get()]
            while len(batch) < self.BATCH:
                try:
                    batch.append(self._rows.get_nowait())
                except queue.Empty:
                    break
            if self._paused():
                self._give_up(batch)
            else:
                self._publish(batch)
            with self._idle:
                self._unfinished -= len(batch)
                self._idle.notify_all()

    def _publish(self, batch: list[OutboxMessage]) -> None:
        try:
            with sentry_sdk.isolation_scope():  # each row's publish continues the trace the row was written in
                stopped_by = publish_committed(self._sessions, self._publisher, batch)
        except Exception:  # committed rows are safe in the outbox; the relay publishes them
            log.warning("publishing after commit failed; left to the outbox relay", exc_info=True)
            return
        if isinstance(stopped_by, BrokerTooSlow | AMQPConnectionError):
            log.warning(
                "the broker is slow or away; messages waiting or committed in the next %s s are left to the relay",
                BROKER_AWAY_PAUSE_SECONDS,
            )
            with self._idle:
                self._paused_until = time.monotonic() + BROKER_AWAY_PAUSE_SECONDS
                self._paused_by = stopped_by

    def _paused(self) -> bool:
        return time.monotonic() < self._paused_until

    def _give_up(self, batch: list[OutboxMessage]) -> None:
        """Leaves the rows to the relay without waiting for the broker again, recording why."""
        try:
            with self._sessions() as session:
                claimed = session.scalars(_CLAIM, {"ids": [row.id for row in batch]}).all()
                _give_up_rows(session, claimed, self._paused_by)
                session.commit()
        except Exception:  # the rows are left to the relay all the same
            log.warning("recording messages left to the outbox relay failed", exc_info=True)


def publish_committed(
    sessions: sessionmaker[Session], publisher: Publisher, rows: Sequence[OutboxMessage]
) -> Exception | None:
    """Publishes rows this process has just committed, as it holds them, in one transaction and without reading
    them back: one statement claims them (so the relay never publishes them too) and marks them published, which
    the commit makes true once they are. A row the broker did not take is left to the relay, with the rest (marked
    unpublished again); returns the error of that publish, if one failed. The claim holds until the publish given up
    on is abandoned (see Publisher), so the relay never publishes a row whose publish is still under way."""
    with sessions() as session:
        claimed = set(session.scalars(_CLAIM_AS_PUBLISHED, {"ids": [row.id for row in rows]}))
        failure: Exception | None = None
        for index, row in enumerate(rows):
            if row.id not in claimed:  # the relay has it, or published it already
                continue
            try:
                _publish(publisher, row)
            except UnroutableError as exc:  # no queue takes its type: left to the relay, the rest go on
                _give_up_rows(session, [row.id], exc)
                _report_unroutable(row)
                continue
            except Exception as exc:  # the broker is away: leave the rest for the relay
                _give_up_rows(session, [row.id], exc)
                untried = [left.id for left in rows[index + 1 :] if left.id in claimed]
                if untried:
                    session.execute(_MARK_UNPUBLISHED, {"ids": untried})
                log.warning("outbox publish failed, the relay will retry: %r", exc)
                report_broker_failure(exc, place=PUBLISH_PLACE)
                failure = exc
                break
        session.commit()
    if failure is None and claimed:
        broker_accepted(PUBLISH_PLACE)
        _Stall.progressed()
    return failure


def _give_up_rows(session: Session, ids: Sequence[int], error: Exception | None) -> None:
    session.execute(_GIVE_UP, {"ids": ids, "last_error": repr(error)[:1000]})


def publish_pending(
    sessions: sessionmaker[Session],
    publisher: Publisher,
    min_age: timedelta | None = None,
    limit: int = 200,
) -> int:
    """The relay: publishes unpublished rows older than `min_age`; returns how many went out. `min_age` spares the
    rows their writer is about to publish; it is not what keeps the two from both publishing one (a row being
    published after commit is locked, and skipped here)."""
    published = 0
    oldest: dict[str, object] | None = None  # what the oldest row of the round holds
    with sessions() as session:
        for row in session.scalars(unpublished_query(min_age, limit)):
            try:
                _publish(publisher, row)
            except UnroutableError as exc:  # no queue takes its type (a binding gone): the rows behind it still go
                _count_failure(row, exc)
                _report_unroutable(row)
                continue
            except Exception as exc:  # the broker is away: leave the rest for the next run
                _count_failure(row, exc)
                log.warning("outbox publish failed, the relay will retry: %r", exc)
                report_broker_failure(exc, place=PUBLISH_PLACE)
                oldest = oldest or _outbox_details(row)
                break
            row.published_at = func.now()
            published += 1
        session.commit()
    if published:
        broker_accepted(PUBLISH_PLACE)
        _Stall.progressed()
    elif oldest is not None:
        _Stall.check(oldest)
    return published


def _count_failure(row: OutboxMessage, exc: Exception) -> None:
    row.attempts += 1
    row.last_error = repr(exc)[:1000]


_UNROUTABLE_TYPES = FirstTimes()  # every message of a type without a binding meets it: reported once


def _report_unroutable(row: OutboxMessage) -> None:
    if not _UNROUTABLE_TYPES.first(row.message_type):
        log.warning("outbox message %s (%s) is routed to no queue, again", row.message_id, row.message_type)
        return
    report(
        CallflowError(
            ErrorType.OUTBOX_STALLED,
            f"Outbox message {row.message_id} ({row.message_type}) is routed to no queue; the relay tries such "
            "messages again each round, and publishes the messages behind them meanwhile.",
            sentry_contexts={"outbox_details": _outbox_details(row)},
            message_id=str(row.message_id),
        ),
        place=RELAY_PLACE,
    )


class _Stall:
    """Whether the relay's current stall (a round that published nothing, the last that did OUTBOX_STALL_AFTER ago,
    its oldest message as old) was reported: once per stall and process. A relay that publishes now and then, as
    a broker whose alarm comes and goes lets it, is no stall."""

    lock = threading.Lock()
    reported = False
    last_progress = time.monotonic()

    @classmethod
    def check(cls, oldest: dict[str, object]) -> None:
        waited = datetime.now(UTC) - datetime.fromisoformat(str(oldest["created_at"]))
        without_progress = timedelta(seconds=time.monotonic() - cls.last_progress)
        if min(waited, without_progress) < OUTBOX_STALL_AFTER:
            return
        with cls.lock:
            first, cls.reported = not cls.reported, True
        if first:
            report(
                CallflowError(
                    ErrorType.OUTBOX_STALLED,
                    f"The outbox's oldest message has waited {waited} for RabbitMQ: {oldest['last_error']}",
                    sentry_contexts={"outbox_details": oldest},
                    message_id=str(oldest["message_id"]),
                ),
                place=RELAY_PLACE,
            )

    @classmethod
    def progressed(cls) -> None:
        cls.last_progress = time.monotonic()
        if cls.reported:
            with cls.lock:
                cls.reported = False
            log.info("the outbox relay publishes again")


def _outbox_details(row: OutboxMessage) -> dict[str, object]:
    return {
        "id": row.id,
        "message_id": str(row.message_id),
        "message_type": row.message_type,
        "created_at": row.created_at.isoformat(),
        "attempts": row.attempts,
        "last_error": row.last_error,
    }


def _publish(publisher: Publisher, row: OutboxMessage) -> None:
    envelope = Envelope(row.message_type, row.body, str(row.message_id))
    destination = f"{EVENTS_EXCHANGE}/{row.message_type}"
    with tracing.publish_span(row.headers, destination, envelope.message_id, len(envelope.encode())) as headers:
        publisher.publish(replace(envelope, headers=headers))


def claim_query(ids: Sequence[int] | BindParameter[list[int]]) -> Select[tuple[int]]:
    """Of these rows, those still unpublished, locked; a row the relay holds is skipped."""
    return (
        select(_OUTBOX.c.id)
        .where(_OUTBOX.c.id.in_(ids), _OUTBOX.c.published_at.is_(None))
        .with_for_update(skip_locked=True, key_share=True)
    )


def claim_as_published_query(ids: Sequence[int] | BindParameter[list[int]]) -> ReturningUpdate[tuple[int]]:
    """Of these rows, those still unpublished, locked (a row the relay holds is skipped) and marked published."""
    return (
        update(_OUTBOX)
        .where(_OUTBOX.c.id.in_(claim_query(ids).scalar_subquery()))
        .values(published_at=func.now())
        .returning(_OUTBOX.c.id)
    )


# The after-commit publisher's statements, on the table and built once: building them per batch, and the ORM's
# bulk UPDATE with its session synchronisation, cost more of a batch's CPU than publishing it.
_CLAIM = claim_query(bindparam("ids", expanding=True))
_CLAIM_AS_PUBLISHED = claim_as_published_query(bindparam("ids", expanding=True))
_MARK_UNPUBLISHED = update(_OUTBOX).where(_OUTBOX.c.id.in_(bindparam("ids", expanding=True))).values(published_at=None)
# Also unmarks a row claimed as published.
_GIVE_UP = (
    update(_OUTBOX)
    .where(_OUTBOX.c.id.in_(bindparam("ids", expanding=True)))
    .values(attempts=_OUTBOX.c.attempts + 1, last_error=bindparam("last_error"), published_at=None)
)


def unpublished_query(min_age: timedelta | None, limit: int) -> Select[tuple[OutboxMessage]]:
    """The rows the relay takes, locked (built apart so tests/integration/test_query_plans.py can EXPLAIN it)."""
    query = (
        select(OutboxMessage)
        .where(OutboxMessage.published_at.is_(None))
        .order_by(OutboxMessage.id)
        .limit(limit)
        .with_for_update(skip_locked=True, key_share=True)
    )
    if min_age is not None:
        query = query.where(OutboxMessage.created_at < func.now() - min_age)
    return query
