"""The public REST API: `/api/...`."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, g, jsonify, request
from pydantic import ValidationError

from shared import calls, idempotency
from shared.auth import authenticate
from shared.payloads import PlaceCallRequest
from shared.web import PROBLEM_JSON, create_service_app, json_body, validation_error

SERVICE = "call-initiator"
api = Blueprint("api", __name__, url_prefix="/api")


@api.post("/calls")
def place_call():
    user = authenticate(request.headers.get("Authorization"))
    raw = json_body()
    try:
        body = PlaceCallRequest.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc) from exc
    claim = None
    if (key := request.headers.get(idempotency.HEADER)) is not None:
        claim = idempotency.claim_for(user.id, key, raw)
        if (replay := idempotency.replay_of(claim)) is not None:
            response = jsonify(replay.body)
            response.status_code = replay.status
            if replay.status >= 400:
                response.content_type = PROBLEM_JSON
            response.headers["Idempotent-Replayed"] = "true"
            return response
        g.idempotency_claim = claim
    accepted = calls.place_call(user, body, claim)
    answer = {"callId": str(accepted.call.id), "status": accepted.call.status}
    if accepted.placed:
        return jsonify({**answer, "executionId": accepted.call.execution_id}), 201
    return jsonify(answer), 202


@api.after_request
def remember_the_answer(response: Response) -> Response:
    """Stores the answer of a request that made a call under an Idempotency-Key, errors included."""
    claim = g.pop("idempotency_claim", None)
    body = response.get_json(silent=True) if response.is_json else None
    if claim is not None and response.status_code != 409 and isinstance(body, dict) and "callId" in body:
        idempotency.record(claim, response.status_code, body)
    return response


@api.get("/calls/<call_id>")
def get_call(call_id: str):
    user = authenticate(request.headers.get("Authorization"))
    return jsonify(calls.call_view(calls.get_call(user, call_id)))


def create_app() -> Flask:
    app = create_service_app(SERVICE)
    app.register_blueprint(api)
    return app
