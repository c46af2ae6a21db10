"""Watching the product's own count of held slots while a test runs.

The simulator counts a call only while its line is busy, a lower bound on the slots Callflow holds. The limit is a
promise about slots (`calls.slot_held`), so this samples them, on a connection of its own, and keeps each
customer's peak. A check after the run cannot see it: by then every slot is free again.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from types import TracebackType
from typing import Self

from sqlalchemy import text

from tests.support.components import components

HELD_SLOTS = text("SELECT user_id, count(*) FROM calls WHERE slot_held GROUP BY user_id")
SAMPLE_EVERY_SECONDS = 0.02


class SlotSampler:
    """`with SlotSampler() as slots: ...`, then `slots.peak(user_id)`; a failure to sample fails the block."""

    def __init__(self) -> None:
        self.samples = 0
        self._peaks: Counter[uuid.UUID] = Counter()
        self._stopping = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._sample_until_stopped, name="slot-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        if self._failure is not None and exc is None:
            raise AssertionError(f"sampling held slots failed: {self._failure!r}") from self._failure

    def peak(self, user_id: uuid.UUID) -> int:
        """The most slots the customer held in any one sample."""
        return self._peaks[user_id]

    def _sample_until_stopped(self) -> None:
        try:
            with components().engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                while not self._stopping.is_set():
                    for user_id, held in conn.execute(HELD_SLOTS):
                        self._peaks[user_id] = max(self._peaks[user_id], held)
                    self.samples += 1
                    self._stopping.wait(SAMPLE_EVERY_SECONDS)
        except Exception as exc:  # reported by __exit__, in the test's own thread
            self._failure = exc
