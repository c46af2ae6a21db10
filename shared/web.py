"""What every HTTP service has in common: the app skeleton, RFC 9457 problem answers, request ids, /health."""

from __future__ import annotations

import logging
import math
import re
import uuid
from typing import Any

import sentry_sdk
from flask import Flask, Response, g, jsonify, request
from pika.exceptions import AMQPError
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException

from shared import health
from shared.config import get_settings
from shared.errors import ERROR_TABLE, CallflowError, ErrorType
from shared.messaging import declare_topology_at
from shared.observability import init_sentry, report, report_database_error

PROBLEM_JSON = "application/problem+json"
MAX_BODY_BYTES = 256 * 1024
MAX_JSON_DEPTH = 32
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_HTTP_ERROR_TYPES = {
    400: ErrorType.VALIDATION_ERROR,
    404: ErrorType.NOT_FOUND,
    405: ErrorType.METHOD_NOT_ALLOWED,
    413: ErrorType.PAYLOAD_TOO_LARGE,
}

log = logging.getLogger(__name__)


def configure_logging() -> None:
    logging.basicConfig(
        level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("pika").setLevel(logging.WARNING)  # pika narrates every connection at INFO


def create_service_app(service: str) -> Flask:
    settings = get_settings()
    configure_logging()
    init_sentry(service, settings)
    try:
        declare_topology_at(settings.rabbitmq_url)
    except (AMQPError, OSError) as exc:  # a broker that is down must not stop the service from answering
        log.warning("could not declare the broker topology at start (declared again on first publish): %r", exc)
    app = Flask(service)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.before_request
    def _assign_request_id() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        sentry_sdk.set_tag("request_id", g.request_id)

    @app.after_request
    def _echo_request_id(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        return response

    @app.get("/health")
    def _health():
        body, status = health.check(service, settings)
        return jsonify(body), status

    @app.errorhandler(CallflowError)
    def _callflow_error(error: CallflowError):
        report(error)
        return problem(error.error_type, error.detail, **error.problem_extras)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        error_type = _HTTP_ERROR_TYPES.get(error.code or 500, ErrorType.INTERNAL_ERROR)
        return problem(error_type, error.description or "", status=error.code)

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def _database_error(error: DBAPIError):
        report_database_error(error, place=request.path)
        return problem(ErrorType.DATABASE_ERROR, "The database is unavailable; retry later.")

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        report(CallflowError(ErrorType.INTERNAL_ERROR, f"Unexpected {type(error).__name__}"), cause=error)
        return problem(ErrorType.INTERNAL_ERROR, "An unexpected error occurred; it has been reported.")

    return app


def problem(error_type: ErrorType, detail: str, status: int | None = None, **extras: Any) -> Response:
    spec = ERROR_TABLE[error_type]
    status = status or spec.http_status or 500
    body = {
        "type": f"urn:callflow:problem:{error_type}",
        "title": spec.title,
        "status": status,
        "detail": detail,
        "error_type": str(error_type),
        "request_id": g.get("request_id"),
        **extras,
    }
    response = jsonify(body)
    response.status_code = status
    response.content_type = PROBLEM_JSON
    return response


def json_body() -> Any:
    """The request's JSON body, as PostgreSQL can store it; anything else is a validation error."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return None
    try:
        body = request.get_json(force=True)
    except (HTTPException, RecursionError) as exc:
        raise CallflowError(ErrorType.VALIDATION_ERROR, "The body is not valid JSON.") from exc
    if _depth(body) > MAX_JSON_DEPTH:
        raise CallflowError(ErrorType.VALIDATION_ERROR, f"The body is nested deeper than {MAX_JSON_DEPTH} levels.")
    return _storable(body)


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:
            children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _storable(value: Any) -> Any:
    """The body as PostgreSQL's jsonb can hold it. U+0000 is dropped rather than the request refused (it is
    harmless noise); NaN, Infinity and lone surrogates, which JSON parsers accept and jsonb refuses, are refused."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CallflowError(ErrorType.VALIDATION_ERROR, "The body holds text that is not valid Unicode.") from exc
        return value.replace("\x00", "")
    if isinstance(value, float) and not math.isfinite(value):
        raise CallflowError(ErrorType.VALIDATION_ERROR, "The body holds NaN or Infinity, which JSON does not allow.")
    if isinstance(value, list):
        return [_storable(item) for item in value]
    if isinstance(value, dict):
        return {_storable(key): _storable(item) for key, item in value.items()}
    return value


def validation_error(exc: ValidationError) -> CallflowError:
    errors = [
        {"field": ".".join(str(part) for part in err["loc"]) or "body", "message": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    error = CallflowError(ErrorType.VALIDATION_ERROR, f"Invalid request body: {summary}")
    error.problem_extras = {"errors": errors}
    return error
