"""deploy/rabbitmq/definitions.json is the topology the services declare: it is the generator's output, and a broker
that imports it holds the same exchanges, queues (with their arguments) and bindings as one the services set up.
Also the compose broker's configuration around it, and `callctl mq console`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pytest
from click.testing import CliRunner, Result

from shared.cli import main
from shared.messaging.definitions import DEFAULT_VHOST, definitions, render
from shared.messaging.topology import (
    DEAD_LETTER_QUEUE,
    DISPATCH_DELIVERY_LIMIT,
    DISPATCH_QUEUE,
    declare_retry_queues,
    open_channel,
)
from tests.support.isolation import RABBITMQ_HOST_URL, Isolation

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq"
DEFINITIONS_FILE = DEPLOY / "definitions.json"
USERS_SCRIPT = DEPLOY / "users.sh"
USAGE_ERROR = 64  # users.sh's exit code for a missing or unusable password
GOOD_PASSWORD = "0123456789abcdef"


def _callctl(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    command = ["rabbitmqctl", "-q", *args]
    return subprocess.run(command, input=stdin, check=True, capture_output=True, text=True, timeout=60).stdout


def _listing(vhost: str, command: str, *columns: str) -> list[dict[str, Any]]:
    return json.loads(_rabbitmqctl(command, "-p", vhost, *columns, "--formatter", "json"))


def _arguments(listed: list[list[Any]]) -> dict[str, Any]:
    """rabbitmqctl lists arguments as [name, AMQP type, value]; the type depends on the client (pika sends a TTL
    as signedint, a definitions import as long), only names and values mean something."""
    return {name: value for name, _type, value in listed}


def _topology(vhost: str) -> dict[str, Any]:
    """What a vhost holds, apart from the exchanges every vhost has."""
    queues = _listing(vhost, "list_queues", "name", "type", "durable", "auto_delete", "arguments")
    exchanges = _listing(vhost, "list_exchanges", "name", "type", "durable", "auto_delete", "internal", "arguments")
    bindings = _listing(
        vhost, "list_bindings", "source_name", "destination_name", "destination_kind", "routing_key", "arguments"
    )
    for entry in [*queues, *exchanges, *bindings]:
        entry["arguments"] = _arguments(entry["arguments"])
    return {
        "queues": {queue["name"]: queue for queue in queues},
        "exchanges": {
            exchange["name"]: exchange
            for exchange in exchanges
            if exchange["name"] and not exchange["name"].startswith("amq.")
        },
        "bindings": sorted(bindings, key=lambda binding: json.dumps(binding, sort_keys=True)),
    }


def _for_vhost(document: dict[str, Any], vhost: str) -> dict[str, Any]:
    """The document with every entry moved to `vhost` (rabbitmqctl import_definitions has no vhost option)."""
    return {
        section: [{**entry, ("name" if section == "vhosts" else "vhost"): vhost} for entry in entries]
        for section, entries in document.items()
    }


def _import_definitions(vhost: str) -> None:
    """Loads the committed definitions into `vhost`, as a broker loads them at boot. Through stdin (no path; 3.10
    takes "-" for a file name): rabbitmqctl may run as the broker's user, which cannot read this run's files."""
    _rabbitmqctl("import_definitions", stdin=json.dumps(_for_vhost(json.loads(DEFINITIONS_FILE.read_text()), vhost)))


@pytest.fixture
def vhosts(isolation: Isolation) -> Iterator[list[str]]:
    """Fresh vhost names for one test; any of them that exists at the end is deleted."""
    names = [f"{isolation.name}_imported", f"{isolation.name}_declared"]
    yield names
    existing = set(_rabbitmqctl("list_vhosts", "--silent").split())
    for name in names:
        if name in existing:
            _rabbitmqctl("delete_vhost", name)


def test_the_committed_definitions_are_the_generators_output() -> None:
    assert DEFINITIONS_FILE.read_text() == render(definitions()), (
        "deploy/rabbitmq/definitions.json is out of date: run "
        "`callctl mq definitions --output deploy/rabbitmq/definitions.json`"
    )


@pytest.mark.timeout(120)
def test_a_broker_that_imports_the_definitions_holds_what_the_services_declare(
    vhosts: list[str],
) -> None:
    imported, declared = vhosts
    _import_definitions(imported)

    _rabbitmqctl("add_vhost", declared)
    _rabbitmqctl("set_permissions", "-p", declared, "guest", ".*", ".*", ".*")
    # As the services start: every one declares the topology, the queue processor its queue's retry queues.
    with open_channel(f"{RABBITMQ_HOST_URL}/{declared}") as channel:
        declare_retry_queues(channel, DISPATCH_QUEUE)

    expected = _topology(declared)
    assert DISPATCH_QUEUE in expected["queues"] and expected["bindings"], "the services declared nothing"
    assert _topology(imported) == expected


@pytest.mark.timeout(120)
def test_a_broker_that_imports_the_definitions_dead_letters_a_dispatch_message_given_back_past_the_limit(
    vhosts: list[str],
) -> None:
    imported, _ = vhosts
    _import_definitions(imported)
    _rabbitmqctl("set_permissions", "-p", imported, "guest", ".*", ".*", ".*")
    with open_channel(f"{RABBITMQ_HOST_URL}/{imported}") as channel:
        channel.basic_publish("", DISPATCH_QUEUE, b"{}", pika.BasicProperties(message_id="given-back"))
        given_back = 0
        # As a consumer whose connection a message it cannot read keeps breaking: it never settles it.
        while (got := channel.basic_get(DISPATCH_QUEUE))[0] is not None:
            given_back += 1
            assert given_back <= DISPATCH_DELIVERY_LIMIT + 1, "the broker keeps giving it back"
            channel.basic_nack(got[0].delivery_tag, requeue=True)
        method, properties, _ = channel.basic_get(DEAD_LETTER_QUEUE, auto_ack=True)
    assert given_back == DISPATCH_DELIVERY_LIMIT + 1
    assert method is not None and properties.message_id == "given-back"
    assert properties.headers["x-death"][0]["reason"] == "delivery_limit"


def test_callctl_prints_the_definitions_and_writes_them_to_a_file(tmp_path: Path) -> None:
    printed = _callctl("mq", "definitions", "--vhost", "staging")
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.output) == definitions("staging")
    assert {entry["vhost"] for entry in json.loads(printed.output)["queues"]} == {"staging"}

    output = tmp_path / "definitions.json"
    written = _callctl("mq", "definitions", "--output", str(output))
    assert written.exit_code == 0, written.output
    assert output.read_text() == DEFINITIONS_FILE.read_text()


def test_callctl_refuses_an_empty_vhost() -> None:
    result = _callctl("mq", "definitions", "--vhost", "")
    assert result.exit_code == 2 and "--vhost" in result.output


def test_the_seeded_users_get_the_vhost_the_definitions_create() -> None:
    settings = dict(
        line.split(" = ", 1) for line in (DEPLOY / "rabbitmq.conf").read_text().splitlines() if " = " in line
    )
    patterns = {key: value for key, value in settings.items() if key.endswith(".vhost_pattern")}
    assert patterns.keys() == {
        "default_users.callflow.vhost_pattern",
        "default_users.callflow-admin.vhost_pattern",
    }
    assert all(re.search(pattern, DEFAULT_VHOST) for pattern in patterns.values())
    assert settings["definitions.local.path"] == "/etc/rabbitmq/definitions.json"


def _run_users_script(tmp_path: Path, **passwords: str) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": os.environ["PATH"], "RABBITMQ_USERS_CONF": str(tmp_path / "users.conf"), **passwords}
    return subprocess.run(
        ["sh", str(USERS_SCRIPT), "echo", "started"], env=environment, capture_output=True, text=True, timeout=30
    )


def test_the_users_script_writes_each_password_then_starts_the_broker(tmp_path: Path) -> None:
    result = _run_users_script(
        tmp_path, RABBITMQ_APP_PASSWORD=GOOD_PASSWORD, RABBITMQ_ADMIN_PASSWORD="admin-" + GOOD_PASSWORD
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "started\n"
    assert (tmp_path / "users.conf").read_text().splitlines() == [
        f"default_users.callflow.password = {GOOD_PASSWORD}",
        f"default_users.callflow-admin.password = admin-{GOOD_PASSWORD}",
    ]


@pytest.mark.parametrize(
    ("admin_password", "complaint"),
    [(None, "is not set"), ("pass word#1234", "may hold only"), ("short", "is shorter than 12")],
)
def test_the_users_script_refuses_a_missing_or_unusable_password(
    tmp_path: Path, admin_password: str | None, complaint: str
) -> None:
    passwords = {"RABBITMQ_APP_PASSWORD": GOOD_PASSWORD}
    if admin_password is not None:
        passwords["RABBITMQ_ADMIN_PASSWORD"] = admin_password
    result = _run_users_script(tmp_path, **passwords)
    assert result.returncode == USAGE_ERROR
    assert f"RABBITMQ_ADMIN_PASSWORD {complaint}" in result.stderr
    assert "started" not in result.stdout


def test_callctl_tells_how_to_turn_the_console_on_when_it_is_off(isolation: Isolation) -> None:
    with socket.socket() as probe:  # a port nothing listens on once the socket is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _callctl("mq", "console", "--port", str(port))
    assert result.exit_code == 0, result.output
    assert "rabbitmq-plugins enable rabbitmq_management" in result.output
    assert f"set_permissions -p '{isolation.name}' callflow-admin" in result.output


def test_callctl_shows_where_the_console_is_when_it_listens(isolation: Isolation) -> None:
    with socket.create_server(("127.0.0.1", 0)) as console:
        port = console.getsockname()[1]
        result = _callctl("mq", "console", "--port", str(port))
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"RabbitMQ console: http://127.0.0.1:{port}/#/queues/{quote(isolation.name, safe='')}"
        f" (vhost {isolation.name!r})\n"
    )
