"""Bolna's call endpoints, simulated: one lifecycle thread per accepted call posts its webhooks.

Besides Bolna's `/call`, `/executions/{id}` and `/call/{id}/stop`, `/_sim/*` exposes counters (notably the
highest number of simultaneous calls per agent) and the requests Bolna's endpoints received, and lets a test change
the behaviour at runtime.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from services.bolna_simulator.config import CallRequest, SimulatorConfig
from services.bolna_simulator.errors import ApiError
from services.bolna_simulator.state import Simulator


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


def _received_body() -> Any:
    """The body as sent: its JSON when it parses, else its text (it is recorded even when it is refused)."""
    raw = request.get_data(cache=True)  # cached: the endpoint reads the same body afterwards
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _bolna_api(simulator: Simulator) -> Blueprint:
    api = Blueprint("bolna", __name__)

    @api.before_request
    def record_request() -> None:
        simulator.record_request(request.method, request.path, _received_body(), request.headers.get("Authorization"))

    @api.post("/call")
    def make_call() -> Response:
        config = simulator.receive_call()
        time.sleep(config.latency_ms / 1000)
        _authorize(config.api_key)
        try:
            call = CallRequest.model_validate(_json_object())
        except ValidationError as exc:
            raise ApiError.invalid(exc) from exc
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

    @control.get("/_sim/requests")
    def received_requests() -> Response:
        return jsonify(requests=simulator.requests())

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
    app.register_blueprint(_bolna_api(simulator))
    app.register_blueprint(_control_api(simulator))

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> tuple[Response, int, dict[str, str]]:
        return jsonify(exc.body), exc.status, exc.headers

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int, dict[str, str]]:
        # Werkzeug's own errors (unknown route, wrong method) answer in Bolna's shape too.
        return api_error(ApiError(exc.code or 500, exc.description or exc.name))

    return app
