"""The public REST API: `/api/...`."""

from __future__ import annotations

from flask import Blueprint, Flask, jsonify, request
from pydantic import ValidationError

from shared import calls
from shared.auth import authenticate
from shared.payloads import PlaceCallRequest
from shared.web import create_service_app, json_body, validation_error

SERVICE = "call-initiator"
api = Blueprint("api", __name__, url_prefix="/api")


@api.post("/calls")
def place_call():
    user = authenticate(request.headers.get("Authorization"))
    try:
        body = PlaceCallRequest.model_validate(json_body())
    except ValidationError as exc:
        raise validation_error(exc) from exc
    accepted = calls.place_call(user, body)
    answer = {"callId": str(accepted.call.id), "status": accepted.call.status}
    if accepted.placed:
        return jsonify({**answer, "executionId": accepted.call.execution_id}), 201
    return jsonify(answer), 202


@api.get("/calls/<call_id>")
def get_call(call_id: str):
    user = authenticate(request.headers.get("Authorization"))
    return jsonify(calls.call_view(calls.get_call(user, call_id)))


def create_app() -> Flask:
    app = create_service_app(SERVICE)
    app.register_blueprint(api)
    return app
