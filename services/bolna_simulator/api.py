"""Bolna's call endpoints, simulated: one lifecycle thread per accepted call posts its webhooks.

Besides Bolna's `/call`, `/executions/{id}`, `/call/{id}/stop` and `/v2/agent/{id}/executions`, `/_sim/*` exposes
counters (notably the highest number of simultaneous calls per agent), the executions held and the requests Bolna's
endpoints received, and lets a test change the behaviour at runtime.
"""

from __future__ import annotations

import errno
import hmac
import json
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from services.bolna_simulator.config import CallRequest, ExecutionsQuery, SimulatorConfig
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


# Marks a request whose connection `_ConnectionResetter` resets instead of answering.
RESET_CONNECTION = "bolna_simulator.reset_connection"


class _ConnectionResetter:
    """WSGI middleware: a request marked RESET_CONNECTION gets no answer, its TCP connection is reset (RST).

    The socket is closed with SO_LINGER 0, which makes the kernel send a reset rather than a FIN, and the
    ConnectionResetError raised instead of an answer tells the server the peer is gone: gunicorn (and werkzeug's
    server) then write nothing and log at most a debug line. Without a socket (Flask's test client) the error
    reaches the caller.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        answer = self._app(environ, start_response)
        if not environ.get(RESET_CONNECTION):
            return answer
        if hasattr(answer, "close"):
            answer.close()
        sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        raise ConnectionResetError(errno.ECONNRESET, "connection reset by the Bolna simulator")


def _headers() -> dict[str, str]:
    return {name.lower(): value for name, value in request.headers.items()}


def _bolna_api(simulator: Simulator) -> Blueprint:
    api = Blueprint("bolna", __name__)

    @api.before_request
    def record_request() -> None:
        simulator.record_request(request.method, request.path, _received_body(), _headers())

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
        if fault == "refused":
            raise ApiError(400, "The call was refused: the request cannot be placed")
        if fault == "rate_limited":
            retry_after = config.retry_after_seconds
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            raise ApiError(429, "Too Many Requests", headers=headers)
        execution_id = simulator.place_call(call)
        if fault == "lost_answer":
            if config.lost_answer_mode == "reset":
                request.environ[RESET_CONNECTION] = True
                return Response(status=204)  # never sent
            # The client gives up first; a gateway in front of Bolna would answer this, too late.
            time.sleep(config.timeout_seconds)
            raise ApiError(504, "Gateway Timeout")
        if fault == "error_after_placing":
            status = simulator.draw_error_after_placing()
            raise ApiError(status, HTTPStatus(status).phrase)
        return jsonify(message="done", status="queued", execution_id=execution_id)

    def authorize_other_request() -> None:
        _authorize(simulator.config.api_key)
        if simulator.draw_other_request_fault():
            raise ApiError(500, "Internal Server Error")

    @api.get("/executions/<execution_id>")
    def get_execution(execution_id: str) -> Response:
        authorize_other_request()
        return jsonify(simulator.execution(execution_id))

    @api.get("/v2/agent/<agent_id>/executions")
    def agent_executions(agent_id: str) -> Response:
        authorize_other_request()
        try:
            agent = uuid.UUID(agent_id)
        except ValueError as exc:
            raise ApiError(400, "agent_id: must be a UUID") from exc
        try:
            query = ExecutionsQuery.model_validate(request.args.to_dict())
        except ValidationError as exc:
            raise ApiError.invalid(exc) from exc
        return jsonify(simulator.agent_executions(str(agent), query))

    @api.post("/call/<execution_id>/stop")
    def stop_call(execution_id: str) -> Response:
        authorize_other_request()
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

    @control.get("/_sim/executions")
    def executions() -> Response:
        return jsonify(executions=simulator.executions())

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
    app.wsgi_app = _ConnectionResetter(app.wsgi_app)
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
