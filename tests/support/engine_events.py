"""What the engine does on this thread while a block runs: the transactions it begins, the statements it runs."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from sqlalchemy import event

from tests.support.components import components


@contextmanager
def _noted(engine_event: str, note: Callable[..., object]) -> Iterator[list[object]]:
    """What `note` makes of each `engine_event` of the engine this thread causes while the block runs (the outbox's
    own thread marks what it published, apart from the request)."""
    noted: list[object] = []
    thread = threading.get_ident()

    def listener(*args: object) -> None:
        if threading.get_ident() == thread:
            noted.append(note(*args))

    event.listen(components().engine, engine_event, listener)
    try:
        yield noted
    finally:
        event.remove(components().engine, engine_event, listener)


def transactions_begun() -> AbstractContextManager[list[object]]:
    """The database transactions this thread begins while the block runs."""
    return _noted("begin", lambda connection: connection)


def statements_run() -> AbstractContextManager[list[object]]:
    """The SQL statements this thread runs while the block runs, each on one line."""
    return _noted("before_cursor_execute", lambda connection, cursor, statement, *rest: " ".join(statement.split()))
