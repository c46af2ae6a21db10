"""Query plans on a migrated database of a test module's own: how the EXPLAIN tests make one and read plans."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, Executable, create_engine
from sqlalchemy.engine import make_url

from shared.core import migrate
from tests.support.isolation import POSTGRES_ADMIN_URL, drop_database


@contextmanager
def migrated_database(prefix: str) -> Iterator[Engine]:
    """An engine on a new database at the latest migration, dropped afterwards."""
    url = make_url(POSTGRES_ADMIN_URL).set(database=f"{prefix}_{uuid.uuid4().hex[:10]}")
    engine = create_engine(url)
    try:
        migrate.upgrade(url.render_as_string(hide_password=False))
        yield engine
    finally:
        engine.dispose()
        drop_database(str(url.database))


def run_seed(engine: Engine, sql: str) -> None:
    """Runs a script of statements in one transaction, on the driver's own cursor: `%` is SQL's modulo there."""
    with engine.begin() as connection:
        connection.connection.cursor().execute(sql)


def explain(connection: Connection, statement: Executable, streamed: bool = False) -> dict[str, Any]:
    """The plan PostgreSQL makes for the statement with its parameters, compiled as SQLAlchemy runs it (declared as
    a cursor when it is streamed: PostgreSQL plans those for their first rows)."""
    compiled = statement.compile(dialect=connection.dialect, compile_kwargs={"render_postcompile": True})
    sql = f"DECLARE plan_probe CURSOR FOR {compiled.string}" if streamed else compiled.string
    [[plans]] = connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}", compiled.params).all()
    return plans[0]["Plan"]
