"""Unit of work: one database transaction, plus the messages it announces, published once it has committed.

Messages are outbox rows written in the same transaction as the change that causes them: a committed change
always has its message, a rolled-back one never does.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from sqlalchemy.orm import Session, sessionmaker

from shared.calls.store import SlotLeases, SqlCallStore
from shared.core.models import Call, OutboxMessage
from shared.messaging import outbox
from shared.messaging.outbox import AfterCommitPublisher
from shared.observability.sentry import database_recovered


class UnitOfWork:
    session: Session
    calls: SqlCallStore

    def __init__(self, sessions: sessionmaker[Session], after_commit: AfterCommitPublisher, leases: SlotLeases):
        self._sessions = sessions
        self._after_commit = after_commit
        self._leases = leases

    def __enter__(self) -> Self:
        self.session = self._sessions()
        self.calls = SqlCallStore(self.session, self._leases)
        self._emitted: list[OutboxMessage] = []
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        self._forget_announcements()
        # close() rolls back whatever was not committed, and unlike rollback() leaves loaded objects readable.
        self.session.close()

    def rollback(self) -> None:
        """Rolls back the transaction so far; the unit of work goes on with a new one."""
        self._forget_announcements()
        self.session.rollback()

    def _forget_announcements(self) -> None:
        """What a rolled-back change announced must not be announced by a later one that reuses the object."""
        self._emitted = []
        for call in self._calls_in_session():
            call.messages.clear()

    def reads_only(self) -> Self:
        """For a unit of work that only reads: each statement runs on its own, without the round trips of BEGIN and
        ROLLBACK. Call it before the first statement."""
        self.session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        return self

    def emit(self, message_type: str, body: dict[str, Any]) -> None:
        self._emitted.append(outbox.add(self.session, message_type, body))

    def commit(self) -> None:
        self._collect_call_messages()
        self.session.commit()
        database_recovered()
        emitted, self._emitted = self._emitted, []
        if emitted:
            self._after_commit.submit(emitted)

    def _collect_call_messages(self) -> None:
        for call in self._calls_in_session():
            while call.messages:
                message = call.messages.pop(0)
                self.emit(message.message_type, message.body)

    def _calls_in_session(self) -> list[Call]:
        """The calls this transaction added or loaded (the caller holds a reference to any it changed)."""
        return [row for row in [*self.session.new, *self.session.identity_map.values()] if isinstance(row, Call)]


UnitOfWorkFactory = Callable[[], UnitOfWork]
