"""The call-initiator's OpenAPI 3.1 description, served at `GET /openapi.json`.

Generated from the code: the paths and methods from the app's routes (a route without a description here, or a
description without a route, stops the app from being built), the request schemas from the pydantic models that
validate the bodies, the response schemas from `response_models`, and the error answers from the error table.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from flask import Flask, jsonify
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from services.call_initiator import response_models as answers
from services.call_initiator.campaign_routes import CSV_TYPES
from services.call_initiator.idempotency import HEADER, VALID_KEY
from services.call_initiator.request_models import PlaceCallRequest
from shared.calls import statuses
from shared.campaigns import states, views
from shared.campaigns.spec import MAX_CONTACTS, CallingWindowSettings, CampaignSettings, ContactIn, RetryPolicy
from shared.core.errors import ERROR_TABLE, ErrorType
from shared.http.app import PROBLEM_JSON
from shared.observability.sentry import HEALTH_PATH

OPENAPI_PATH = "/openapi.json"
SCHEMA_REF = "#/components/schemas/{model}"
_AUTOMATIC_METHODS = frozenset({"HEAD", "OPTIONS"})  # Flask answers these for every route
_UNDESCRIBED_ENDPOINTS = frozenset({"static"})  # Flask's static-file route: the service has no static files
_FLASK_PARAMETER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


class CampaignJsonBody(CampaignSettings):
    """`POST /api/campaigns` as JSON: the settings and the contacts. A contact that is not valid is rejected (and
    listed in the answer), not fatal."""

    contacts: list[ContactIn] = Field(max_length=MAX_CONTACTS)


REQUEST_MODELS: tuple[type[BaseModel], ...] = (PlaceCallRequest, CampaignJsonBody)
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    answers.CallPlaced,
    answers.CallQueued,
    answers.CallView,
    answers.CampaignCreated,
    answers.CampaignSummary,
    answers.CampaignDetail,
    answers.CampaignList,
    answers.CampaignCallsPage,
    answers.Problem,
    answers.Health,
    answers.Ready,
    answers.Live,
)


@dataclass(frozen=True)
class Operation:
    summary: str
    answers: dict[int, dict[str, Any]]  # the successful answers, by status
    errors: tuple[ErrorType, ...] = ()  # answered as problems, with the status of their row in the error table
    parameters: tuple[dict[str, Any], ...] = ()
    body: dict[str, Any] | None = None
    public: bool = False  # no API token needed
    description: str = ""
    tags: tuple[str, ...] = ()


def add_openapi_route(app: Flask) -> None:
    """Registers `GET /openapi.json` (no API token needed); call it once every other route is registered."""

    def openapi():
        return jsonify(document)

    app.add_url_rule(OPENAPI_PATH, view_func=openapi)
    document = openapi_document(app)  # after registering: the document describes its own route too


def openapi_document(app: Flask) -> dict[str, Any]:
    """The app's description; a route this module does not describe, or a description without a route, is an
    error naming them."""
    routes = app_routes(app)
    undescribed, unrouted = sorted(routes - OPERATIONS.keys()), sorted(OPERATIONS.keys() - routes)
    if undescribed or unrouted:
        raise ValueError(
            f"OpenAPI description out of date: routes not described {undescribed}, described but not routed {unrouted}"
        )
    paths: dict[str, dict[str, Any]] = defaultdict(dict)
    for method, rule in sorted(routes, key=lambda route: (route[1], route[0])):
        paths[openapi_path(rule)][method.lower()] = _operation(OPERATIONS[method, rule])
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Callflow call-initiator",
            "version": "1.0.0",
            "description": (
                "Places calls and runs campaigns. Every error is an RFC 9457 `application/problem+json` answer; "
                "every answer carries `X-Request-ID` (the request's own, when it sends a valid one)."
            ),
        },
        "paths": dict(paths),
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {"bearerToken": {"type": "http", "scheme": "bearer", "description": "An API token."}},
            "headers": {
                "X-Request-ID": {"description": "The request's id, as in its logs and problems.", "schema": _STRING},
                "Idempotent-Replayed": {
                    "description": f"`true` when the answer is the first answer to this {HEADER}, replayed.",
                    "schema": {"type": "string", "enum": ["true"]},
                },
            },
        },
    }


def app_routes(app: Flask) -> set[tuple[str, str]]:
    """(method, Flask rule) of every route the app declares."""
    return {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.endpoint not in _UNDESCRIBED_ENDPOINTS
        for method in (rule.methods or set()) - _AUTOMATIC_METHODS
    }


def openapi_path(rule: str) -> str:
    """`/api/calls/<call_id>` as OpenAPI writes it: `/api/calls/{call_id}`."""
    return _FLASK_PARAMETER.sub(r"{\1}", rule)


def component_schemas() -> dict[str, Any]:
    """The JSON schema of every request and response model, and of the models they hold, by model name."""
    _, top = models_json_schema(
        [(model, "validation") for model in REQUEST_MODELS] + [(model, "serialization") for model in RESPONSE_MODELS],
        ref_template=SCHEMA_REF,
    )
    return top["$defs"]


def _operation(operation: Operation) -> dict[str, Any]:
    described: dict[str, Any] = {"summary": operation.summary, "tags": list(operation.tags)}
    if operation.description:
        described["description"] = operation.description
    described["security"] = [] if operation.public else [{"bearerToken": []}]
    if operation.parameters:
        described["parameters"] = list(operation.parameters)
    if operation.body is not None:
        described["requestBody"] = operation.body
    responses = {str(status): {**answer, "headers": _REQUEST_ID} for status, answer in operation.answers.items()}
    for status, problem in _problems(operation.errors).items():
        if status in responses:
            raise ValueError(f"{operation.summary}: status {status} is both an answer and a problem")
        responses[status] = problem
    described["responses"] = dict(sorted(responses.items()))
    return described


def _problems(errors: tuple[ErrorType, ...]) -> dict[str, dict[str, Any]]:
    """One problem answer per status, naming the error types it may carry."""
    by_status: dict[int, list[ErrorType]] = defaultdict(list)
    for error_type in errors:
        status = ERROR_TABLE[error_type].http_status
        if status is None:
            raise ValueError(f"{error_type} has no HTTP status in the error table")
        by_status[status].append(error_type)
    return {
        str(status): {
            "description": "; ".join(f"`{error_type}`: {ERROR_TABLE[error_type].title}" for error_type in types),
            "headers": _REQUEST_ID,
            "content": {
                PROBLEM_JSON: {
                    "schema": {
                        "$ref": _ref(answers.Problem),
                        "properties": {
                            "status": {"const": status},
                            "error_type": {"enum": [str(error_type) for error_type in types]},
                        },
                    }
                }
            },
        }
        for status, types in by_status.items()
    }


def _ref(model: type[BaseModel]) -> str:
    return SCHEMA_REF.format(model=model.__name__)


def _json(model: type[BaseModel], description: str, idempotent: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _ref(model)}}},
    }
    if idempotent:
        answer["headers"] = {"Idempotent-Replayed": {"$ref": "#/components/headers/Idempotent-Replayed"}}
    return answer


def _query(name: str, schema: dict[str, Any], description: str, **style: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description, **style}


def _path(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or _UUID, "description": description}


def _property(model: type[BaseModel], name: str) -> dict[str, Any]:
    """The JSON schema of one of a settings model's members, by its JSON name."""
    return model.model_json_schema(ref_template=SCHEMA_REF)["properties"][name]


def _csv_settings() -> tuple[dict[str, Any], ...]:
    """A CSV upload's settings, as query parameters (see `spec.settings_from_query`); lists are comma-separated."""
    only_csv = "CSV uploads only"
    comma_separated = {"style": "form", "explode": False}
    plain = [
        _query(name, _property(CampaignSettings, name), f"{only_csv}; required for them.")
        for name in ("name", "agentId")
    ] + [_query(name, _property(CampaignSettings, name), only_csv) for name in ("maxConcurrency", "startAt")]
    return (
        *plain,
        _query("retryMaxAttempts", _property(RetryPolicy, "maxAttempts"), f"{only_csv}: retry.maxAttempts."),
        _query(
            "retryOnStatuses", _property(RetryPolicy, "onStatuses"), f"{only_csv}: retry.onStatuses.", **comma_separated
        ),
        _query(
            "retryIntervalMinutes",
            _property(RetryPolicy, "intervalMinutes"),
            f"{only_csv}: retry.intervalMinutes.",
            **comma_separated,
        ),
        _query(
            "window",
            {"type": "string", "pattern": r"^\d{1,2}-\d{1,2}$", "examples": ["9-18"]},
            f"{only_csv}: the calling window's startHour-endHour.",
        ),
        _query(
            "windowDays",
            _property(CallingWindowSettings, "days"),
            f"{only_csv}: the calling window's ISO weekdays (1 = Monday); needs `window`.",
            **comma_separated,
        ),
    )


_STRING = {"type": "string"}
_UUID = {"type": "string", "format": "uuid"}
_REQUEST_ID = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
_SERVER = (ErrorType.INTERNAL_ERROR, ErrorType.DATABASE_ERROR)
_CUSTOMER = (ErrorType.UNAUTHORIZED, *_SERVER)
_AGENT = (ErrorType.AGENT_NOT_FOUND, ErrorType.UNAUTHORIZED_AGENT_ACCESS, ErrorType.AGENT_NOT_CONFIGURED)
_IDEMPOTENCY = (ErrorType.IDEMPOTENCY_KEY_REUSED, ErrorType.IDEMPOTENCY_KEY_IN_PROGRESS)
_BODY = (ErrorType.VALIDATION_ERROR, ErrorType.PAYLOAD_TOO_LARGE)
# A path parameter holding `/` reaches no route, or (under a campaign) a route without this method.
_CAMPAIGN = (ErrorType.CAMPAIGN_NOT_FOUND, ErrorType.NOT_FOUND, ErrorType.METHOD_NOT_ALLOWED, *_CUSTOMER)

_IDEMPOTENCY_KEY = {
    "name": HEADER,
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": VALID_KEY.pattern},
    "description": (
        "The same key and body replay the first answer (for IDEMPOTENCY_KEY_RETENTION_HOURS, 24 by default); "
        "the same key with another body is 422, while the first request runs 409."
    ),
}
_CAMPAIGN_ID = _path("campaign_id", "The campaign's id.")
_LIMIT = _query(
    "limit", {"type": "integer", "minimum": 1, "maximum": views.MAX_PAGE, "default": views.MAX_PAGE}, "Page size."
)
_HEALTH = {
    200: _json(answers.Health, "PostgreSQL and RabbitMQ answer."),
    503: _json(answers.Health, "A dependency is down; `checks` names it."),
}

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/api/calls"): Operation(
        "Place a call",
        {
            201: _json(answers.CallPlaced, "A slot was free and Bolna accepted the call.", idempotent=True),
            202: _json(
                answers.CallQueued,
                "The call waits in Callflow's queue: the customer is at their limit, or Bolna is held back.",
                idempotent=True,
            ),
        },
        (
            *_BODY,
            *_AGENT,
            ErrorType.INSUFFICIENT_CREDITS,
            *_IDEMPOTENCY,
            ErrorType.BOLNA_API_FAILURE,
            ErrorType.CALL_INITIATION_FAILED,
            *_CUSTOMER,
        ),
        parameters=(_IDEMPOTENCY_KEY,),
        body={"required": True, "content": {"application/json": {"schema": {"$ref": _ref(PlaceCallRequest)}}}},
        tags=("calls",),
    ),
    ("GET", "/api/calls/<call_id>"): Operation(
        "Read a call",
        {200: _json(answers.CallView, "The call (another customer's call is 404).")},
        (ErrorType.CALL_NOT_FOUND, ErrorType.NOT_FOUND, *_CUSTOMER),
        parameters=(_path("call_id", "The call's id."),),
        tags=("calls",),
    ),
    ("POST", "/api/campaigns"): Operation(
        "Create a draft campaign",
        {201: _json(answers.CampaignCreated, "The draft campaign and what became of its contacts.", idempotent=True)},
        (*_BODY, *_AGENT, *_IDEMPOTENCY, *_CUSTOMER),
        description=(
            "JSON, or a CSV upload (a header naming `phone_number`, optionally `name`; every other column is a "
            "contact variable) with the settings as query parameters. 400 when no contact is valid."
        ),
        parameters=(_IDEMPOTENCY_KEY, *_csv_settings()),
        body={
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": _ref(CampaignJsonBody)}},
                **{csv_type: {"schema": _STRING} for csv_type in CSV_TYPES},
            },
        },
        tags=("campaigns",),
    ),
    ("GET", "/api/campaigns"): Operation(
        "List the customer's campaigns, newest first",
        {200: _json(answers.CampaignList, "The campaigns.")},
        (ErrorType.VALIDATION_ERROR, *_CUSTOMER),
        parameters=(_LIMIT,),
        tags=("campaigns",),
    ),
    ("GET", "/api/campaigns/<campaign_id>"): Operation(
        "Read a campaign's settings and progress",
        {200: _json(answers.CampaignDetail, "The campaign, its counts read in one snapshot.")},
        _CAMPAIGN,
        parameters=(_CAMPAIGN_ID,),
        tags=("campaigns",),
    ),
    ("POST", "/api/campaigns/<campaign_id>/<action>"): Operation(
        "Start, pause, resume or cancel a campaign",
        {200: _json(answers.CampaignSummary, "The campaign after the move.")},
        (ErrorType.INVALID_CAMPAIGN_TRANSITION, *_CAMPAIGN),
        parameters=(
            _CAMPAIGN_ID,
            _path("action", "The move.", {"type": "string", "enum": [str(action) for action in states.Action]}),
        ),
        tags=("campaigns",),
    ),
    ("GET", "/api/campaigns/<campaign_id>/calls"): Operation(
        "A page of a campaign's calls, in the order they were made",
        {200: _json(answers.CampaignCallsPage, "The page, and the cursor of the next one.")},
        (ErrorType.VALIDATION_ERROR, *_CAMPAIGN),
        parameters=(
            _CAMPAIGN_ID,
            _query("status", {"type": "string", "enum": sorted(statuses.RANKED)}, "Only the calls in this status."),
            _query("cursor", _STRING, "The `nextCursor` of the previous page."),
            _LIMIT,
        ),
        tags=("campaigns",),
    ),
    ("GET", "/api/campaigns/<campaign_id>/results.csv"): Operation(
        "A campaign's results as CSV, one row per contact",
        {
            200: {
                "description": f"Streamed; the columns: {', '.join(views.RESULT_COLUMNS)}.",
                "content": {"text/csv": {"schema": _STRING}},
            }
        },
        _CAMPAIGN,
        parameters=(_CAMPAIGN_ID,),
        tags=("campaigns",),
    ),
    ("GET", HEALTH_PATH): Operation(
        "Health: the dependencies and Sentry's settings",
        _HEALTH,
        (ErrorType.INTERNAL_ERROR,),
        public=True,
        tags=("health",),
    ),
    ("GET", f"{HEALTH_PATH}/ready"): Operation(
        "Readiness: PostgreSQL and RabbitMQ answer",
        {
            200: _json(answers.Ready, "Ready."),
            503: _json(answers.Ready, "A dependency is down; `checks` names it."),
        },
        (ErrorType.INTERNAL_ERROR,),
        public=True,
        tags=("health",),
    ),
    ("GET", f"{HEALTH_PATH}/live"): Operation(
        "Liveness: the process answers",
        {200: _json(answers.Live, "Alive.")},
        (ErrorType.INTERNAL_ERROR,),
        public=True,
        tags=("health",),
    ),
    ("GET", OPENAPI_PATH): Operation(
        "This description",
        {
            200: {
                "description": "The OpenAPI 3.1 document.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
        (ErrorType.INTERNAL_ERROR,),
        public=True,
        tags=("meta",),
    ),
}
