"""Schemathesis against the live call-initiator: whatever it sends, no answer is a 5xx, and every answer's status,
content type, headers and body are ones `/openapi.json` describes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from shared.calls import statuses
from shared.core.models import Call
from tests.support.components import components
from tests.support.factories import Customer, customer
from tests.support.stack import Stack, wait_until

pytestmark = pytest.mark.e2e

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)
MAX_EXAMPLES = 25
SEED = 20250101
PHONE = "+14155550123"


@pytest.mark.timeout(300)  # the stack's start, then a bounded run (25 examples an operation)
def test_every_answer_of_the_live_api_is_one_its_description_allows(stack: Stack, tmp_path: Path):
    # Enough credits for every call the examples place; two slots, so some calls are queued (202).
    owner = customer(credits=500, max_concurrent_calls=2)
    call = stack.api(
        "POST", "/api/calls", headers=owner.auth, json={"agentId": str(owner.agent_id), "phoneNumber": PHONE}
    )
    assert call.status_code == 201, call.text
    campaign = stack.api("POST", "/api/campaigns", headers=owner.auth, json=_campaign_body(owner))
    assert campaign.status_code == 201, campaign.text
    described = stack.api("GET", "/openapi.json")
    assert described.status_code == 200

    schema = tmp_path / "openapi.json"
    schema.write_text(
        json.dumps(_with_examples(described.json(), owner, call.json()["callId"], campaign.json()["campaignId"]))
    )
    run = subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            str(schema),
            "--url",
            stack.call_initiator.url,
            "--header",
            f"Authorization: Bearer {owner.token}",
            "--checks",
            ",".join(CHECKS),
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            str(SEED),
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--output-truncate",
            "false",
        ],
        cwd=tmp_path,  # its example database (.hypothesis) stays out of the repository
        capture_output=True,
        text=True,
        timeout=240,
    )
    try:
        assert run.returncode == 0, run.stdout + run.stderr
        # The examples reached the customer's own agent: calls were placed, not only refused.
        placed = [e for e in stack.sim_executions() if e["agent_id"] == owner.provider_agent_id]
        assert len(placed) > 1
    finally:
        _stop_calling(stack, owner)


def _stop_calling(stack: Stack, owner: Customer) -> None:
    """The stack is the package's: the campaigns the examples created and started must not go on calling (through
    the faults later tests inject) once this test is over."""
    listed = stack.api("GET", "/api/campaigns", headers=owner.auth).json()
    for campaign in listed.get("campaigns", []):
        stack.api("POST", f"/api/campaigns/{campaign['campaignId']}/cancel", headers=owner.auth)
    wait_until(lambda: not _live_calls(owner), 60, "the customer's calls end")


def _live_calls(owner: Customer) -> int:
    with components().uow() as uow:
        query = select(func.count()).where(Call.user_id == owner.user_id, Call.status.not_in(statuses.TERMINAL))
        return uow.session.scalar(query) or 0


def _campaign_body(owner: Customer) -> dict[str, Any]:
    return {"name": "Schema check", "agentId": str(owner.agent_id), "contacts": [{"phoneNumber": PHONE}]}


def _with_examples(document: dict[str, Any], owner: Customer, call_id: str, campaign_id: str) -> dict[str, Any]:
    """The document with examples naming the customer's own agent, call and campaign, so the answers of calls placed,
    campaigns created and moved, and of reads that find something are checked too, not only 404s."""
    schemas = document["components"]["schemas"]
    schemas["PlaceCallRequest"]["examples"] = [{"agentId": str(owner.agent_id), "phoneNumber": PHONE}]
    schemas["CampaignJsonBody"]["examples"] = [_campaign_body(owner)]
    found = {"call_id": call_id, "campaign_id": campaign_id}
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] in found:
                    parameter["example"] = found[parameter["name"]]
    return document
