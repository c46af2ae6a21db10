"""`callctl demo` (`make demo`): a campaign (200 contacts by default) run end to end against the stack of `make up`.

It creates a customer and an agent, sets the Bolna simulator to fast calls with some no-answers, busies and
failures, creates a campaign that calls a no-answer or a busy again, starts it and watches it to its end. The
simulator's settings are put back afterwards.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import requests

from shared.campaigns import states
from shared.cli import accounts, campaigns
from shared.core.config import load_settings

OUTCOMES = {"completed": 0.7, "no-answer": 0.15, "busy": 0.1, "failed": 0.05}
# Calls of about half a second (billed as 20 s to 150 s of talk: 1 to 3 credits), so the demo takes a minute or less.
FAST_CALLS = {
    "step_delay_seconds": 0.05,
    "talk_seconds": 0.2,
    "completed_delay_seconds": 0.1,
    "duration_min_seconds": 20,
    "duration_max_seconds": 150,
}
# Enough for every contact: one is billed once at most (its completed call), 3 credits at most.
CREDITS_PER_CONTACT = 3
MAX_CONCURRENT_CALLS = 12
CAMPAIGN_SETTINGS = {
    "name": "Demo: appointment reminders",
    "maxConcurrency": "10",
    "retryMaxAttempts": "2",
    "retryOnStatuses": "no-answer,busy",
    "retryIntervalMinutes": "0.05",
}


@click.command("demo")
# Numbers of one exchange: +1 415 555 0000 to 9999.
@click.option("--contacts", "contact_count", type=click.IntRange(1, 10_000), default=200, show_default=True)
@click.option("--simulator-url", default=None, help="The Bolna simulator  [default: BOLNA_API_URL]")
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=0.5, show_default=True, help="Seconds between readings."
)
def demo(contact_count: int, simulator_url: str | None, interval: float) -> None:
    """Run a campaign end to end against the running stack.

    It needs the services and the Bolna simulator of `make up` running, and the same environment (`.env`)."""
    simulator = (simulator_url or load_settings().bolna_api_url).rstrip("/")
    with campaigns.connected() as components, simulator_set_to(simulator, {"outcomes": OUTCOMES, **FAST_CALLS}):
        click.echo(f"simulator {simulator}: outcomes {_shares(OUTCOMES)}, calls of about half a second")
        email = f"demo-{uuid.uuid4().hex[:8]}@example.com"
        credits = CREDITS_PER_CONTACT * contact_count
        user = accounts.create_user(components.uow, email, credits, MAX_CONCURRENT_CALLS).user
        click.echo(f"customer {user.email} ({user.id}): {user.credits} credits, {MAX_CONCURRENT_CALLS} calls at once")
        agent = accounts.create_agent(components.uow, user.id, "Maya", str(uuid.uuid4()))
        click.echo(f"agent {agent.name} ({agent.id}), Bolna agent {agent.provider_agent_id}")
        query = {**CAMPAIGN_SETTINGS, "agentId": str(agent.id)}
        created = campaigns.create_from_csv(components, user.id, query, contacts_csv(contact_count))
        click.echo(
            f"campaign {created.campaign.id}: {len(created.contacts.contacts)} contacts, at most "
            f"{query['maxConcurrency']} calls at once, {query['retryMaxAttempts']} attempts on "
            f"{query['retryOnStatuses']} ({query['retryIntervalMinutes']} min apart)"
        )
        started = campaigns.change_status(components, created.campaign.id, states.Action.START)
        click.echo(f"campaign {started.id}: {started.status}")
        campaigns.watch(components, created.campaign.id, interval)
        # The agent is new: every call the simulator saw of it is one of this campaign's.
        peaks = requests.get(f"{simulator}/_sim/stats", timeout=5).json()["max_active_calls"]
        peak = peaks.get(agent.provider_agent_id, 0)
        click.echo(f"  at once:    {peak} at most, as the simulator saw them (cap {query['maxConcurrency']})")


def contacts_csv(count: int) -> str:
    """`count` San Francisco numbers of the 555 exchange, each with a name and an appointment time."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["phone_number", "name", "appointment"])
    for index in range(count):
        writer.writerow([f"+1415555{index:04d}", f"Contact {index + 1}", f"{9 + index % 8}:00"])
    return buffer.getvalue()


@contextmanager
def simulator_set_to(simulator: str, changes: dict[str, Any]) -> Iterator[None]:
    """The simulator with these settings for the demo's length; its own afterwards."""
    try:
        before = requests.get(f"{simulator}/_sim/config", timeout=5)
        before.raise_for_status()
    except requests.RequestException as exc:
        raise click.ClickException(
            f"the Bolna simulator does not answer at {simulator} ({exc}); start the stack first: make up"
        ) from exc
    requests.post(f"{simulator}/_sim/config", json=changes, timeout=5).raise_for_status()
    try:
        yield
    finally:
        restored = {key: value for key, value in before.json().items() if key in changes}
        requests.post(f"{simulator}/_sim/config", json=restored, timeout=5).raise_for_status()


def _shares(weights: dict[str, float]) -> str:
    return ", ".join(f"{share:.0%} {outcome}" for outcome, share in weights.items())
