"""Bolna's call endpoints, simulated: one lifecycle thread per accepted call posts its webhooks.

Besides Bolna's `/call`, `/executions/{id}` and `/call/{id}/stop`, `/_sim/*` exposes counters (notably the
highest number of simultaneous calls per agent) and lets a test change the behaviour at runtime.
"""

from __future__ import annotations

import hmac
import logging
import random
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import httpx
import phonenumbers
from flask import Blueprint, Flask, Response, jsonify, request
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from werkzeug.exceptions import HTTPException

log = logging.getLogger("bolna_simulator")

OUTCOMES = ("completed", "busy", "no-answer", "failed")
TERMINAL_STATUSES = frozenset(
    {"completed", "busy", "no-answer", "failed", "canceled", "stopped", "error", "balance-low"}
)
# The line is free once the callee hangs up, minutes before Bolna's post-processing sends `completed`.
LINE_RELEASING_STATUSES = TERMINAL_STATUSES | {"call-disconnected"}
STOPPABLE_STATUSES = frozenset({"scheduled", "queued", "initiated"})

WEBHOOK_TIMEOUT_SECONDS = 10.0
WEBHOOK_RETRIES = 5
WEBHOOK_BACKOFF_SECONDS = 0.2

SIMULATED_FROM_NUMBER = "+918035735888"
COST_CENTS_PER_MINUTE = {"llm": 1.2, "network": 1.5, "platform": 2.0, "synthesizer": 3.0, "transcriber": 0.8}
TRANSCRIPT = (
    "assistant: Hello! This is Maya calling from Callflow. Is this a good time to talk?\n"
    "user: Yes, go ahead.\n"
    "assistant: I am calling to confirm your appointment for tomorrow at 11 am. Does that still work?\n"
    "user: Yes, that works for me.\n"
    "assistant: Great, you are all set. Thank you and have a nice day!\n"
)
FAILURE_MESSAGE = "Call failed: the carrier rejected the call (SIP 503 Service Unavailable)"

_E164 = re.compile(r"\+[1-9]\d{1,14}")

Fault = Literal["error", "timeout", "rate_limited"]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _describe(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(part) for part in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors())


class SimulatorConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIM_", extra="forbid", case_sensitive=False)

    webhook_url: str = "http://127.0.0.1:8002/webhooks/bolna"
    api_key: str = ""
    step_delay_seconds: float = Field(0.5, ge=0)
    talk_seconds: float = Field(2.0, ge=0)
    completed_delay_seconds: float = Field(1.0, ge=0)
    duration_min_seconds: int = Field(20, ge=0)
    duration_max_seconds: int = Field(180, ge=0)
    outcomes: Annotated[dict[str, Annotated[float, Field(ge=0)]], NoDecode] = Field(
        default_factory=lambda: {"completed": 1.0, "busy": 0.0, "no-answer": 0.0, "failed": 0.0}
    )
    error_rate: float = Field(0.0, ge=0, le=1)
    # Share of POST /call answered 429, with `Retry-After: retry_after_seconds` when that is set.
    rate_limit_rate: float = Field(0.0, ge=0, le=1)
    retry_after_seconds: int | None = Field(2, ge=0)
    timeout_rate: float = Field(0.0, ge=0, le=1)
    timeout_seconds: float = Field(30.0, ge=0)
    latency_ms: int = Field(0, ge=0)
    duplicate_rate: float = Field(0.0, ge=0, le=1)
    reorder_rate: float = Field(0.0, ge=0, le=1)
    # Share of calls whose webhooks are never delivered (the call still runs; GET /executions/{id} shows it).
    webhook_drop_rate: float = Field(0.0, ge=0, le=1)
    seed: int | None = None

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("outcomes", mode="before")
    @classmethod
    def _outcomes_from_text(cls, value: Any) -> Any:
        """Reads the environment's `completed=0.7,busy=0.3` form; mappings pass through."""
        if not isinstance(value, str):
            return value
        pairs = (item.partition("=") for item in value.split(",") if item.strip())
        return {name.strip(): weight.strip() for name, _, weight in pairs}

    @field_validator("outcomes")
    @classmethod
    def _known_outcomes(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(OUTCOMES))
        if unknown:
            raise ValueError(f"unknown outcomes {unknown}, expected some of {list(OUTCOMES)}")
        if sum(value.values()) <= 0:
            raise ValueError("at least one outcome needs a positive weight")
        return {outcome: value.get(outcome, 0.0) for outcome in OUTCOMES}

    @model_validator(mode="after")
    def _duration_range(self) -> SimulatorConfig:
        if self.duration_min_seconds > self.duration_max_seconds:
            raise ValueError("duration_min_seconds must not exceed duration_max_seconds")
        return self


def _e164(value: str) -> str:
    if not _E164.fullmatch(value):
        raise ValueError("must be an E.164 number such as +14155550123")
    if not phonenumbers.is_valid_number(phonenumbers.parse(value, None)):
        raise ValueError("is not a valid phone number")
    return value


PhoneNumber = Annotated[str, AfterValidator(_e164)]


class CallRequest(BaseModel):
    """The body of `POST /call`; Bolna's other options (agent_data, bypass_call_guardrails) pass unchecked."""

    model_config = ConfigDict(extra="allow")

    agent_id: uuid.UUID
    recipient_phone_number: PhoneNumber
    from_phone_number: PhoneNumber | None = None
    user_data: dict[str, Any] = Field(default_factory=dict)
    scheduled_at: datetime | None = None
    retry_config: dict[str, Any] | None = None


class ApiError(Exception):
    """Ends a request with an error answer, by default in Bolna's `{"error", "message"}` shape."""

    def __init__(
        self, status: int, message: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.headers = headers or {}
        self.status = status
        self.body = body if body is not None else {"error": status, "message": message}


@dataclass
class _Stats:
    calls_received: int = 0
    calls_accepted: int = 0
    api_errors: int = 0
    api_timeouts: int = 0
    rate_limited: int = 0
    stop_requests: int = 0
    webhooks_sent: int = 0
    webhook_failures: int = 0
    active_calls: dict[str, int] = field(default_factory=dict)
    max_active_calls: dict[str, int] = field(default_factory=dict)


@dataclass
class _Execution:
    """One call's record, changed only under the simulator's lock; its thread polls `abandoned` without it."""

    id: str
    agent_id: str
    to_number: str
    from_number: str
    user_data: dict[str, Any]
    outcome: str
    duration: int
    extracted: dict[str, Any]
    # The counters of the generation the call was placed in, so a call outliving a reset cannot skew new ones.
    stats: _Stats
    provider_call_id: str = field(default_factory=lambda: f"CA{uuid.uuid4().hex}")
    status: str = "queued"
    created_at: str = field(default_factory=_now)
    updated_at: str = ""
    conversation_duration: int = 0
    cost_breakdown: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COST_CENTS_PER_MINUTE, 0.0))
    transcript: str | None = None
    recording_url: str | None = None
    error_message: str | None = None
    extracted_data: dict[str, Any] | None = None
    line_released: bool = False
    abandoned: bool = False
    # Set by a stop or a reset to cut the lifecycle thread's current wait short.
    wake: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.updated_at = self.created_at

    def move_to(self, status: str) -> None:
        self.status = status
        self.updated_at = _now()
        if status == "call-disconnected":
            self.conversation_duration = self.duration
            self.transcript = TRANSCRIPT
            self.recording_url = f"https://recordings.bolna-simulator.invalid/{self.provider_call_id}.mp3"
        elif status == "completed":
            # Bolna's post-processing, which `completed` waits for, is what fills in cost and extraction.
            minutes = self.duration / 60
            self.cost_breakdown = {part: round(rate * minutes, 2) for part, rate in COST_CENTS_PER_MINUTE.items()}
            self.extracted_data = self.extracted
        elif status == "failed":
            self.error_message = FAILURE_MESSAGE

    def to_json(self) -> dict[str, Any]:
        """The AgentExecution object, as `GET /executions/{id}` returns it and every webhook carries it."""
        return {
            "id": self.id,
            "agent_id": self.agent_id,
            "batch_id": None,
            "status": self.status,
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


class Simulator:
    """The in-memory state of the simulated Bolna account, all of it guarded by one lock."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._lock = threading.Lock()
        self._config = config
        self._rng = random.Random(config.seed)
        self._executions: dict[str, _Execution] = {}
        self._stats = _Stats()

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
                raise ApiError(400, _describe(exc)) from exc
            if "seed" in changes:
                self._rng.seed(self._config.seed)
            return self._config

    def reset(self) -> None:
        with self._lock:
            for execution in self._executions.values():
                execution.abandoned = True
                execution.wake.set()
            self._executions.clear()
            self._stats = _Stats()
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
                "rate_limited": stats.rate_limited,
                "stop_requests": stats.stop_requests,
                "active_calls": dict(stats.active_calls),
                "max_active_calls": dict(stats.max_active_calls),
                "webhooks_sent": stats.webhooks_sent,
                "webhook_failures": stats.webhook_failures,
                "executions_by_status": dict(Counter(e.status for e in self._executions.values())),
            }

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
            if self._rng.random() < config.rate_limit_rate:
                self._stats.rate_limited += 1
                return "rate_limited"
            return None

    def place_call(self, call: CallRequest) -> str:
        with self._lock:
            config = self._config
            execution = _Execution(
                # uuid4 rather than the seeded generator: ids must stay unique across runs with one seed.
                id=str(uuid.uuid4()),
                agent_id=str(call.agent_id),
                to_number=call.recipient_phone_number,
                from_number=call.from_phone_number or SIMULATED_FROM_NUMBER,
                user_data=call.user_data,
                outcome=self._rng.choices(OUTCOMES, weights=[config.outcomes[o] for o in OUTCOMES])[0],
                duration=self._rng.randint(config.duration_min_seconds, config.duration_max_seconds),
                extracted={"interested": self._rng.random() < 0.5, "callback_requested": False},
                stats=self._stats,
            )
            # Each call draws its delivery chaos from its own generator: the call threads interleave
            # unpredictably, so sharing one would make a seeded run unrepeatable.
            call_rng = random.Random(self._rng.getrandbits(64))
            self._executions[execution.id] = execution
            self._stats.calls_accepted += 1
            active = self._stats.active_calls.get(execution.agent_id, 0) + 1
            self._stats.active_calls[execution.agent_id] = active
            maximum = self._stats.max_active_calls.get(execution.agent_id, 0)
            self._stats.max_active_calls[execution.agent_id] = max(maximum, active)
        log.info(
            "call %s accepted for agent %s: outcome %s, %ss",
            execution.id,
            execution.agent_id,
            execution.outcome,
            execution.duration,
        )
        _CallRun(self, execution, config, call_rng).start()
        return execution.id

    def execution(self, execution_id: str) -> dict[str, Any]:
        with self._lock:
            return self._find(execution_id).to_json()

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

    def advance(self, execution: _Execution, status: str) -> dict[str, Any] | None:
        """Moves a call to `status`, returning its webhook body; a stopped call stays so, a reset one ends."""
        with self._lock:
            if execution.abandoned:
                return None
            if execution.status != "stopped":
                execution.move_to(status)
                if status in LINE_RELEASING_STATUSES:
                    self._release_line(execution)
            return execution.to_json()

    def record_delivery(self, execution: _Execution, delivered: bool) -> None:
        with self._lock:
            if delivered:
                execution.stats.webhooks_sent += 1
            else:
                execution.stats.webhook_failures += 1

    def _find(self, execution_id: str) -> _Execution:
        execution = self._executions.get(execution_id)
        if execution is None:
            raise ApiError(404, f"Execution {execution_id} not found")
        return execution

    def _release_line(self, execution: _Execution) -> None:
        if not execution.line_released:
            execution.line_released = True
            execution.stats.active_calls[execution.agent_id] -= 1


class _CallRun:
    """Drives one call through its statuses and delivers its webhooks one after another, on its own thread.

    A call runs entirely under the config it was placed with.
    """

    def __init__(
        self, simulator: Simulator, execution: _Execution, config: SimulatorConfig, rng: random.Random
    ) -> None:
        self._simulator = simulator
        self._execution = execution
        self._config = config
        self._rng = rng
        self._held: dict[str, Any] | None = None
        self._silent = rng.random() < config.webhook_drop_rate

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"call-{self._execution.id[:8]}", daemon=True).start()

    def _plan(self) -> list[tuple[str, float]]:
        """Each status with the real seconds to wait before entering it."""
        step = self._config.step_delay_seconds
        outcome = self._execution.outcome
        if outcome == "completed":
            return [
                ("queued", 0.0),
                ("initiated", step),
                ("ringing", step),
                ("in-progress", step),
                ("call-disconnected", self._config.talk_seconds),
                ("completed", self._config.completed_delay_seconds),
            ]
        if outcome == "failed":
            return [("queued", 0.0), ("initiated", step), ("failed", step)]
        return [("queued", 0.0), ("initiated", step), ("ringing", step), (outcome, step)]

    def _run(self) -> None:
        # trust_env off: the simulator works offline, and an environment proxy must not capture 127.0.0.1.
        with httpx.Client(timeout=WEBHOOK_TIMEOUT_SECONDS, trust_env=False) as client:
            for status, delay in self._plan():
                self._execution.wake.wait(delay)
                body = self._simulator.advance(self._execution, status)
                if body is None:
                    return
                self._emit(client, body)
                if body["status"] in TERMINAL_STATUSES:
                    return

    def _emit(self, client: httpx.Client, body: dict[str, Any]) -> None:
        """Delivers `body`, or holds it to swap with the next one; the last webhook is never held."""
        if self._held is not None:
            held, self._held = self._held, None
            self._deliver(client, body)
            self._deliver(client, held)
        elif body["status"] not in TERMINAL_STATUSES and self._rng.random() < self._config.reorder_rate:
            self._held = body
        else:
            self._deliver(client, body)

    def _deliver(self, client: httpx.Client, body: dict[str, Any]) -> None:
        if self._silent:
            return
        copies = 2 if self._rng.random() < self._config.duplicate_rate else 1
        for _ in range(copies):
            self._simulator.record_delivery(self._execution, self._post(client, body))

    def _post(self, client: httpx.Client, body: dict[str, Any]) -> bool:
        """POSTs one webhook, retrying like Bolna on a transport error or a non-2xx answer."""
        execution_id, status = body["id"], body["status"]
        for attempt in range(WEBHOOK_RETRIES + 1):
            if attempt:
                time.sleep(WEBHOOK_BACKOFF_SECONDS * 2 ** (attempt - 1))
            if self._execution.abandoned:
                return False
            try:
                response = client.post(self._config.webhook_url, json=body)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    log.info("call %s: webhook %s delivered", execution_id, status)
                    return True
                problem = f"HTTP {response.status_code}"
            log.warning("call %s: webhook %s attempt %d failed: %s", execution_id, status, attempt + 1, problem)
        log.error("call %s: webhook %s dropped after %d attempts", execution_id, status, WEBHOOK_RETRIES + 1)
        return False


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify(error=status, message=message), status


def _authorize(api_key: str) -> None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "Missing or malformed Authorization header, expected 'Bearer <api key>'")
    if api_key and not hmac.compare_digest(token.encode(), api_key.encode()):
        # Bolna answers a wrong key in FastAPI's shape rather than its own.
        raise ApiError(403, "Invalid API key", body={"detail": "Invalid API key"})


def _json_object() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object")
    return body


def _bolna_api(simulator: Simulator) -> Blueprint:
    api = Blueprint("bolna", __name__)

    @api.post("/call")
    def make_call() -> Response:
        config = simulator.receive_call()
        time.sleep(config.latency_ms / 1000)
        _authorize(config.api_key)
        try:
            call = CallRequest.model_validate(_json_object())
        except ValidationError as exc:
            raise ApiError(400, _describe(exc)) from exc
        fault = simulator.draw_fault(config)
        if fault == "timeout":
            time.sleep(config.timeout_seconds)
            raise ApiError(504, "Gateway Timeout")
        if fault == "error":
            raise ApiError(500, "Internal Server Error")
        if fault == "rate_limited":
            retry_after = config.retry_after_seconds
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            raise ApiError(429, "Too Many Requests", headers=headers)
        return jsonify(message="done", status="queued", execution_id=simulator.place_call(call))

    @api.get("/executions/<execution_id>")
    def get_execution(execution_id: str) -> Response:
        _authorize(simulator.config.api_key)
        return jsonify(simulator.execution(execution_id))

    @api.post("/call/<execution_id>/stop")
    def stop_call(execution_id: str) -> Response:
        _authorize(simulator.config.api_key)
        simulator.stop(execution_id)
        return jsonify(message="done", status="stopped", execution_id=execution_id)

    return api


def _control_api(simulator: Simulator) -> Blueprint:
    control = Blueprint("control", __name__)

    @control.get("/health")
    def health() -> Response:
        return jsonify(status="ok", service="bolna-simulator")

    @control.get("/_sim/stats")
    def stats() -> Response:
        return jsonify(simulator.stats())

    @control.get("/_sim/config")
    def get_config() -> Response:
        return jsonify(simulator.config.model_dump())

    @control.post("/_sim/config")
    def update_config() -> Response:
        return jsonify(simulator.update_config(_json_object()).model_dump())

    @control.post("/_sim/reset")
    def reset() -> Response:
        simulator.reset()
        return jsonify(status="reset")

    return control


def create_app(config: SimulatorConfig | None = None) -> Flask:
    simulator = Simulator(config or SimulatorConfig())
    app = Flask(__name__)
    app.extensions["bolna_simulator"] = simulator
    app.register_blueprint(_bolna_api(simulator))
    app.register_blueprint(_control_api(simulator))

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> tuple[Response, int, dict[str, str]]:
        return jsonify(exc.body), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        return _error(exc.code or 500, exc.description or exc.name)

    return app
