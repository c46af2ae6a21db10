"""The transactional outbox: messages are rows written with the change that causes them, published after commit.

A row is published right after its transaction commits when the broker is up; the relay job publishes
whatever is left (broker down, process died between commit and publish). Consumers are idempotent, so the
rare double publish is harmless; a lost one is impossible.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

from sqlalchemy import Select, func, select
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


def publish_pending(
    sessions: sessionmaker[Session],
    publisher: Publisher,
    ids: Sequence[int] | None = None,
    min_age: timedelta | None = None,
    limit: int = 200,
) -> int:
    """Publishes unpublished rows (those named, or any older than min_age); returns how many went out."""
    published = 0
    with sessions() as session:
        for row in session.scalars(unpublished_query(ids, min_age, limit)):
            envelope = Envelope(row.message_type, row.body, str(row.message_id))
            try:
                with tracing.publish_span(
                    row.headers, f"{EVENTS_EXCHANGE}/{row.message_type}", envelope.message_id, len(envelope.encode())
                ) as headers:
                    publisher.publish(replace(envelope, headers=headers))
            except Exception as exc:  # the broker is away: leave the rest for the relay
                row.attempts += 1
                row.last_error = repr(exc)[:1000]
                log.warning("outbox publish failed, the relay will retry: %r", exc)
                break
            row.published_at = func.now()
            published += 1
        session.commit()
    return published


def unpublished_query(ids: Sequence[int] | None, min_age: timedelta | None, limit: int) -> Select[tuple[OutboxMessage]]:
    """The rows publish_pending takes, locked (built apart so tests/integration/test_query_plans.py can EXPLAIN it)."""
    query = (
        select(OutboxMessage)
        .where(OutboxMessage.published_at.is_(None))
        .order_by(OutboxMessage.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if ids is not None:
        query = query.where(OutboxMessage.id.in_(ids))
    if min_age is not None:
        query = query.where(OutboxMessage.created_at < func.now() - min_age)
    return query
