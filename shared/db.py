"""Engine and sessions. One engine per process, created on first use (after any fork)."""

from __future__ import annotations

import functools

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from shared.config import get_settings


@functools.cache
def get_engine() -> Engine:
    settings = get_settings()
    return create_engine(
        settings.database_url,
        pool_pre_ping=True,
        pool_size=max(5, settings.web_threads),
        max_overflow=10,
        connect_args={"connect_timeout": 5},
        hide_parameters=True,  # error messages (and so Sentry events) never carry phone numbers or transcripts
    )


@functools.cache
def session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def ping() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))
