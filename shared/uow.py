"""Unit of work: one database transaction, plus the messages it emits, published once it has committed."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any, Self

from sqlalchemy.orm import Session

from shared import outbox
from shared.db import session_factory
from shared.models import OutboxMessage
from shared.observability import database_recovered

log = logging.getLogger(__name__)


class UnitOfWork:
    session: Session

    def __enter__(self) -> Self:
        self.session = session_factory()()
        self._emitted: list[OutboxMessage] = []
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        # close() rolls back whatever was not committed, and unlike rollback() leaves loaded objects readable.
        self.session.close()

    def emit(self, message_type: str, body: dict[str, Any]) -> None:
        self._emitted.append(outbox.add(self.session, message_type, body))

    def commit(self) -> None:
        self.session.commit()
        database_recovered()
        ids = [row.id for row in self._emitted]
        self._emitted = []
        if ids:
            try:
                outbox.publish_pending(outbox.get_publisher(), ids=ids)
            except Exception:  # committed rows are safe in the outbox; the relay publishes them
                log.warning("publishing after commit failed; left to the outbox relay", exc_info=True)
