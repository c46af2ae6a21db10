"""The public REST API: `/api/...`. Routes only: each reads the request, calls the code that does the work, and
shapes the answer."""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, Flask, Response, g, jsonify, request
from pydantic import ValidationError

from services.call_initiator import idempotency
from services.call_initiator.auth import authenticate
from services.call_initiator.campaign_routes import add_campaign_routes
from services.call_initiator.openapi import add_openapi_route
from services.call_initiator.placing import place_call
from services.call_initiator.request_models import PlaceCallRequest
from services.call_initiator.views import call_view, get_call
from shared.bootstrap import Components
from shared.http.app import create_http_app
from shared.http.bodies import json_body, validation_error

SERVICE = "call-initiator"


def create_app(components: Components) -> Flask:
    app = create_http_app(SERVICE, components.health(SERVICE))
    app.register_blueprint(_api(components))
    add_openapi_route(app)
    return app


def _api(components: Components) -> Blueprint:
    api = Blueprint("api", __name__, url_prefix="/api")
    uow = components.uow
    key_retention = timedelta(hours=components.settings.idempotency_key_retention_hours)

    @api.post("/calls")
    def place():
        user = authenticate(uow, request.headers.get("Authorization"))
        raw = json_body()
        try:
            body = PlaceCallRequest.model_validate(raw)
        except ValidationError as exc:
            raise validation_error(exc) from exc
        begun = idempotency.begin(uow, user.id, raw, key_retention)
        if begun.replay is not None:
            return begun.replay
        accepted = place_call(components.placer, user, body, begun.claim)
        answer = {"callId": str(accepted.call.id), "status": accepted.call.status}
        if accepted.placed:
            return jsonify({**answer, "executionId": accepted.call.execution_id}), 201
        return jsonify(answer), 202

    @api.after_request
    def remember_the_answer(response: Response) -> Response:
        """Stores the answer of a request that made a call under an Idempotency-Key, errors included."""
        claim = g.pop("idempotency_claim", None)
        if claim is not None:
            idempotency.record(uow, claim, response)
        return response

    @api.get("/calls/<call_id>")
    def read(call_id: str):
        user = authenticate(uow, request.headers.get("Authorization"))
        return jsonify(call_view(get_call(uow, user, call_id)))

    add_campaign_routes(api, components)
    return api
