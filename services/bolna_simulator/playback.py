"""Plays one accepted call through its statuses on a thread of its own, posting a webhook for each, like Bolna."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import TYPE_CHECKING, Any

import requests

from services.bolna_simulator.config import (
    TERMINAL_STATUSES,
    WEBHOOK_BACKOFF_SECONDS,
    WEBHOOK_RETRIES,
    WEBHOOK_TIMEOUT_SECONDS,
    SimulatorConfig,
    without_duration,
)

if TYPE_CHECKING:
    # For annotations only: the state module starts playbacks, so a runtime import would be circular.
    from services.bolna_simulator.state import Execution, Simulator

log = logging.getLogger(__name__)


class CallPlayback:
    """Drives one call through its statuses and delivers its webhooks one after another, on its own thread.

    A call runs entirely under the config it was placed with.
    """

    def __init__(self, simulator: Simulator, execution: Execution, config: SimulatorConfig, rng: random.Random) -> None:
        self._simulator = simulator
        self._execution = execution
        self._config = config
        self._rng = rng
        self._held: dict[str, Any] | None = None
        self._silent = rng.random() < config.webhook_drop_rate
        self._durationless = rng.random() < config.completed_without_duration_rate

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"call-{self._execution.id[:8]}", daemon=True).start()

    def _plan(self) -> list[tuple[str, float]]:
        """Each status with the real seconds to wait before entering it: the dial, then Bolna's own redial if any."""
        plan = self._dial(self._execution.outcome, queued_after=0.0)
        if self._execution.redial_outcome is not None:
            plan.append(("scheduled", self._config.step_delay_seconds))
            plan += self._dial(self._execution.redial_outcome, queued_after=self._config.redial_delay_seconds)
        return plan

    def _dial(self, outcome: str, queued_after: float) -> list[tuple[str, float]]:
        step = self._config.step_delay_seconds
        if outcome == "completed":
            return [
                ("queued", queued_after),
                ("initiated", step),
                ("ringing", step),
                ("in-progress", step),
                ("call-disconnected", self._config.talk_seconds),
                ("completed", self._config.completed_delay_seconds),
            ]
        if outcome in ("balance-low", "canceled"):  # ended before anything was dialled
            return [("queued", queued_after), (outcome, step)]
        if outcome in ("failed", "error", "stopped"):
            return [("queued", queued_after), ("initiated", step), (outcome, step)]
        return [("queued", queued_after), ("initiated", step), ("ringing", step), (outcome, step)]

    def _run(self) -> None:
        # One session per call, since a requests.Session is not documented as thread-safe; it keeps the connection
        # open across the call's webhooks.
        with requests.Session() as session:
            # trust_env off: the simulator works offline, and an environment proxy must not capture 127.0.0.1.
            session.trust_env = False
            for status, delay in self._plan():
                self._execution.wake.wait(delay)
                if status == "completed" and self._durationless:
                    self._simulator.withhold_duration(self._execution, self._config.duration_lag_seconds)
                body = self._simulator.advance(self._execution, status)
                if body is None:
                    return
                if status == "completed" and self._durationless:
                    body = without_duration(body)
                self._emit(session, body)
                if body["status"] != status:  # stopped meanwhile: nothing more is played
                    return

    def _emit(self, session: requests.Session, body: dict[str, Any]) -> None:
        """Delivers `body`, or holds it to swap with the next one; the last webhook is never held."""
        if self._held is not None:
            held, self._held = self._held, None
            self._deliver(session, body)
            self._deliver(session, held)
        elif body["status"] not in TERMINAL_STATUSES and self._rng.random() < self._config.reorder_rate:
            self._held = body
        else:
            self._deliver(session, body)

    def _deliver(self, session: requests.Session, body: dict[str, Any]) -> None:
        if self._silent or self._rng.random() < self._config.dropped_webhooks.get(body["status"], 0.0):
            self._simulator.record_dropped_webhook(self._execution)
            return
        copies = 2 if self._rng.random() < self._config.duplicate_rate else 1
        for _ in range(copies):
            self._simulator.record_delivery(self._execution, self._post(session, body))

    def _post(self, session: requests.Session, body: dict[str, Any]) -> bool:
        """POSTs one webhook, retrying like Bolna on a transport error or a non-2xx answer."""
        execution_id, status = body["id"], body["status"]
        for attempt in range(WEBHOOK_RETRIES + 1):
            if attempt:
                time.sleep(WEBHOOK_BACKOFF_SECONDS * 2 ** (attempt - 1))
            if self._execution.abandoned:
                return False
            try:
                # Redirects are not followed: only a 2xx from the configured URL counts as a delivery.
                response = session.post(
                    self._config.webhook_url, json=body, timeout=WEBHOOK_TIMEOUT_SECONDS, allow_redirects=False
                )
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= response.status_code < 300:
                    log.info("call %s: webhook %s delivered", execution_id, status)
                    return True
                problem = f"HTTP {response.status_code}"
            log.warning("call %s: webhook %s attempt %d failed: %s", execution_id, status, attempt + 1, problem)
        log.error("call %s: webhook %s dropped after %d attempts", execution_id, status, WEBHOOK_RETRIES + 1)
        return False
