"""The pool without a ping per checkout: a connection that sat idle is checked before use, so one the server
closed meanwhile (a PostgreSQL restart, a proxy's idle timeout) is replaced instead of failing a request."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from shared.core import db
from tests.support.components import components


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def _terminate(pid: int) -> None:
    with components().engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        conn.commit()


@pytest.fixture
def engine():
    engine = db.create_db_engine(components().settings.model_copy(update={"web_threads": 1}))
    yield engine
    engine.dispose()


def test_an_idle_connection_the_server_closed_is_replaced_on_checkout(engine, monkeypatch):
    monkeypatch.setattr(db, "IDLE_CHECK_SECONDS", 0.0)  # every connection counts as idle
    closed = _backend_pid(engine)
    _terminate(closed)
    assert _backend_pid(engine) != closed, "a fresh connection served the request"


def test_a_busy_connection_is_not_checked(engine, monkeypatch):
    """The counterpart: without the idle check the closed connection is handed out and the request fails, so the
    test above proves the check, and a busy pool pays nothing for it."""
    monkeypatch.setattr(db, "IDLE_CHECK_SECONDS", 3600.0)
    _terminate(_backend_pid(engine))
    with pytest.raises(OperationalError):
        _backend_pid(engine)
    assert _backend_pid(engine), "the pool dropped the dead connection after the failure"
