"""`callctl`: the operator's command line."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path
from urllib.parse import quote

import click

from shared.bootstrap import build_components
from shared.cli import accounts, campaigns, demo, sentry
from shared.core import migrate
from shared.core.config import load_settings
from shared.messaging import dead_letters
from shared.messaging.definitions import DEFAULT_VHOST, definitions, render
from shared.messaging.topology import connection_parameters, declare_topology_at, delete_former_retry_queues


@click.group()
def main() -> None:
    """Operate Callflow: schema, broker topology, dead letters, users, agents and campaigns."""


main.add_command(campaigns.campaigns)
main.add_command(demo.demo)
main.add_command(sentry.sentry)


@main.group()
def db() -> None:
    """The PostgreSQL schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Create the database if it is missing and apply every migration."""
    migrate.upgrade(load_settings().database_url)
    click.echo("database is at the latest migration")


@main.group()
def mq() -> None:
    """The RabbitMQ topology."""


@mq.command("declare")
def mq_declare() -> None:
    """Declare the exchanges and queues (idempotent)."""
    declare_topology_at(load_settings().rabbitmq_url)
    click.echo("broker topology declared")


@mq.command("migrate")
def mq_migrate() -> None:
    """Retire the queues earlier versions used; run once no instance of an earlier version runs (they still
    publish to those queues)."""
    url = load_settings().rabbitmq_url
    moved = dead_letters.adopt_former_dead_letters(url)
    if moved is not None:
        click.echo(f"moved {moved} dead letters from {dead_letters.FORMER_DEAD_LETTER_QUEUE}; it is deleted")
    waiting = delete_former_retry_queues(url)
    for name in waiting:
        click.echo(f"{name} (a former delay queue) still holds messages on their way back: run this again")
    click.echo("no queue of an earlier version is left" if not waiting else "run again in a minute")


@mq.command("definitions")
@click.option("--vhost", default=DEFAULT_VHOST, show_default=True, help="The vhost the definitions declare.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the document to this file instead of printing it.",
)
def mq_definitions(vhost: str, output: Path | None) -> None:
    """The topology as a RabbitMQ definitions document (deploy/rabbitmq/definitions.json is its default output)."""
    if not vhost:
        raise click.BadParameter("must not be empty", param_hint="--vhost")
    text = render(definitions(vhost))
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"definitions for vhost {vhost!r} written to {output}")


@mq.command("console")
@click.option("--port", type=click.IntRange(1, 65535), default=15672, show_default=True, help="Management port.")
def mq_console(port: int) -> None:
    """Where the broker's web console is, or how to turn it on."""
    nodes = connection_parameters(load_settings().rabbitmq_url)
    vhost = nodes[0].virtual_host
    hosts = sorted({node.host for node in nodes})
    queues_page = f"/#/queues/{quote(vhost, safe='')}"
    running = [host for host in hosts if _listening(host, port)]
    if running:
        for host in running:
            click.echo(f"RabbitMQ console: http://{host}:{port}{queues_page} (vhost {vhost!r})")
        return
    click.echo(
        f"RabbitMQ console: off (nothing listens on {', '.join(hosts)}:{port}).\n"
        "To turn it on, run on the broker's machine (as root, or the user the broker runs as):\n"
        "  rabbitmq-plugins enable rabbitmq_management\n"
        "  rabbitmqctl add_user callflow-admin '<a password>'\n"
        "  rabbitmqctl set_user_tags callflow-admin administrator\n"
        f"  rabbitmqctl set_permissions -p '{vhost}' callflow-admin '.*' '.*' '.*'\n"
        f"then open http://{hosts[0]}:{port}{queues_page} and sign in as callflow-admin."
    )


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


@main.group("dlq")
def dlq() -> None:
    """The dead-letter queue: messages that could not be processed, with the reason."""


@dlq.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line.")
def dlq_list(limit: int, as_json: bool) -> None:
    """Show dead letters (they stay in the queue)."""
    letters = dead_letters.list_dead_letters(load_settings().rabbitmq_url, limit)
    for letter in letters:
        if as_json:
            click.echo(json.dumps(letter.as_dict()))
        else:
            click.echo(f"{letter.message_id}  {letter.message_type}  from {letter.original_queue}: {letter.reason}")
    if not as_json:
        click.echo(f"{len(letters)} dead letter(s)")


@dlq.command("replay")
@click.option("--id", "message_ids", multiple=True, help="Message id to replay (repeatable).")
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
def dlq_replay(message_ids: tuple[str, ...], replay_all: bool) -> None:
    """Send dead letters back to the queue they failed in."""
    if not message_ids and not replay_all:
        raise click.UsageError("name messages with --id, or pass --all")
    replayed = dead_letters.replay(load_settings().rabbitmq_url, None if replay_all else set(message_ids))
    for letter in replayed:
        click.echo(f"replayed {letter.message_id} to {letter.original_queue}")
    click.echo(f"{len(replayed)} message(s) replayed")


@main.group()
def users() -> None:
    """Customer accounts."""


@users.command("create")
@click.option("--email", required=True)
@click.option("--credits", type=click.IntRange(min=0), default=100, show_default=True)
@click.option("--max-concurrent-calls", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def users_create(email: str, credits: int, max_concurrent_calls: int, as_json: bool) -> None:
    """Create a user and print its API token (shown this once only)."""
    try:
        created = accounts.create_user(build_components(load_settings()).uow, email, credits, max_concurrent_calls)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    result = {
        "id": str(created.user.id),
        "email": created.user.email,
        "api_token": created.api_token,
        "credits": created.user.credits,
        "max_concurrent_calls": created.user.max_concurrent_calls,
    }
    _print(result, as_json)


@main.group()
def agents() -> None:
    """AI agents that place calls."""


@agents.command("create")
@click.option("--user-id", type=click.UUID, required=True)
@click.option("--name", required=True)
@click.option("--provider-agent-id", type=click.UUID, default=None, help="The agent's id at Bolna.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def agents_create(user_id: uuid.UUID, name: str, provider_agent_id: uuid.UUID | None, as_json: bool) -> None:
    """Create an agent for a user."""
    try:
        provider_id = str(provider_agent_id) if provider_agent_id else None
        agent = accounts.create_agent(build_components(load_settings()).uow, user_id, name, provider_id)
    except LookupError as exc:
        raise click.UsageError(str(exc)) from exc
    result = {
        "id": str(agent.id),
        "user_id": str(agent.user_id),
        "name": agent.name,
        "provider_agent_id": agent.provider_agent_id,
    }
    _print(result, as_json)


def _print(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result))
    else:
        for key, value in result.items():
            click.echo(f"{key}: {value}")
