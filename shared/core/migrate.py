"""Creating the database and applying migrations (used by `callctl db upgrade`, `make up` and the tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def create_database_if_missing(database_url: str) -> bool:
    """Creates the database named in the URL; returns whether it had to."""
    url = make_url(database_url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": url.database}).first()
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{url.database}"'))
            return not exists
    finally:
        admin.dispose()


def upgrade(database_url: str) -> None:
    create_database_if_missing(database_url)
    config = alembic_config()
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()
