"""Real failures on demand: a PostgreSQL trigger that makes chosen writes fail, as a broken database would."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text


@contextmanager
def failing_writes(table: str, when: str, timing: str = "BEFORE UPDATE") -> Iterator[None]:
    """Every write to `table` for which the SQL condition `when` (over NEW/OLD) holds raises an error."""
    name = f"test_fault_{uuid.uuid4().hex[:8]}"
    engine = create_engine(os.environ["DATABASE_URL"], isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(
            text(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF {when} THEN RAISE EXCEPTION 'injected fault {name}'; END IF; "
                "RETURN NEW; END $$"
            )
        )
        conn.execute(text(f"CREATE TRIGGER {name} {timing} ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()"))
    try:
        yield
    finally:
        with engine.connect() as conn:
            conn.execute(text(f"DROP TRIGGER IF EXISTS {name} ON {table}"))
            conn.execute(text(f"DROP FUNCTION IF EXISTS {name}()"))
        engine.dispose()
