"""The engine and its sessions. Each process builds one engine in its composition root (after any fork)."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from shared.core.config import Settings


def create_db_engine(settings: Settings) -> Engine:
    return create_engine(
        settings.database_url,
        pool_pre_ping=True,
        pool_size=max(5, settings.web_threads),
        max_overflow=10,
        connect_args={"connect_timeout": 5},
        hide_parameters=True,  # error messages (and so Sentry events) never carry phone numbers or transcripts
    )


def session_maker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
