"""The transactional outbox: messages are rows written with the change that causes them, published after commit.

A row is published right after its transaction commits, by a thread of the process that wrote it (the request
does not wait for the broker); the relay job publishes whatever is left (broker down, process stopped between
commit and publish). Consumers are idempotent, so the rare double publish is harmless; a lost one is impossible.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

import sentry_sdk
from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.core.models import OutboxMessage
from shared.messaging.publisher import Envelope, Publisher
from shared.messaging.topology import EVENTS_EXCHANGE
from shared.observability import tracing

log = logging.getLogger(__name__)


def add(session: Session, message_type: str, body: dict[str, Any]) -> OutboxMessage:
    row = OutboxMessage(message_type=message_type, body=body, headers=tracing.current_trace_headers())
    session.add(row)
    return row


class AfterCommitPublisher:
    """Publishes committed rows on a thread of its own, in batches: each batch is marked published by one
    statement. Started on first use, so each process (after any fork) has its own."""

    BATCH = 100

    def __init__(self, sessions: sessionmaker[Session], publisher: Publisher):
        self._sessions = sessions
        self._publisher = publisher
        self._rows: queue.SimpleQueue[OutboxMessage] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._unfinished = 0

    def submit(self, rows: Sequence[OutboxMessage]) -> None:
        with self._idle:
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
            try:
                with sentry_sdk.isolation_scope():  # each row's publish continues the trace the row was written in
                    publish_committed(self._sessions, self._publisher, batch)
            except Exception:  # committed rows are safe in the outbox; the relay publishes them
                log.warning("publishing after commit failed; left to the outbox relay", exc_info=True)
            with self._idle:
                self._unfinished -= len(batch)
                self._idle.notify_all()


def publish_committed(sessions: sessionmaker[Session], publisher: Publisher, rows: Sequence[OutboxMessage]) -> None:
    """Publishes rows this process has just committed, as it holds them: they are claimed (so the relay never
    publishes them too) and marked published in one transaction, without reading them back. A row the broker did
    not take is left to the relay."""
    with sessions() as session:
        claimed = set(session.scalars(claim_query([row.id for row in rows])))
        published: list[int] = []
        for row in rows:
            if row.id not in claimed:  # the relay has it, or published it already
                continue
            try:
                _publish(publisher, row)
            except Exception as exc:  # the broker is away: leave the rest for the relay
                session.execute(
                    update(OutboxMessage)
                    .where(OutboxMessage.id == row.id)
                    .values(attempts=OutboxMessage.attempts + 1, last_error=repr(exc)[:1000])
                )
                log.warning("outbox publish failed, the relay will retry: %r", exc)
                break
            published.append(row.id)
        if published:
            session.execute(
                update(OutboxMessage).where(OutboxMessage.id.in_(published)).values(published_at=func.now())
            )
        session.commit()


def publish_pending(
    sessions: sessionmaker[Session],
    publisher: Publisher,
    min_age: timedelta | None = None,
    limit: int = 200,
) -> int:
    """The relay: publishes unpublished rows older than `min_age`; returns how many went out."""
    published = 0
    with sessions() as session:
        for row in session.scalars(unpublished_query(min_age, limit)):
            try:
                _publish(publisher, row)
            except Exception as exc:  # the broker is away: leave the rest for the next run
                row.attempts += 1
                row.last_error = repr(exc)[:1000]
                log.warning("outbox publish failed, the relay will retry: %r", exc)
                break
            row.published_at = func.now()
            published += 1
        session.commit()
    return published


def _publish(publisher: Publisher, row: OutboxMessage) -> None:
    envelope = Envelope(row.message_type, row.body, str(row.message_id))
    destination = f"{EVENTS_EXCHANGE}/{row.message_type}"
    with tracing.publish_span(row.headers, destination, envelope.message_id, len(envelope.encode())) as headers:
        publisher.publish(replace(envelope, headers=headers))


def claim_query(ids: Sequence[int]) -> Select[tuple[int]]:
    """Of these rows, those still unpublished, locked; a row the relay holds is skipped."""
    return (
        select(OutboxMessage.id)
        .where(OutboxMessage.id.in_(ids), OutboxMessage.published_at.is_(None))
        .with_for_update(skip_locked=True, key_share=True)
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
