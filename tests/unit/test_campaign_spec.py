"""What a campaign is created from, checked without a database: contacts from JSON and CSV, and the settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from shared.campaigns import spec


def _settings(**overrides: object) -> spec.CampaignSettings:
    body = {"name": "Renewals", "agentId": "6f1c7f3e-0c1b-4a8e-9d7e-3c2b1a0f9e8d", **overrides}
    return spec.CampaignSettings.model_validate(body)


def test_numbers_are_normalised_duplicates_counted_and_invalid_ones_reported_with_their_row():
    listed = spec.contacts_from_json(
        [
            {"phoneNumber": "+1 (415) 555-0101", "name": "Ada"},
            {"phoneNumber": "+14155550101"},
            {"phoneNumber": "4155550102"},
            {"phoneNumber": 14155550103},
            "not a contact",
            {"phoneNumber": "+14155550104", "variables": {"plan": "gold"}},
        ]
    )
    assert [(c.row, c.phone_number, c.name) for c in listed.contacts] == [
        (1, "+14155550101", "Ada"),
        (6, "+14155550104", None),
    ]
    assert listed.contacts[1].variables == {"plan": "gold"}
    assert listed.duplicates == 1
    assert [(r["row"], r["phoneNumber"]) for r in listed.rejected] == [(3, "4155550102"), (4, None), (5, None)]
    assert listed.rejected_count == 3 and all(r["reason"] for r in listed.rejected)


def test_a_csv_gives_its_other_columns_as_variables_and_rejects_a_row_with_more_values_than_columns():
    text = "\ufeffphone_number,name,appointment\n+14155550101,Ada,9:00\n+14155550102,Bob,10:00,extra\n"
    listed = spec.contacts_from_csv(text)
    assert [(c.phone_number, c.name, c.variables) for c in listed.contacts] == [
        ("+14155550101", "Ada", {"appointment": "9:00"})
    ]
    assert listed.rejected == [{"row": 2, "phoneNumber": "+14155550102", "reason": "more values than columns"}]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("number,name\n+14155550101,Ada\n", "must name a 'phone_number' column"),
        ("phone_number,phone_number\n+14155550101,+14155550102\n", "names phone_number more than once"),
    ],
)
def test_a_csv_without_one_phone_number_column_is_refused(text, reason):
    with pytest.raises(ValueError, match=reason):
        spec.contacts_from_csv(text)


def test_more_contacts_than_a_campaign_holds_are_refused_before_they_are_checked():
    with pytest.raises(ValueError, match="at most"):
        spec.contacts_from_json([{}] * (spec.MAX_CONTACTS + 1))
    rows = "\n".join(["phone_number", *["x"] * (spec.MAX_CONTACTS + 1)])
    with pytest.raises(ValueError, match="at most"):
        spec.contacts_from_csv(rows)


def test_only_the_first_rejections_are_listed_but_all_are_counted():
    listed = spec.contacts_from_json([{"phoneNumber": "x"}] * (spec.MAX_REJECTED_LISTED + 5))
    assert len(listed.rejected) == spec.MAX_REJECTED_LISTED
    assert listed.rejected_count == spec.MAX_REJECTED_LISTED + 5


def test_settings_defaults_and_bounds():
    settings = _settings()
    assert (settings.retry.max_attempts, settings.retry.on_statuses) == (1, ["no-answer", "busy"])
    for bad in (
        {"retry": {"maxAttempts": 5}},
        {"retry": {"onStatuses": ["completed"]}},
        {"maxConcurrency": 0},
        {"callingWindow": {"startHour": 18, "endHour": 9}},
        {"callingWindow": {"startHour": 9, "endHour": 18, "days": [0]}},
        {"name": "bad\x00name"},
        {"startAt": (datetime.now(UTC) + timedelta(days=400)).isoformat()},
        {"startAt": (datetime.now(UTC) - timedelta(days=400)).isoformat()},
        {"startAt": "0001-01-01T00:00:00+14:00"},  # before year 1 in UTC: stored, then never read back
        {"startAt": "2027-01-01T09:00:00"},  # no offset: whose 9:00?
        {"unknown": 1},
    ):
        with pytest.raises(ValidationError):
            _settings(**bad)


def test_a_csv_uploads_query_parameters_become_the_same_settings():
    query = {
        "name": "Renewals",
        "agentId": "6f1c7f3e-0c1b-4a8e-9d7e-3c2b1a0f9e8d",
        "maxConcurrency": "3",
        "retryMaxAttempts": "2",
        "retryOnStatuses": "no-answer, busy",
        "retryIntervalMinutes": "5,30",
        "window": "9-18",
        "windowDays": "1,2,3,4,5",
    }
    settings = spec.CampaignSettings.model_validate(spec.settings_from_query(query))
    assert settings.max_concurrency == 3
    assert (settings.retry.max_attempts, settings.retry.interval_minutes) == (2, [5.0, 30.0])
    window = settings.calling_window
    assert window is not None and (window.start_hour, window.end_hour, window.days) == (9, 18, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="unknown query parameters: color"):
        spec.settings_from_query({**query, "color": "red"})
    with pytest.raises(ValueError, match="windowDays needs window"):
        spec.settings_from_query({"windowDays": "1"})
