"""The whole stack as real processes: the three services and the Bolna simulator, on this run's db and vhost."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shared.bolna.execution import CONTEXT_CALL_ID_KEY
from tests.conftest import WEBHOOK_SECRET
from tests.support.processes import ServiceProcess, free_port
from tests.support.sentry_sink import SentrySink

BOLNA_API_KEY = "test-bolna-key"
KEEPALIVE_SECONDS = 1.0
FAST_CALLS = {
    "step_delay_seconds": 0.1,
    "talk_seconds": 0.4,
    "completed_delay_seconds": 0.2,
    "error_rate": 0.0,
    "refusal_rate": 0.0,
    "rate_limit_rate": 0.0,
    "timeout_rate": 0.0,
    "latency_ms": 0,
    "duplicate_rate": 0.0,
    "reorder_rate": 0.0,
    "webhook_drop_rate": 0.0,
    "lost_answer_rate": 0.0,
    "lost_answer_mode": "timeout",
    "error_after_placing_rate": 0.0,
    "dropped_webhooks": {},
    "api_key": BOLNA_API_KEY,
    "completed_without_duration_rate": 0.0,
    "duration_lag_seconds": 0.0,
    "redial_rate": 0.0,
    "other_requests_error_rate": 0.0,
    "outcomes": {"completed": 1.0},
}


@dataclass
class Stack:
    sentry: SentrySink
    simulator: ServiceProcess
    webhook_receiver: ServiceProcess
    queue_processor: ServiceProcess
    call_initiator: ServiceProcess
    # A connection idle for gunicorn's keep-alive (2 s) is closed by the server; one reused at that moment fails
    # before the request is read ("Server disconnected"). The client forgets idle connections well before that.
    http: httpx.Client = field(
        default_factory=lambda: httpx.Client(timeout=30, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_SECONDS))
    )

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, f"{self.call_initiator.url}{path}", **kwargs)

    def webhook(self, payload: Any, token: str | None = WEBHOOK_SECRET, **kwargs: Any) -> httpx.Response:
        params = {"token": token} if token is not None else {}
        return self.http.post(f"{self.webhook_receiver.url}/webhooks/bolna", params=params, json=payload, **kwargs)

    def sim_config(self, **changes: Any) -> dict[str, Any]:
        response = self.http.post(f"{self.simulator.url}/_sim/config", json=changes)
        response.raise_for_status()
        return response.json()

    def sim_stats(self) -> dict[str, Any]:
        return self.http.get(f"{self.simulator.url}/_sim/stats").json()

    def sim_execution(self, execution_id: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {BOLNA_API_KEY}"}
        return self.http.get(f"{self.simulator.url}/executions/{execution_id}", headers=headers).json()

    def sim_executions(self) -> list[dict[str, Any]]:
        """Every execution the simulator holds, oldest first: id, agent_id, to_number, user_data, status, created_at."""
        response = self.http.get(f"{self.simulator.url}/_sim/executions")
        response.raise_for_status()
        return response.json()["executions"]

    def sim_dials(self, call_id: str) -> int:
        """How many times Bolna was asked to place this Callflow call (its `user_data.callflow_call_id`)."""
        return sum(1 for e in self.sim_executions() if e["user_data"].get(CONTEXT_CALL_ID_KEY) == call_id)

    def sim_requests(self) -> list[dict[str, Any]]:
        """What Bolna's endpoints at the simulator received, oldest first (the API key masked but its last 4), each
        with its headers keyed by lower-case name."""
        response = self.http.get(f"{self.simulator.url}/_sim/requests")
        response.raise_for_status()
        return response.json()["requests"]

    def sim_stop(self, execution_id: str) -> httpx.Response:
        """Stops a call at the simulator, as Bolna's `POST /call/{id}/stop` would."""
        headers = {"Authorization": f"Bearer {BOLNA_API_KEY}"}
        return self.http.post(f"{self.simulator.url}/call/{execution_id}/stop", headers=headers)

    def call(self, auth: dict[str, str], call_id: str) -> dict[str, Any]:
        response = self.api("GET", f"/api/calls/{call_id}", headers=auth)
        response.raise_for_status()
        return response.json()

    @property
    def processes(self) -> list[ServiceProcess]:
        return [self.call_initiator, self.queue_processor, self.webhook_receiver, self.simulator]


def wait_until(predicate: Callable[[], Any], timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s: {message}")


def sentry_env(sink: SentrySink) -> dict[str, str]:
    """Services that send every event and trace to the sink, although the environment is not production."""
    return {
        "SENTRY_DSN": sink.dsn,
        "SENTRY_SEND_IN_DEVELOPMENT": "true",
        "SENTRY_TRACES_SAMPLE_RATE": "1.0",
        "SENTRY_PROFILES_SAMPLE_RATE": "0",
        "SENTRY_RELEASE": "callflow@test",
    }


@contextmanager
def running_stack(sink: SentrySink, logs: Path, env: dict[str, str], sim: dict[str, Any]) -> Iterator[Stack]:
    """Starts the simulator and the three services (with `env` on top of the defaults), stops them after."""
    sim_port, receiver_port = free_port(), free_port()
    common = {
        "BOLNA_API_URL": f"http://127.0.0.1:{sim_port}",
        "BOLNA_API_KEY": BOLNA_API_KEY,
        "BOLNA_TIMEOUT_SECONDS": "3",
        "WEB_CONCURRENCY": "2",
        **sentry_env(sink),
        **env,
    }
    simulator = ServiceProcess(
        "services.bolna_simulator",
        sim_port,
        {
            "SIM_API_KEY": BOLNA_API_KEY,
            "SIM_WEBHOOK_URL": f"http://127.0.0.1:{receiver_port}/webhooks/bolna?token={WEBHOOK_SECRET}",
        },
        logs,
    )
    stack = Stack(
        sentry=sink,
        simulator=simulator,
        webhook_receiver=ServiceProcess("services.webhook_receiver", receiver_port, common, logs),
        queue_processor=ServiceProcess("services.queue_processor", free_port(), common, logs),
        call_initiator=ServiceProcess("services.call_initiator", free_port(), common, logs),
    )
    try:
        for process in reversed(stack.processes):
            process.start()
        stack.sim_config(**sim)
        yield stack
    finally:
        for process in stack.processes:
            process.stop()
