"""`callctl campaigns`: an operator creates a campaign from a CSV file, lists, starts, pauses, resumes and cancels
it, and watches it; bad input is a usage error naming the problem, never a traceback."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from shared.calls import statuses
from shared.campaigns import states
from shared.cli import main
from shared.core.models import Campaign, CampaignContact, OutboxMessage
from shared.messaging.topology import MessageType
from tests.support.components import components
from tests.support.factories import Customer, customer

CONTACTS_CSV = (
    "phone_number,name,appointment\n"
    "+14155550101,Ada,9:00\n"
    "not-a-number,Bob,10:00\n"
    "+14155550102,Cy,11:00\n"
    "+14155550101,Ada again,12:00\n"
)
USAGE_ERROR = 2  # click's exit code for a usage error
FAILURE = 1  # a ClickException's


def _callctl(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _csv(tmp_path: Path, text: str = CONTACTS_CSV) -> Path:
    path = tmp_path / "spring-reminders.csv"
    path.write_text(text, encoding="utf-8")
    return path


def _create_command(user_id: object, agent_id: object, csv_path: Path, *options: str) -> list[str]:
    """`callctl campaigns create` for this customer, agent and CSV file, with more options."""
    return [
        "campaigns",
        "create",
        "--user-id",
        str(user_id),
        "--agent-id",
        str(agent_id),
        "--csv",
        str(csv_path),
        *options,
    ]


def _create(owner: Customer, tmp_path: Path, *options: str) -> dict:
    result = _callctl(*_create_command(owner.user_id, owner.agent_id, _csv(tmp_path), "--json", *options))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _campaign(campaign_id: str) -> Campaign:
    with components().uow() as uow:
        return uow.session.get_one(Campaign, uuid.UUID(campaign_id))


def _contact_states(campaign_id: str) -> list[tuple[str, str | None]]:
    with components().uow() as uow:
        rows = uow.session.execute(
            select(CampaignContact.state, CampaignContact.final_status)
            .where(CampaignContact.campaign_id == uuid.UUID(campaign_id))
            .order_by(CampaignContact.row_number)
        )
        return [tuple(row) for row in rows]


def test_create_from_csv_counts_contacts_duplicates_and_rejected_and_stores_the_settings(tmp_path):
    owner = customer()
    created = _create(
        owner,
        tmp_path,
        "--max-concurrency",
        "3",
        "--window",
        "9-18",
        "--window-days",
        "1,2,3,4,5",
        "--retry-max-attempts",
        "2",
        "--retry-on",
        "no-answer,busy",
        "--retry-interval-minutes",
        "1,5",
    )

    assert created["status"] == states.DRAFT
    assert created["contacts"] == 2
    assert created["duplicates"] == 1, "a number given twice is called once"
    assert [(item["row"], item["phoneNumber"]) for item in created["rejected"]] == [(2, "not-a-number")]
    campaign = _campaign(created["campaignId"])
    assert campaign.name == "spring-reminders", "named after the CSV file by default"
    assert campaign.user_id == owner.user_id and campaign.agent_id == owner.agent_id
    assert campaign.max_concurrency == 3
    assert (campaign.window_start_hour, campaign.window_end_hour, campaign.window_days) == (9, 18, [1, 2, 3, 4, 5])
    assert campaign.retry_max_attempts == 2
    assert campaign.retry_on_statuses == ["no-answer", "busy"]
    assert campaign.retry_interval_minutes == [1.0, 5.0]
    assert _contact_states(created["campaignId"]) == [(states.WAITING, None)] * 2


def test_create_prints_the_counts_and_each_rejected_row(tmp_path):
    owner = customer()
    result = _callctl(*_create_command(owner.user_id, owner.agent_id, _csv(tmp_path), "--name", "Spring"))

    assert result.exit_code == 0, result.output
    assert "status: draft\ncontacts: 2\nduplicates: 1\nrejected: 1\n  row 2 ('not-a-number'): phoneNumber:" in (
        result.stdout
    )


@pytest.mark.parametrize(
    ("options", "csv_text", "expected"),
    [
        (["--retry-max-attempts", "9"], CONTACTS_CSV, "--retry-max-attempts: Input should be less than or equal to 4"),
        (["--retry-on", "no-answer,voicemail"], CONTACTS_CSV, "--retry-on: Input should be 'no-answer', 'busy'"),
        (["--window", "18-9"], CONTACTS_CSV, "--window: startHour must be before endHour"),
        (["--window", "nine"], CONTACTS_CSV, "expected START-END hours, e.g. 9-18"),
        (["--window-days", "1,2"], CONTACTS_CSV, "--window-days needs --window"),
        (["--start-at", "2030-01-01T09:00:00"], CONTACTS_CSV, "--start-at: Input should have timezone info"),
        ([], "number,name\n+14155550101,Ada\n", "the CSV header must name a 'phone_number' column"),
        ([], "phone_number\nnope\n", "The campaign has no valid contact.\n  row 1 ('nope'): phoneNumber:"),
    ],
)
def test_bad_input_is_a_usage_error_with_the_reason(tmp_path, options, csv_text, expected):
    owner = customer()
    result = _callctl(*_create_command(owner.user_id, owner.agent_id, _csv(tmp_path, csv_text), *options))

    assert result.exit_code == USAGE_ERROR, result.output
    assert expected in result.stderr
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), "click's own exit, not an exception escaping"


def test_create_with_another_customers_agent_is_refused(tmp_path):
    owner, other = customer(), customer()
    result = _callctl(*_create_command(owner.user_id, other.agent_id, _csv(tmp_path)))

    assert result.exit_code == USAGE_ERROR
    assert "The agent belongs to another user." in result.stderr
    with components().uow() as uow:
        assert uow.session.scalars(select(Campaign).where(Campaign.user_id == owner.user_id)).all() == []


def test_list_shows_the_customers_campaigns_newest_first(tmp_path):
    owner, other = customer(), customer()
    first = _create(owner, tmp_path, "--name", "First")
    second = _create(owner, tmp_path, "--name", "Second")
    _create(other, tmp_path, "--name", "Someone else's")

    listed = _callctl("campaigns", "list", "--user-id", str(owner.user_id), "--json")
    text = _callctl("campaigns", "list", "--user-id", str(owner.user_id))

    assert listed.exit_code == 0, listed.output
    campaigns = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(c["campaignId"], c["name"], c["status"]) for c in campaigns] == [
        (second["campaignId"], "Second", states.DRAFT),
        (first["campaignId"], "First", states.DRAFT),
    ]
    assert text.exit_code == 0, text.output
    assert text.stdout.splitlines()[0].split() == [second["campaignId"], states.DRAFT, "2", "contacts", "Second"]
    assert text.stdout.splitlines()[-1] == "2 campaign(s)"


def test_start_runs_the_campaign_and_announces_it_before_exiting_then_pause_holds_it(tmp_path):
    owner = customer()
    campaign_id = _create(owner, tmp_path)["campaignId"]

    started = _callctl("campaigns", "start", campaign_id, "--user-id", str(owner.user_id))

    assert started.exit_code == 0, started.output
    assert started.stdout == f"campaign {campaign_id}: {states.RUNNING}\n"
    assert _campaign(campaign_id).status == states.RUNNING
    with components().uow() as uow:
        announcements = uow.session.scalars(
            select(OutboxMessage).where(OutboxMessage.message_type == MessageType.CAMPAIGN_STARTED)
        ).all()
    mine = [row for row in announcements if row.body.get("campaign_id") == campaign_id]
    assert len(mine) == 1 and mine[0].published_at is not None, "published by the command, not left to the relay"

    paused = _callctl("campaigns", "pause", campaign_id, "--json")  # the owner is looked up

    assert paused.exit_code == 0, paused.output
    assert json.loads(paused.stdout)["status"] == states.PAUSED
    assert _campaign(campaign_id).status == states.PAUSED


def test_an_invalid_transition_exits_non_zero_with_the_message(tmp_path):
    owner = customer()
    campaign_id = _create(owner, tmp_path)["campaignId"]

    result = _callctl("campaigns", "resume", campaign_id, "--user-id", str(owner.user_id))

    assert result.exit_code == FAILURE
    assert "invalid_campaign_transition: A draft campaign cannot resume." in result.stderr
    assert "Traceback" not in result.output
    assert _campaign(campaign_id).status == states.DRAFT


def test_another_customers_campaign_is_not_found(tmp_path):
    owner, other = customer(), customer()
    campaign_id = _create(owner, tmp_path)["campaignId"]

    result = _callctl("campaigns", "start", campaign_id, "--user-id", str(other.user_id))
    missing = _callctl("campaigns", "start", str(uuid.uuid4()))

    assert result.exit_code == FAILURE
    assert f"campaign_not_found: No campaign {campaign_id}." in result.stderr
    assert _campaign(campaign_id).status == states.DRAFT
    assert missing.exit_code == FAILURE
    assert "campaign_not_found" in missing.stderr


def test_cancel_ends_every_waiting_contact_and_watch_prints_the_summary(tmp_path):
    owner = customer()
    campaign_id = _create(owner, tmp_path)["campaignId"]
    assert _callctl("campaigns", "start", campaign_id).exit_code == 0

    canceled = _callctl("campaigns", "cancel", campaign_id, "--user-id", str(owner.user_id))
    watched = _callctl("campaigns", "watch", campaign_id)
    again = _callctl("campaigns", "cancel", campaign_id)

    assert canceled.exit_code == 0, canceled.output
    assert canceled.stdout == f"campaign {campaign_id}: {states.CANCELED}\n"
    campaign = _campaign(campaign_id)
    assert campaign.status == states.CANCELED and campaign.finished_at is not None
    assert _contact_states(campaign_id) == [(states.DONE, statuses.CANCELED)] * 2
    assert watched.exit_code == 0, watched.output
    summary = watched.stdout[watched.stdout.index(f"campaign {campaign_id}") :].splitlines()
    assert summary[0] == f"campaign {campaign_id} (spring-reminders) canceled"
    assert [line.split(":")[0].strip() for line in summary[1:]] == [
        "contacts",
        "completed",
        "no-answer",
        "busy",
        "failed",
        "canceled",
        "retried",
        "credits",
        "wall time",
    ]
    assert "  canceled:   2" in summary and "  completed:  0" in summary and "  credits:    0" in summary
    assert again.exit_code == FAILURE
    assert "invalid_campaign_transition: A canceled campaign cannot cancel." in again.stderr
