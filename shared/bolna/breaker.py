"""A circuit breaker for Bolna: after repeated failures it stops calling for a while, then lets one trial through.

It is per process on purpose: each process learns from its own requests, and no shared store can fail with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(
        self, failure_threshold: int, cooldown_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = failure_threshold
        self._cooldown = cooldown_seconds
        self._clock = clock  # seconds, monotonic; tests pass a fake one
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def is_open(self) -> bool:
        """True while requests are being held back (the trial of a half-open breaker counts as open)."""
        with self._lock:
            return self._opened_at is not None and (
                self._trial_in_flight or self._clock() - self._opened_at < self._cooldown
            )

    def allow(self) -> bool:
        with self._lock:
            if self._opened_at is None:
                return True
            if self._trial_in_flight or self._clock() - self._opened_at < self._cooldown:
                return False
            self._trial_in_flight = True  # half-open: one request tests whether Bolna is back
            return True

    def record_success(self) -> bool:
        """Counts a success; True when it closed an open breaker."""
        with self._lock:
            closed = self._opened_at is not None
            self._failures = 0
            self._opened_at = None
            self._trial_in_flight = False
            return closed

    def record_failure(self) -> bool:
        """Counts a failure; True when it opened the breaker from closed (a failed trial re-opens it: the same
        outage)."""
        with self._lock:
            self._failures += 1
            opened = self._opened_at is None and self._failures >= self._threshold
            if self._trial_in_flight or self._failures >= self._threshold:
                self._opened_at = self._clock()
            self._trial_in_flight = False
            return opened
