"""What every HTTP service has in common: the app skeleton, RFC 9457 problem answers, request ids, /health.

Building an app has no side effects: logging, Sentry and the broker topology are set up by each service's
composition root.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import sentry_sdk
from flask import Flask, Response, g, jsonify, request
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException

from shared.core.db import database_unavailable
from shared.core.errors import ERROR_TABLE, CallflowError, ErrorType
from shared.http.health import HealthCheck
from shared.observability.sentry import HEALTH_PATH, report, report_database_error

PROBLEM_JSON = "application/problem+json"
MAX_BODY_BYTES = 256 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# What a client may send to steer Sentry's tracing: its trace id, its sampling decision (`-1`), a `sample_rand` under
# any rate, and the dynamic sampling context Sentry's servers read.
_CLIENT_TRACE_HEADERS = ("HTTP_SENTRY_TRACE", "HTTP_BAGGAGE")
_HTTP_ERROR_TYPES = {
    400: ErrorType.VALIDATION_ERROR,
    404: ErrorType.NOT_FOUND,
    405: ErrorType.METHOD_NOT_ALLOWED,
    413: ErrorType.PAYLOAD_TOO_LARGE,
}


class _EdgeApp(Flask):
    """Every HTTP service is Callflow's edge: no caller is trusted with its tracing. A client's trace headers are
    dropped before the SDK's Flask integration (which wraps `Flask.__call__`) reads them, so each request starts its
    own trace and Callflow alone decides whether it is sampled. A call's later work continues that trace over
    AMQP and from the call's stored trace headers, never from HTTP headers."""

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        for header in _CLIENT_TRACE_HEADERS:
            environ.pop(header, None)
        return super().__call__(environ, start_response)


def create_http_app(service: str, health: HealthCheck) -> Flask:
    """A Flask app with request ids, problem+json errors and `GET /health` (with `/live` and `/ready`); the service
    adds its routes."""
    app = _EdgeApp(service)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.before_request
    def _assign_request_id() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        sentry_sdk.set_tag("request_id", g.request_id)

    @app.before_request
    def _start_own_trace() -> None:
        """A request that is no transaction (every webhook-receiver request; HEAD and OPTIONS elsewhere) still gets a
        trace of its own. Without one, its events would carry the trace of the thread serving it, shared with every
        request that thread serves."""
        if sentry_sdk.get_client().is_active() and sentry_sdk.get_current_span() is None:
            sentry_sdk.get_isolation_scope().set_new_propagation_context()

    @app.after_request
    def _echo_request_id(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        return response

    @app.get(HEALTH_PATH)
    def _health():
        body, status = health.check()
        return jsonify(body), status

    @app.get(f"{HEALTH_PATH}/live")
    def _live():
        body, status = health.live()
        return jsonify(body), status

    @app.get(f"{HEALTH_PATH}/ready")
    def _ready():
        body, status = health.ready()
        return jsonify(body), status

    @app.errorhandler(CallflowError)
    def _callflow_error(error: CallflowError):
        report(error, source=request.remote_addr)
        return problem(error.error_type, error.detail, **error.problem_fields)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        return problem(error_type_of_status(error.code or 500), error.description or "", status=error.code)

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def _database_error(error: DBAPIError):
        # At the route, as every report from a request: not at its path's ids.
        if database_unavailable(error):
            report_database_error(error)  # once per outage
        else:  # one statement failed (a timeout, a deadlock): no outage, and each is worth seeing
            sqlstate = getattr(error.orig, "sqlstate", None)
            detail = f"A statement failed: {type(error.orig).__name__} (SQLSTATE {sqlstate})"
            report(CallflowError(ErrorType.INTERNAL_ERROR, detail), cause=error)
        return problem(ErrorType.DATABASE_ERROR, "The database is unavailable; retry later.")

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        report(CallflowError(ErrorType.INTERNAL_ERROR, f"Unexpected {type(error).__name__}"), cause=error)
        return problem(ErrorType.INTERNAL_ERROR, "An unexpected error occurred; it has been reported.")

    return app


def problem(error_type: ErrorType, detail: str, status: int | None = None, **extras: Any) -> Response:
    body = problem_body(error_type, detail, status, g.get("request_id"), **extras)
    response = jsonify(body)
    response.status_code = body["status"]
    response.content_type = PROBLEM_JSON
    return response


def problem_body(
    error_type: ErrorType, detail: str, status: int | None, request_id: str | None, **extras: Any
) -> dict[str, Any]:
    """An RFC 9457 problem for an error of the table; `status` overrides the table's."""
    spec = ERROR_TABLE[error_type]
    return {
        "type": f"urn:callflow:problem:{error_type}",
        "title": spec.title,
        "status": status or spec.http_status or 500,
        "detail": detail,
        "error_type": str(error_type),
        "request_id": request_id,
        **extras,
    }


def error_type_of_status(status: int) -> ErrorType:
    """The error of the table an HTTP error status is answered as."""
    return _HTTP_ERROR_TYPES.get(status, ErrorType.VALIDATION_ERROR if status < 500 else ErrorType.INTERNAL_ERROR)
