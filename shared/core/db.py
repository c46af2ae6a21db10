"""The engine and its sessions. Each process builds one engine in its composition root (after any fork)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.orm import Session, sessionmaker

from shared.core.config import Settings

# A connection idle this long is checked before it is handed out: a restart of PostgreSQL or a proxy that dropped
# an idle connection is found then, and a fresh connection is used instead. A busy pool never pays for the check.
IDLE_CHECK_SECONDS = 10.0
# Connections are replaced after this long, before a server-side or proxy idle timeout closes them.
RECYCLE_SECONDS = 1800
_CHECKED_IN_AT = "callflow_checked_in_at"
# The errors of a database that cannot be used at all right now, rather than of one statement: an operator's or a
# crash's shutdown, a server still starting, no connection slot left. A connection that fails has no SQLSTATE, or
# one of class 08.
_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})


def create_db_engine(settings: Settings) -> Engine:
    engine = create_engine(
        settings.database_url,
        # Each request thread, and in the queue-processor each placing thread, holds at most one connection.
        pool_size=max(5, settings.web_threads, settings.dispatch_concurrency + 4),
        max_overflow=10,
        pool_recycle=RECYCLE_SECONDS,
        connect_args={"connect_timeout": 5},
        hide_parameters=True,  # error messages (and so Sentry events) never carry phone numbers or transcripts
    )
    event.listen(engine, "checkin", _note_checkin)
    event.listen(engine, "checkout", _check_if_idle)
    return engine


def _note_checkin(dbapi_connection: Any, record: Any) -> None:
    record.info[_CHECKED_IN_AT] = time.monotonic()


def _check_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Raising DisconnectionError makes the pool drop this connection and check out another."""
    checked_in_at = record.info.get(_CHECKED_IN_AT)
    if checked_in_at is None or time.monotonic() - checked_in_at < IDLE_CHECK_SECONDS:
        return
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        dbapi_connection.rollback()
    except Exception as error:
        raise exc.DisconnectionError(f"an idle connection was closed: {error!r}") from error


def session_maker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def database_unavailable(error: BaseException) -> bool:
    """Whether `error` says the database cannot be reached or used now (it passes with the outage), as opposed to
    a statement that failed (a timeout, a deadlock, a constraint), which may fail the same way again."""
    if isinstance(error, exc.InterfaceError):
        return True
    if not isinstance(error, exc.OperationalError):
        return False
    sqlstate = getattr(error.orig, "sqlstate", None)
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in _UNAVAILABLE_SQLSTATES
