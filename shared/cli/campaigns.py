"""`callctl campaigns`: create a campaign from a CSV file, start, pause, resume or cancel it, list a customer's
campaigns, and watch one run to its end.

The commands work on the database directly, through the same commands and views as the `/api/campaigns` API.
"""

from __future__ import annotations

import csv
import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

from shared.bootstrap import Components, build_components
from shared.calls import statuses
from shared.campaigns import commands, spec, states, views
from shared.core.config import load_settings
from shared.core.errors import CallflowError
from shared.core.models import Campaign, CampaignContact

# How long a command waits for what it announced (a campaign started) to reach the broker; the outbox relay
# publishes anything left later.
ANNOUNCE_TIMEOUT_SECONDS = 5.0
SUMMARY_STATUSES = (statuses.COMPLETED, "no-answer", "busy", statuses.FAILED)
_WINDOW = re.compile(r"\s*\d{1,2}\s*-\s*\d{1,2}\s*")
# A settings error names the option it came from, not the API field: the longest matching path wins.
_OPTION_OF_FIELD = {
    "name": "--name",
    "agentId": "--agent-id",
    "maxConcurrency": "--max-concurrency",
    "startAt": "--start-at",
    "retry.maxAttempts": "--retry-max-attempts",
    "retry.onStatuses": "--retry-on",
    "retry.intervalMinutes": "--retry-interval-minutes",
    "callingWindow": "--window",
    "callingWindow.days": "--window-days",
}


@contextmanager
def connected() -> Iterator[Components]:
    """The database and broker of the environment's settings, for one command."""
    components = build_components(load_settings())
    try:
        yield components
    finally:
        # A process that exits at once would leave its announcements to the relay's next run.
        components.after_commit.wait_until_idle(ANNOUNCE_TIMEOUT_SECONDS)
        components.engine.dispose()


@click.group("campaigns")
def campaigns() -> None:
    """Campaigns: a CSV of contacts one agent calls, within the customer's limits."""


def _window_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not _WINDOW.fullmatch(value):
        raise click.BadParameter("expected START-END hours, e.g. 9-18")
    return value


@campaigns.command("create")
@click.option("--user-id", type=click.UUID, required=True, help="The customer the campaign belongs to.")
@click.option("--agent-id", type=click.UUID, required=True, help="The customer's agent that places the calls.")
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Contacts: a `phone_number` column (E.164), an optional `name`; every other column is a variable.",
)
@click.option("--name", default=None, help="The campaign's name  [default: the CSV file's name]")
@click.option("--max-concurrency", type=int, default=None, help="At most this many of its calls at once.")
@click.option(
    "--window", default=None, callback=_window_option, help="Calling hours in each contact's own time, e.g. 9-18."
)
@click.option("--window-days", default=None, help="ISO weekdays of the window, e.g. 1,2,3,4,5 (1 = Monday).")
@click.option("--retry-max-attempts", type=int, default=None, help="Calls per contact at most (1-4).")
@click.option("--retry-on", default=None, help="Statuses that call again: no-answer, busy, failed, error, balance-low.")
@click.option("--retry-interval-minutes", default=None, help="Waits before attempt 2, 3, ..., e.g. 1,5.")
@click.option("--start-at", default=None, help="Start no earlier than this ISO time, with its offset.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def create(
    user_id: uuid.UUID,
    agent_id: uuid.UUID,
    csv_path: Path,
    name: str | None,
    max_concurrency: int | None,
    window: str | None,
    window_days: str | None,
    retry_max_attempts: int | None,
    retry_on: str | None,
    retry_interval_minutes: str | None,
    start_at: str | None,
    as_json: bool,
) -> None:
    """Create a draft campaign from a CSV file.

    A number that is not valid E.164 is rejected (and listed); a number given twice is called once."""
    if window_days is not None and window is None:
        raise click.UsageError("--window-days needs --window")
    try:
        text = csv_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise click.UsageError(f"{csv_path} is not UTF-8 text: {exc}") from exc
    options = {
        "name": name if name is not None else csv_path.stem,
        "agentId": str(agent_id),
        "maxConcurrency": max_concurrency,
        "startAt": start_at,
        "window": window,
        "windowDays": window_days,
        "retryMaxAttempts": retry_max_attempts,
        "retryOnStatuses": retry_on,
        "retryIntervalMinutes": retry_interval_minutes,
    }
    query = {key: str(value) for key, value in options.items() if value is not None}
    with connected() as components:
        created = create_from_csv(components, user_id, query, text)
    answer = commands.created_answer(created)
    if as_json:
        click.echo(json.dumps(answer))
    else:
        echo_created(answer)


def create_from_csv(
    components: Components, user_id: uuid.UUID, query: dict[str, str], text: str
) -> commands.CreatedCampaign:
    """Checks the settings (given as the API's query parameters) and the CSV as a CSV upload is checked, and stores
    the draft campaign; any problem is a UsageError that names it."""
    try:
        settings = spec.CampaignSettings.model_validate(spec.settings_from_query(query))
        contacts = spec.contacts_from_csv(text)
    except ValidationError as exc:
        raise click.UsageError(_settings_problems(exc)) from exc
    except (ValueError, csv.Error) as exc:
        raise click.UsageError(f"invalid campaign: {exc}") from exc
    try:
        with components.uow() as uow:
            created = commands.create_campaign(uow, user_id, settings, contacts)
            uow.commit()
    except CallflowError as exc:
        rejected = "".join(f"\n  {_rejected_line(item)}" for item in exc.problem_fields.get("rejected", []))
        raise click.UsageError(f"{exc.detail}{rejected}") from exc
    return created


def echo_created(answer: dict[str, Any]) -> None:
    click.echo(f"campaign_id: {answer['campaignId']}")
    click.echo(f"status: {answer['status']}")
    click.echo(f"contacts: {answer['contacts']}")
    click.echo(f"duplicates: {answer['duplicates']}")
    click.echo(f"rejected: {answer['rejectedCount']}")
    for item in answer["rejected"]:
        click.echo(f"  {_rejected_line(item)}")


def _rejected_line(item: dict[str, Any]) -> str:
    return f"row {item['row']} ({item['phoneNumber']!r}): {item['reason']}"


def _settings_problems(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        path = [str(part) for part in error["loc"]]
        prefixes = (".".join(path[:length]) for length in range(len(path), 0, -1))
        option = next((_OPTION_OF_FIELD[prefix] for prefix in prefixes if prefix in _OPTION_OF_FIELD), ".".join(path))
        problems.append(f"{option}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


def _status_command(action: states.Action, summary: str) -> click.Command:
    @click.argument("campaign_id", type=click.UUID)
    @click.option(
        "--user-id",
        type=click.UUID,
        default=None,
        help="The customer the campaign must belong to  [default: its owner, looked up]",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print the campaign as JSON.")
    def change(campaign_id: uuid.UUID, user_id: uuid.UUID | None, as_json: bool) -> None:
        with connected() as components:
            campaign = change_status(components, campaign_id, action, user_id)
        if as_json:
            click.echo(json.dumps(views.summary_view(campaign)))
        else:
            click.echo(f"campaign {campaign.id}: {campaign.status}")

    change.__doc__ = summary
    return campaigns.command(action.value)(change)


def change_status(
    components: Components, campaign_id: uuid.UUID, action: states.Action, user_id: uuid.UUID | None = None
) -> Campaign:
    """The move as the customer would ask for it over the API; a move the campaign's status does not allow (or a
    campaign that is not there) is a ClickException, which exits 1 with its message."""
    owner = user_id or _owner_of(components, campaign_id)
    try:
        return commands.change_status(components.uow, owner, str(campaign_id), action)
    except CallflowError as exc:
        raise click.ClickException(f"{exc.error_type}: {exc.detail}") from exc


def _owner_of(components: Components, campaign_id: uuid.UUID) -> uuid.UUID:
    with components.uow() as uow:
        owner = uow.reads_only().session.scalar(select(Campaign.user_id).where(Campaign.id == campaign_id))
    if owner is None:
        raise click.ClickException(f"campaign_not_found: No campaign {campaign_id}.")
    return owner


_status_command(states.Action.START, "Start a draft campaign (scheduled until its --start-at, if any).")
_status_command(states.Action.PAUSE, "Pause a scheduled or running campaign: calls under way finish.")
_status_command(states.Action.RESUME, "Resume a paused campaign (also one paused for lack of credits).")
_status_command(
    states.Action.CANCEL, "Cancel a campaign.\n\nNo contact is called again; calls under way finish and are billed."
)


@campaigns.command("list")
@click.option("--user-id", type=click.UUID, required=True)
@click.option("--limit", type=click.IntRange(1, views.MAX_PAGE), default=views.MAX_PAGE, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line.")
def list_campaigns(user_id: uuid.UUID, limit: int, as_json: bool) -> None:
    """A customer's campaigns, newest first."""
    with connected() as components, components.uow() as uow:
        found = uow.reads_only().session.scalars(views.campaigns_of_query(user_id, limit)).all()
    for campaign in found:
        if as_json:
            click.echo(json.dumps(views.summary_view(campaign)))
        else:
            click.echo(f"{campaign.id}  {campaign.status:<9}  {campaign.contacts_total:>6} contacts  {campaign.name}")
    if not as_json:
        click.echo(f"{len(found)} campaign(s)")


@dataclass(frozen=True)
class Progressed:
    """One reading of a campaign: its row, its view, and how many of its contacts were called at least once."""

    campaign: Campaign
    view: dict[str, Any]
    called_contacts: int

    @property
    def finished(self) -> bool:
        return self.campaign.status in states.FINISHED


def read_progress(components: Components, campaign_id: uuid.UUID) -> Progressed | None:
    with components.uow() as uow:
        session = uow.reads_only().session
        campaign = session.get(Campaign, campaign_id)
        if campaign is None:
            return None
        called = session.scalar(
            select(func.count()).where(CampaignContact.campaign_id == campaign_id, CampaignContact.attempts > 0)
        )
        return Progressed(campaign, views.campaign_view(session, campaign), called or 0)


@campaigns.command("watch")
@click.argument("campaign_id", type=click.UUID)
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Seconds between readings."
)
def watch_command(campaign_id: uuid.UUID, interval: float) -> None:
    """Watch a campaign's progress, then its results.

    The progress is shown live until the campaign is completed or canceled. Ctrl-C stops watching (the campaign goes
    on)."""
    with connected() as components:
        watch(components, campaign_id, interval)


def watch(components: Components, campaign_id: uuid.UUID, interval: float) -> None:
    reading = read_progress(components, campaign_id)
    if reading is None:
        raise click.ClickException(f"campaign_not_found: No campaign {campaign_id}.")
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("contacts done"),
        TimeElapsedColumn(),
    )
    task = progress.add_task(reading.campaign.name, total=reading.campaign.contacts_total)
    console, panel = Console(), _progress_panel(reading, progress, task)
    try:
        # Transient, then printed once: a file or a pipe gets the last state, line ends included, as a terminal does.
        with Live(panel, console=console, refresh_per_second=4, transient=True) as live:
            while not reading.finished:
                time.sleep(interval)
                reading = read_progress(components, campaign_id) or reading
                panel = _progress_panel(reading, progress, task)
                live.update(panel)
    except KeyboardInterrupt:
        console.print(panel)
        click.echo(f"stopped watching; the campaign is {reading.campaign.status} and goes on")
        return
    console.print(panel)
    echo_summary(reading)


def _progress_panel(reading: Progressed, progress: Progress, task: TaskID) -> Group:
    view = reading.view
    progress.update(task, completed=view["contacts"][states.DONE])
    contacts = view["contacts"]
    table = Table(show_header=False, box=None, padding=(0, 1), pad_edge=False)
    table.add_column(style="dim")
    table.add_column(justify="right")
    table.add_row("status", _status_text(reading.campaign))
    table.add_row("contacts waiting", str(contacts[states.WAITING] - contacts["waitingForWindow"]))
    table.add_row("contacts waiting for window", str(contacts["waitingForWindow"]))
    table.add_row("contacts calling", str(contacts[states.CALLING]))
    table.add_row("contacts done", str(contacts[states.DONE]))
    for status, count in sorted(view["calls"].items()):
        table.add_row(f"calls {status}", str(count))
    table.add_row("credits charged", str(view["creditsCharged"]))
    return Group(progress, table)


def _status_text(campaign: Campaign) -> str:
    return f"{campaign.status} ({campaign.pause_reason})" if campaign.pause_reason else campaign.status


def echo_summary(reading: Progressed) -> None:
    """The campaign's results: its contacts' final statuses, the attempts beyond each contact's first, the credits
    and the time from its start to its end."""
    campaign, view = reading.campaign, reading.view
    results: dict[str, int] = dict(view["results"])
    lines = [("contacts", str(campaign.contacts_total))]
    lines += [(status, str(results.pop(status, 0))) for status in SUMMARY_STATUSES]
    lines += [(status, str(count)) for status, count in sorted(results.items())]
    lines += [
        ("retried", f"{view['attempts'] - reading.called_contacts} (calls beyond each contact's first)"),
        ("credits", str(view["creditsCharged"])),
        ("wall time", _wall_time(campaign.started_at, campaign.finished_at)),
    ]
    click.echo(f"campaign {campaign.id} ({campaign.name}) {_status_text(campaign)}")
    for label, value in lines:
        click.echo(f"  {label + ':':<11} {value}")


def _wall_time(started: datetime | None, finished: datetime | None) -> str:
    if started is None or finished is None:
        return "-"
    return f"{(finished - started).total_seconds():.1f} s"
