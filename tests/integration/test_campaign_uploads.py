"""A CSV upload through the API, in process: read in the charset its Content-Type names, and what PostgreSQL cannot
store dropped rather than answered with a 500."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from services.call_initiator.app import create_app as create_api
from shared.core.models import CampaignContact
from tests.support.components import components
from tests.support.factories import Customer, customer

CSV = "phone_number,name,note\n+14155550101,José,a\x00b\n"


def _upload(owner: Customer, body: bytes, content_type: str):
    query = {"name": "Renewals", "agentId": str(owner.agent_id)}
    client = create_api(components()).test_client()
    return client.post(
        "/api/campaigns", headers={**owner.auth, "Content-Type": content_type}, query_string=query, data=body
    )


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (CSV.encode("cp1252"), "text/csv; charset=windows-1252"),  # a spreadsheet's export
        (CSV.encode("utf-8-sig"), "text/csv"),
        (CSV.encode("utf-16"), "text/csv; charset=utf-16"),
    ],
    ids=["windows-1252", "utf-8 with a byte-order mark", "utf-16"],
)
def test_a_csv_is_read_in_its_charset_and_a_nul_in_it_is_dropped(body, content_type):
    owner = customer()
    answer = _upload(owner, body, content_type)
    assert answer.status_code == 201, answer.json
    with components().uow() as uow:
        (contact,) = uow.session.scalars(
            select(CampaignContact).where(CampaignContact.campaign_id == uuid.UUID(answer.json["campaignId"]))
        )
    assert (contact.phone_number, contact.name, contact.variables) == ("+14155550101", "José", {"note": "ab"})


@pytest.mark.parametrize(
    ("body", "content_type", "detail"),
    [
        (CSV.encode("cp1252"), "text/csv", "cannot be read as 'utf-8': byte 39 is not valid"),
        (CSV.encode("utf-8"), "text/csv; charset=no-such-charset", "charset 'no-such-charset' is unknown"),
        (CSV.encode("utf-8"), "text/csv; charset=rot13", "charset 'rot13' is unknown"),  # not a text encoding
        (CSV.encode("utf-8"), "text/csv; charset*=UTF-8''utf%008", "charset 'utf\\x008' is unknown"),
        (b"phone_number,note\n+14155550101,\\ud800\n", "text/csv; charset=unicode_escape", "not valid Unicode"),
    ],
    ids=[
        "not the charset it names",
        "an unknown charset",
        "a codec that reads no bytes",
        "a charset named with U+0000 (RFC 2231)",
        "a codec that makes lone surrogates",
    ],
)
def test_a_csv_that_cannot_be_read_in_its_charset_is_refused_never_read_with_letters_replaced(
    body, content_type, detail
):
    answer = _upload(customer(), body, content_type)
    assert (answer.status_code, answer.mimetype) == (400, "application/problem+json")
    assert answer.json["error_type"] == "validation_error"
    assert detail in answer.json["detail"]


@pytest.mark.parametrize(
    "settings",
    [
        {"maxConcurrency": True},
        {"maxConcurrency": "3"},
        {"retry": {"maxAttempts": "4"}},
        {"retry": {"intervalMinutes": [True]}},
        {"callingWindow": {"startHour": False, "endHour": 18}},
        {"callingWindow": {"startHour": 9, "endHour": 18, "days": [True]}},
    ],
    ids=["true for a number", "a string for a number", "nested", "true in a list", "false for 0", "true for 1"],
)
def test_json_campaign_settings_are_taken_as_their_json_types_never_converted(settings):
    owner = customer()
    body = {"name": "Renewals", "agentId": str(owner.agent_id), "contacts": [{"phoneNumber": "+14155550101"}]}
    answer = (
        create_api(components()).test_client().post("/api/campaigns", headers=owner.auth, json={**body, **settings})
    )
    assert (answer.status_code, answer.json["error_type"]) == (400, "validation_error"), answer.json


def test_json_campaign_settings_of_the_right_types_are_taken():
    owner = customer()
    body = {
        "name": "Renewals",
        "agentId": str(owner.agent_id),
        "contacts": [{"phoneNumber": "+14155550101"}],
        "maxConcurrency": 3,
        "startAt": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
        "retry": {"maxAttempts": 2, "onStatuses": ["busy"], "intervalMinutes": [5, 7.5]},
        "callingWindow": {"startHour": 9, "endHour": 18, "days": [1, 2]},
    }
    answer = create_api(components()).test_client().post("/api/campaigns", headers=owner.auth, json=body)
    assert answer.status_code == 201, answer.json
