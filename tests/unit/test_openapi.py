"""`/openapi.json` describes the call-initiator as the code is: every route with its methods and no other, a valid
OpenAPI 3.1 document, the request schemas of the pydantic models that validate the bodies, and response models the
views' answers fit."""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime

import jsonschema
import jsonschema_rs
import pytest
import schemathesis
from flask import Flask

from services.call_initiator import response_models
from services.call_initiator.app import create_app
from services.call_initiator.openapi import (
    OPENAPI_PATH,
    REQUEST_MODELS,
    SCHEMA_REF,
    CampaignJsonBody,
    openapi_document,
)
from services.call_initiator.views import call_view
from shared.campaigns import states, views
from shared.campaigns.spec import CampaignSettings
from shared.core.models import Call, Campaign
from tests.support.components import components


@pytest.fixture(scope="module")
def app() -> Flask:
    return create_app(components())


@pytest.fixture(scope="module")
def document(app: Flask) -> dict:
    answer = app.test_client().get(OPENAPI_PATH)  # no API token
    assert answer.status_code == 200
    return answer.get_json()


def test_every_route_is_described_with_its_methods_and_nothing_else(app, document):
    routed = {
        (rule.rule.replace("<", "{").replace(">", "}"), method.lower())
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    described = {(path, method) for path, operations in document["paths"].items() for method in operations}
    assert described == routed
    assert {path for path, _ in routed} >= {"/api/calls", "/health", "/health/live", "/health/ready", OPENAPI_PATH}


def test_a_route_without_a_description_stops_the_document_naming_it():
    grown = create_app(components())
    grown.add_url_rule("/api/undescribed", view_func=lambda: "")
    with pytest.raises(ValueError, match=r"not described \[\('GET', '/api/undescribed'\)\]"):
        openapi_document(grown)


def test_a_description_without_a_route_stops_the_document_naming_it():
    with pytest.raises(ValueError, match=r"described but not routed \[.*'/api/calls'"):
        openapi_document(Flask("bare"))


def test_the_document_is_valid_openapi_3_1_with_valid_json_schemas(document):
    assert document["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(document).validate()
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_the_validation_catches_a_broken_document(document):
    broken = copy.deepcopy(document)
    broken["paths"]["/api/calls"]["post"]["responses"] = "none"
    with pytest.raises(jsonschema_rs.ValidationError):
        schemathesis.openapi.from_dict(broken).validate()


@pytest.mark.parametrize("model", REQUEST_MODELS, ids=lambda model: model.__name__)
def test_each_request_schema_is_its_pydantic_models_current_schema(document, model):
    schemas = document["components"]["schemas"]
    current = model.model_json_schema(ref_template=SCHEMA_REF)
    for name, nested in current.pop("$defs", {}).items():
        assert schemas[name] == nested, name
    assert schemas[model.__name__] == current


def test_the_request_bodies_are_the_models_the_routes_validate_with(document):
    def body_schema(path: str, media_type: str) -> dict:
        return document["paths"][path]["post"]["requestBody"]["content"][media_type]["schema"]

    assert body_schema("/api/calls", "application/json") == {"$ref": SCHEMA_REF.format(model="PlaceCallRequest")}
    assert body_schema("/api/campaigns", "application/json") == {"$ref": SCHEMA_REF.format(model="CampaignJsonBody")}
    assert body_schema("/api/campaigns", "text/csv") == {"type": "string"}
    settings = CampaignSettings.model_json_schema()["properties"]
    assert CampaignJsonBody.model_json_schema()["properties"].keys() == {*settings, "contacts"}


def test_the_api_is_described_with_its_token_idempotency_key_problems_and_cursor(document):
    place = document["paths"]["/api/calls"]["post"]
    assert place["security"] == [{"bearerToken": []}]
    assert document["components"]["securitySchemes"]["bearerToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API token.",
    }
    assert "Idempotency-Key" in {parameter["name"] for parameter in place["parameters"]}
    assert place["responses"]["401"]["content"]["application/problem+json"]["schema"]["properties"]["error_type"] == {
        "enum": ["unauthorized"]
    }
    assert set(place["responses"]) >= {"201", "202", "400", "401", "402", "403", "404", "409", "413", "422", "502"}
    page = document["paths"]["/api/campaigns/{campaign_id}/calls"]["get"]
    assert {"cursor", "limit", "status"} <= {parameter["name"] for parameter in page["parameters"]}
    assert document["paths"]["/health"]["get"]["security"] == []


def test_the_views_answers_fit_the_response_models():
    now = datetime.now(UTC)
    call = Call(
        id=uuid.uuid4(),
        status="completed",
        execution_id="exec-1",
        agent_id=uuid.uuid4(),
        campaign_id=None,
        phone_number="+14155550123",
        duration_seconds=61,
        credits_charged=2,
        trace_headers={},
        created_at=now,
        updated_at=now,
    )
    response_models.CallView.model_validate(call_view(call))
    campaign = Campaign(
        id=uuid.uuid4(),
        name="Renewals",
        agent_id=uuid.uuid4(),
        status=states.DRAFT,
        contacts_total=3,
        created_at=now,
    )
    response_models.CampaignSummary.model_validate(views.summary_view(campaign))
    with pytest.raises(ValueError, match="extra"):
        response_models.CallView.model_validate({**call_view(call), "undescribed": 1})
