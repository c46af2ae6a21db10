"""The simulated Bolna account in memory: its calls, its counters, its config and the chance draws behind them."""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError

from services.bolna_simulator.config import (
    COST_CENTS_PER_MINUTE,
    ERROR_MESSAGES,
    ERRORS_AFTER_PLACING,
    LINE_RELEASING_STATUSES,
    OUTCOMES,
    REDIALLED_OUTCOMES,
    SIMULATED_FROM_NUMBER,
    STOPPABLE_STATUSES,
    TRANSCRIPT,
    CallRequest,
    ExecutionsQuery,
    SimulatorConfig,
    without_duration,
)
from services.bolna_simulator.errors import ApiError
from services.bolna_simulator.playback import CallPlayback

log = logging.getLogger(__name__)

# The first four refuse the call; the last two place it and then fail the answer.
Fault = Literal["error", "timeout", "refused", "rate_limited", "lost_answer", "error_after_placing"]

RECORDED_REQUESTS = 5000  # the most recent requests to Bolna's endpoints kept for `GET /_sim/requests`


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def mask_authorization(header: str | None) -> str | None:
    """`Bearer sk-abcdefgh1234` as `Bearer ************1234`: the scheme and the key's last 4 characters only (a key
    of 8 characters or fewer is masked whole)."""
    if header is None:
        return None
    scheme, space, credentials = header.rpartition(" ")
    shown = credentials[-4:] if len(credentials) > 8 else ""
    return f"{scheme}{space}{'*' * (len(credentials) - len(shown))}{shown}"


@dataclass
class Stats:
    calls_received: int = 0
    calls_accepted: int = 0
    api_errors: int = 0
    api_timeouts: int = 0
    refused: int = 0
    rate_limited: int = 0
    answers_lost: int = 0
    errors_after_placing: int = 0
    other_requests_failed: int = 0  # `other_requests_error_rate`
    stop_requests: int = 0
    redials: int = 0  # calls Bolna's auto-retry took up again (`scheduled` with a retry count)
    webhooks_sent: int = 0
    webhook_failures: int = 0
    # Withheld on purpose (`dropped_webhooks`, `webhook_drop_rate`), unlike failures, which ran out of retries.
    webhooks_dropped: int = 0
    active_calls: dict[str, int] = field(default_factory=dict)
    max_active_calls: dict[str, int] = field(default_factory=dict)
    # Kept as calls move, not counted when asked: a harness polls the stats while thousands of calls are held.
    executions_by_status: Counter[str] = field(default_factory=Counter)


@dataclass
class Execution:
    """One call's record, changed only under the simulator's lock; its thread polls `abandoned` without it."""

    id: str
    agent_id: str
    to_number: str
    from_number: str
    user_data: dict[str, Any]
    outcome: str
    redial_outcome: str | None  # how Bolna's own redial of the call ends; None: it is not redialled
    duration: int
    extracted: dict[str, Any]
    # The counters of the generation the call was placed in, so a call outliving a reset cannot skew new ones.
    stats: Stats
    provider_call_id: str = field(default_factory=lambda: f"CA{uuid.uuid4().hex}")
    status: str = "queued"
    retry_count: int = 0
    dials: int = 0  # how often the callee's number was dialled (`initiated`), the redial's included
    created_at: str = field(default_factory=_now)
    updated_at: str = ""
    conversation_duration: int = 0
    cost_breakdown: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COST_CENTS_PER_MINUTE, 0.0))
    transcript: str | None = None
    recording_url: str | None = None
    error_message: str | None = None
    extracted_data: dict[str, Any] | None = None
    line_released: bool = False
    # Until this time (time.monotonic()) Bolna's record of a completed call lacks its duration.
    duration_withheld_until: float = 0.0
    abandoned: bool = False
    # Set by a stop or a reset to cut the lifecycle thread's current wait short.
    wake: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.updated_at = self.created_at

    def move_to(self, status: str) -> None:
        self.stats.executions_by_status[self.status] -= 1
        self.stats.executions_by_status[status] += 1
        self.status = status
        self.updated_at = _now()
        if status == "initiated":
            self.dials += 1
        if status in ERROR_MESSAGES:
            self.error_message = ERROR_MESSAGES[status]
        if status == "call-disconnected":
            self.conversation_duration = self.duration
            self.transcript = TRANSCRIPT
            self.recording_url = f"https://recordings.bolna-simulator.invalid/{self.provider_call_id}.mp3"
        elif status == "completed":
            # Bolna's post-processing, which `completed` waits for, is what fills in cost and extraction.
            minutes = self.duration / 60
            self.cost_breakdown = {part: round(rate * minutes, 2) for part, rate in COST_CENTS_PER_MINUTE.items()}
            self.extracted_data = self.extracted

    def to_json(self) -> dict[str, Any]:
        """The AgentExecution object, as `GET /executions/{id}` returns it and every webhook carries it."""
        record = self._record()
        if time.monotonic() < self.duration_withheld_until:
            return without_duration(record)
        return record

    def _record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "agent_id": self.agent_id,
            "batch_id": None,
            "status": self.status,
            "retry_count": self.retry_count,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "conversation_duration": float(self.conversation_duration),
            "total_cost": round(sum(self.cost_breakdown.values()), 2),
            "cost_breakdown": dict(self.cost_breakdown),
            "transcript": self.transcript,
            "answered_by_voice_mail": False,
            "error_message": self.error_message,
            "extracted_data": self.extracted_data,
            "telephony_data": {
                "duration": str(self.conversation_duration),
                "to_number": self.to_number,
                "from_number": self.from_number,
                "recording_url": self.recording_url,
                "hosted_telephony": True,
                "provider_call_id": self.provider_call_id,
                "call_type": "outbound",
                "provider": "twilio",
            },
            "context_details": {
                "recipient_data": self.user_data,
                "recipient_phone_number": self.to_number,
            },
        }


def _matches(execution: Execution, query: ExecutionsQuery) -> bool:
    if query.status is not None and execution.status != query.status:
        return False
    created_at = datetime.fromisoformat(execution.created_at)
    if query.created_from is not None and created_at < query.created_from:
        return False
    return query.created_to is None or created_at <= query.created_to


class Simulator:
    """The in-memory state of the simulated Bolna account, all of it guarded by one lock."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._lock = threading.Lock()
        self._config = config
        self._rng = random.Random(config.seed)
        self._executions: dict[str, Execution] = {}
        self._stats = Stats()
        self._requests: deque[dict[str, Any]] = deque(maxlen=RECORDED_REQUESTS)

    @property
    def config(self) -> SimulatorConfig:
        with self._lock:
            return self._config

    def update_config(self, changes: dict[str, Any]) -> SimulatorConfig:
        unknown = sorted(set(changes) - set(SimulatorConfig.model_fields))
        if unknown:
            raise ApiError(400, f"Unknown config keys: {', '.join(unknown)}")
        with self._lock:
            try:
                self._config = SimulatorConfig(**{**self._config.model_dump(), **changes})
            except ValidationError as exc:
                raise ApiError.invalid(exc) from exc
            if "seed" in changes:
                self._rng.seed(self._config.seed)
            return self._config

    def reset(self) -> None:
        with self._lock:
            for execution in self._executions.values():
                execution.abandoned = True
                execution.wake.set()
            self._executions.clear()
            self._stats = Stats()
            self._requests.clear()
            # Restarting the sequence makes a seeded run after a reset repeat the outcomes of the first one.
            self._rng.seed(self._config.seed)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stats = self._stats
            return {
                "calls_received": stats.calls_received,
                "calls_accepted": stats.calls_accepted,
                "api_errors": stats.api_errors,
                "api_timeouts": stats.api_timeouts,
                "refused": stats.refused,
                "rate_limited": stats.rate_limited,
                "answers_lost": stats.answers_lost,
                "errors_after_placing": stats.errors_after_placing,
                "other_requests_failed": stats.other_requests_failed,
                "stop_requests": stats.stop_requests,
                "redials": stats.redials,
                "active_calls": dict(stats.active_calls),
                "max_active_calls": dict(stats.max_active_calls),
                "webhooks_sent": stats.webhooks_sent,
                "webhook_failures": stats.webhook_failures,
                "webhooks_dropped": stats.webhooks_dropped,
                "executions_by_status": {
                    status: count for status, count in stats.executions_by_status.items() if count != 0
                },
            }

    def record_request(self, method: str, path: str, body: Any, headers: dict[str, str]) -> None:
        """Keeps what a client sent (its API key masked), so a test can check what Bolna would have received;
        `headers` are keyed by their lower-case names."""
        authorization = mask_authorization(headers.get("authorization"))
        if authorization is not None:
            headers = {**headers, "authorization": authorization}
        with self._lock:
            self._requests.append(
                {
                    "method": method,
                    "path": path,
                    "body": body,
                    "authorization": authorization,
                    "headers": headers,
                    "received_at": _now(),
                }
            )

    def requests(self) -> list[dict[str, Any]]:
        """The recorded requests, oldest first."""
        with self._lock:
            return list(self._requests)

    def receive_call(self) -> SimulatorConfig:
        """Counts a `POST /call` request and returns the config it is answered under."""
        with self._lock:
            self._stats.calls_received += 1
            return self._config

    def draw_fault(self, config: SimulatorConfig) -> Fault | None:
        with self._lock:
            if self._rng.random() < config.timeout_rate:
                self._stats.api_timeouts += 1
                return "timeout"
            if self._rng.random() < config.error_rate:
                self._stats.api_errors += 1
                return "error"
            if self._rng.random() < config.refusal_rate:
                self._stats.refused += 1
                return "refused"
            if self._rng.random() < config.rate_limit_rate:
                self._stats.rate_limited += 1
                return "rate_limited"
            if self._rng.random() < config.lost_answer_rate:
                self._stats.answers_lost += 1
                return "lost_answer"
            if self._rng.random() < config.error_after_placing_rate:
                self._stats.errors_after_placing += 1
                return "error_after_placing"
            return None

    def draw_other_request_fault(self) -> bool:
        """Whether a request other than `POST /call` fails (`other_requests_error_rate`)."""
        with self._lock:
            failed = self._rng.random() < self._config.other_requests_error_rate
            self._stats.other_requests_failed += failed
            return failed

    def draw_error_after_placing(self) -> int:
        """The status of a placed call's error answer."""
        with self._lock:
            return self._rng.choice(ERRORS_AFTER_PLACING)

    def place_call(self, call: CallRequest) -> str:
        with self._lock:
            config = self._config
            outcome = self._draw_outcome(config)
            redialled = outcome in REDIALLED_OUTCOMES and self._rng.random() < config.redial_rate
            execution = Execution(
                # uuid4 rather than the seeded generator: ids must stay unique across runs with one seed.
                id=str(uuid.uuid4()),
                agent_id=str(call.agent_id),
                to_number=call.recipient_phone_number,
                from_number=call.from_phone_number or SIMULATED_FROM_NUMBER,
                user_data=call.user_data,
                outcome=outcome,
                redial_outcome=self._draw_outcome(config) if redialled else None,
                duration=self._rng.randint(config.duration_min_seconds, config.duration_max_seconds),
                extracted={"interested": self._rng.random() < 0.5, "callback_requested": False},
                stats=self._stats,
            )
            # Each call draws its delivery chaos from its own generator: the call threads interleave
            # unpredictably, so sharing one would make a seeded run unrepeatable.
            call_rng = random.Random(self._rng.getrandbits(64))
            self._executions[execution.id] = execution
            self._stats.calls_accepted += 1
            self._stats.executions_by_status[execution.status] += 1
            self._take_line(execution)
        log.info(
            "call %s accepted for agent %s: outcome %s, %ss%s",
            execution.id,
            execution.agent_id,
            execution.outcome,
            execution.duration,
            f", redialled to {execution.redial_outcome}" if redialled else "",
        )
        CallPlayback(self, execution, config, call_rng).start()
        return execution.id

    def _draw_outcome(self, config: SimulatorConfig) -> str:
        return self._rng.choices(OUTCOMES, weights=[config.outcomes[o] for o in OUTCOMES])[0]

    def execution(self, execution_id: str) -> dict[str, Any]:
        with self._lock:
            return self._find(execution_id).to_json()

    def agent_executions(self, agent_id: str, query: ExecutionsQuery) -> dict[str, Any]:
        """One page of an agent's executions, newest first, as Bolna's AgentExecutionV2List."""
        with self._lock:
            # Newest first by creation; reversing the insertion order first keeps equal times newest first too.
            matching = sorted(
                (
                    execution
                    for execution in reversed(self._executions.values())
                    if execution.agent_id == agent_id and _matches(execution, query)
                ),
                key=lambda execution: datetime.fromisoformat(execution.created_at),
                reverse=True,
            )
            start = (query.page_number - 1) * query.page_size
            page = [execution.to_json() for execution in matching[start : start + query.page_size]]
        return {
            "page_number": query.page_number,
            "page_size": query.page_size,
            "total": len(matching),
            "has_more": start + query.page_size < len(matching),
            "data": page,
        }

    def executions(self) -> list[dict[str, Any]]:
        """Every execution held, oldest first, in brief: what a test needs to count the calls it caused."""
        with self._lock:
            return [
                {
                    "id": execution.id,
                    "agent_id": execution.agent_id,
                    "to_number": execution.to_number,
                    "user_data": execution.user_data,
                    "status": execution.status,
                    "outcome": execution.outcome,
                    "retry_count": execution.retry_count,
                    "dials": execution.dials,
                    "created_at": execution.created_at,
                    "updated_at": execution.updated_at,
                }
                for execution in self._executions.values()
            ]

    def stop(self, execution_id: str) -> None:
        with self._lock:
            self._stats.stop_requests += 1
            execution = self._find(execution_id)
            if execution.status not in STOPPABLE_STATUSES:
                raise ApiError(400, f"Call cannot be stopped: its status is {execution.status}")
            execution.move_to("stopped")
            self._release_line(execution)
        execution.wake.set()
        log.info("call %s stopped", execution_id)

    def advance(self, execution: Execution, status: str) -> dict[str, Any] | None:
        """Moves a call to `status`, returning its webhook body; a stopped call stays so, a reset one ends."""
        with self._lock:
            if execution.abandoned:
                return None
            if execution.status != "stopped":
                if status == "scheduled":  # Bolna's auto-retry takes the ended call up again
                    execution.retry_count += 1
                    execution.stats.redials += 1
                elif status == "queued" and execution.line_released:  # the redial, due: on the line again
                    self._take_line(execution)
                execution.move_to(status)
                if status in LINE_RELEASING_STATUSES:
                    self._release_line(execution)
            return execution.to_json()

    def withhold_duration(self, execution: Execution, seconds: float) -> None:
        """Bolna's post-processing writes the completed call's duration `seconds` from now."""
        with self._lock:
            execution.duration_withheld_until = time.monotonic() + seconds

    def record_delivery(self, execution: Execution, delivered: bool) -> None:
        with self._lock:
            if delivered:
                execution.stats.webhooks_sent += 1
            else:
                execution.stats.webhook_failures += 1

    def record_dropped_webhook(self, execution: Execution) -> None:
        with self._lock:
            execution.stats.webhooks_dropped += 1

    def _find(self, execution_id: str) -> Execution:
        execution = self._executions.get(execution_id)
        if execution is None:
            raise ApiError(404, f"Execution {execution_id} not found")
        return execution

    def _take_line(self, execution: Execution) -> None:
        execution.line_released = False
        stats = execution.stats
        active = stats.active_calls.get(execution.agent_id, 0) + 1
        stats.active_calls[execution.agent_id] = active
        stats.max_active_calls[execution.agent_id] = max(stats.max_active_calls.get(execution.agent_id, 0), active)

    def _release_line(self, execution: Execution) -> None:
        if not execution.line_released:
            execution.line_released = True
            execution.stats.active_calls[execution.agent_id] -= 1
