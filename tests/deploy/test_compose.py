"""docker-compose.yml: valid for docker-compose and the compose spec, and its own commands, environments and
dependency order bring up a stack that places calls, here without Docker.

The stack test reads the file as docker-compose resolves it (interpolation, anchors, merges applied), starts the
services in the order `depends_on` allows, and runs each of Callflow's services with its own command and environment.
Only addresses and credentials are mapped: service host names point at this machine (its PostgreSQL in a database of
this test, its RabbitMQ in a vhost of this test, a Sentry sink for Bugsink, free ports for the services), and a host
whose service has not started yet points at a port nothing listens on, as a container that is not up yet would.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from shared.calls import statuses
from shared.core.config import Settings
from tests.deploy.grace import http_stop_seconds, queue_processor_stop_seconds
from tests.support.isolation import Isolation
from tests.support.processes import REPO, free_port, stop_process
from tests.support.sentry_sink import SentrySink
from tests.support.stack import wait_until

COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
RABBITMQ_CONF = REPO / "deploy" / "rabbitmq" / "rabbitmq.conf"
RABBITMQ_DEFINITIONS = REPO / "deploy" / "rabbitmq" / "definitions.json"
# `make install` puts docker-compose in a venv of its own (it pins jsonschema<4).
COMPOSE_BIN = REPO / ".venv" / "compose" / "bin"
# The services' commands (python, callctl) as the image has them on its PATH.
VENV_BIN = Path(sys.executable).parent

# The servers compose runs from third-party images, and the port each listens on in its container.
POSTGRES, RABBITMQ, BUGSINK = "postgres", "rabbitmq", "bugsink"
THIRD_PARTY_PORTS = {POSTGRES: 5432, RABBITMQ: 5672, BUGSINK: 8000}
MACHINE_POSTGRES_NETLOC = "postgres@127.0.0.1:5432"
MACHINE_RABBITMQ_NETLOC = "guest:guest@127.0.0.1:5672"
HEALTH_TIMEOUT_SECONDS = 60.0
PHONE = "+14155550123"
AGENT = "3c90c3cc-0d44-4b50-8888-8dd25736052a"  # the agent at Bolna (README's quick start)


def required_variables() -> set[str]:
    """The variables docker-compose.yml refuses to start without (`${NAME:?message}`)."""
    return set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text()))


def env_file(tmp_path: Path, empty: str = "") -> Path:
    """.env.example, as `make up` copies it to .env, with a generated value for each secret compose requires (but
    `empty`, left empty)."""
    values = {name: "" if name == empty else secrets.token_hex(16) for name in sorted(required_variables())}
    path = tmp_path / f"compose-{empty or 'all'}.env"
    path.write_text(ENV_EXAMPLE.read_text() + "\n" + "".join(f"{name}={value}\n" for name, value in values.items()))
    return path


def docker_compose(env: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """docker-compose on the repository, reading nothing but `env` (not this run's environment, nor a .env)."""
    assert (COMPOSE_BIN / "docker-compose").exists(), f"no docker-compose in {COMPOSE_BIN}: run `make install`"
    return subprocess.run(
        [str(COMPOSE_BIN / "docker-compose"), "--project-directory", str(REPO), "--env-file", str(env)]
        + ["--file", str(COMPOSE_FILE), *args],
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")},
        capture_output=True,
        text=True,
        timeout=60,
    )


def resolved_config(env: Path) -> dict[str, Any]:
    """The file as docker-compose resolves it, read with the YAML parser docker-compose itself uses."""
    result = docker_compose(env, "config")
    assert result.returncode == 0, result.stderr
    as_json = subprocess.run(
        [str(COMPOSE_BIN / "python"), "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
        input=result.stdout,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return json.loads(as_json.stdout)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return resolved_config(env_file(tmp_path_factory.mktemp("compose")))


def test_docker_compose_accepts_the_file(tmp_path):
    result = docker_compose(env_file(tmp_path), "config", "-q")
    assert result.returncode == 0, result.stderr


def test_each_required_secret_is_in_env_example_and_named_when_missing(tmp_path):
    required = required_variables()
    assert {"POSTGRES_PASSWORD", "RABBITMQ_APP_PASSWORD", "RABBITMQ_ADMIN_PASSWORD", "WEBHOOK_SECRET"} <= required
    listed = set(re.findall(r"^(\w+)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))
    assert required <= listed, f"add to .env.example: {sorted(required - listed)}"
    for name in sorted(required):
        result = docker_compose(env_file(tmp_path, empty=name), "config", "-q")
        assert result.returncode != 0 and name in result.stderr, f"{name} empty, docker-compose said: {result.stderr}"


@pytest.mark.parametrize("resolved", [False, True], ids=["as-written", "as-resolved"])
def test_the_file_follows_the_compose_spec(tmp_path, resolved):
    document = COMPOSE_FILE
    if resolved:
        document = tmp_path / "resolved.yml"
        document.write_text(docker_compose(env_file(tmp_path), "config").stdout)
    check = subprocess.run(
        [str(VENV_BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(document)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_service_has_a_health_check_or_is_a_job_others_wait_for(config):
    services = config["services"]
    jobs = _jobs(services)
    assert "migrate" in jobs
    for name, service in services.items():
        if name not in jobs:
            assert "healthcheck" in service, f"{name} has no healthcheck"
        for dependency, spec in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency in jobs else "service_healthy"
            assert spec["condition"] == expected, f"{name} waits for {dependency} with {spec['condition']}"


# A service that names another stack host in its environment or command starts only once that host is up, through
# its `depends_on` chain. These pairs do not wait, each for the reason given.
UNAWAITED_HOSTS = {
    ("webhook-receiver", "bolna-simulator"): "the simulator waits for the receiver (its calls report there), so "
    "waiting back would be a cycle; the receiver stores webhooks without a Bolna client (provider_events.ingest)",
    ("migrate", RABBITMQ): "migrate gets the services' shared environment; `callctl db upgrade` uses the database only",
    ("migrate", "bolna-simulator"): "`callctl db upgrade` uses the database only",
    ("migrate", BUGSINK): "callctl starts no Sentry client",
}
URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s\"'<>]+")


def test_every_stack_host_a_service_names_is_up_before_it_starts(config):
    services = config["services"]
    named = {name: _named_hosts(service) & set(services) - {name} for name, service in services.items()}
    # The URL scan sees the hosts the services' shared environment names.
    assert {POSTGRES, RABBITMQ, BUGSINK, "bolna-simulator"} <= named["call-initiator"], named["call-initiator"]
    assert named["bolna-simulator"] == {"webhook-receiver"}, named["bolna-simulator"]
    unawaited = {(name, host) for name, hosts in named.items() for host in hosts - _started_after(services, name)}
    missing = sorted(unawaited - set(UNAWAITED_HOSTS))
    assert not missing, f"(service, host it names but does not wait for through depends_on): {missing}"
    stale = sorted(set(UNAWAITED_HOSTS) - unawaited)
    assert not stale, f"UNAWAITED_HOSTS lists pairs that wait, or where one does not name the other: {stale}"


def _named_hosts(service: dict[str, Any]) -> set[str]:
    """The hosts of the URLs in a service's environment values and command."""
    command = service.get("command", [])
    texts = [str(value) for value in service.get("environment", {}).values()]
    texts += [command] if isinstance(command, str) else [str(part) for part in command]
    return {urlsplit(url).hostname for text in texts for url in URL.findall(text)} - {None}


def _started_after(services: dict[str, Any], name: str) -> set[str]:
    """What a service starts after, following its `depends_on` chain through links whose condition fits the
    dependency: `service_healthy` for a server, `service_completed_successfully` for a job (no healthcheck)."""
    reached: set[str] = set()
    todo = [name]
    while todo:
        for dependency, spec in services[todo.pop()].get("depends_on", {}).items():
            fits = "service_healthy" if "healthcheck" in services[dependency] else "service_completed_successfully"
            if spec.get("condition") == fits and dependency not in reached:
                reached.add(dependency)
                todo.append(dependency)
    return reached


def test_callflow_servers_outlast_a_graceful_stop_and_report_to_bugsink_by_default(config):
    servers = {name for name, service in _callflow_services(config["services"]).items() if "healthcheck" in service}
    assert {"call-initiator", "webhook-receiver", "queue-processor", "bolna-simulator"} <= servers
    for name, service in _callflow_services(config["services"]).items():
        if name in servers:
            stop = _stop_seconds(service)
            assert _seconds(service["stop_grace_period"]) > stop, f"{name}: stop_grace_period within {stop}s"
        dsn = service["environment"].get("SENTRY_DSN")
        assert dsn is None or urlsplit(dsn).hostname == BUGSINK, f"{name} reports to {dsn}"


def test_each_image_compose_builds_is_given_the_commit_as_its_release(tmp_path):
    env = env_file(tmp_path)
    env.write_text(env.read_text() + "GIT_SHA=0123abcd\n")
    for name, service in _callflow_services(resolved_config(env)["services"]).items():
        assert (service["build"].get("args") or {}).get("GIT_SHA") == "0123abcd", f"{name} is built without GIT_SHA"


def test_data_lives_in_named_volumes_and_the_console_is_local(config):
    volumes = set(config["volumes"])
    for name in (POSTGRES, RABBITMQ, BUGSINK):
        mounted = {
            mount.split(":")[0] if isinstance(mount, str) else mount["source"] for mount in _volumes(config, name)
        }
        assert mounted & volumes, f"{name} keeps its data in no named volume"
    assert "127.0.0.1:15672:15672/tcp" in config["services"][RABBITMQ]["ports"], "the console is not on 127.0.0.1:15672"


def _stop_seconds(service: dict[str, Any]) -> float:
    """The longest stop of a Callflow server: the queue-processor's drain, else gunicorn's (every other one runs
    under shared/http/server.py)."""
    if service["command"] == ["python", "-m", "services.queue_processor"]:
        environment = {key.lower(): value for key, value in service["environment"].items()}
        return queue_processor_stop_seconds(Settings.model_validate(environment))
    return http_stop_seconds()


def _volumes(config: dict[str, Any], name: str) -> list[Any]:
    return config["services"][name].get("volumes", [])


@dataclass
class Emulated:
    """A compose service started on this machine: its process (none for a stand-in), its address, its log."""

    address: str  # host:port the other services reach it at
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log and self.log.exists() else ""


@dataclass
class ComposeOnThisMachine:
    """Runs a resolved compose file's services as this machine's processes, in `depends_on` order."""

    config: dict[str, Any]
    isolation: Isolation
    sink: SentrySink
    logs: Path
    started: dict[str, Emulated] = field(default_factory=dict)
    # A port no server listens on: what a service reaches when it names one that has not started.
    unstarted: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")

    @property
    def services(self) -> dict[str, Any]:
        return self.config["services"]

    def up(self) -> None:
        """Starts one service at a time, each once what it depends on is up (healthy, or a job done)."""
        jobs = _jobs(self.services)
        waiting = list(self.services)
        while waiting:
            startable = [
                name for name in waiting if set(self.services[name].get("depends_on", {})) <= set(self.started)
            ]
            assert startable, f"depends_on never lets {waiting} start: a cycle, or an unknown service"
            # Compose does not order services whose dependencies are met. A server goes before any job here, as
            # if the job were slow: a server that does not wait for a job it needs starts without the job's work,
            # and fails its healthcheck.
            name = min(startable, key=lambda name: name in jobs)
            self.start(name, is_job=name in jobs)
            waiting.remove(name)

    def start(self, name: str, is_job: bool) -> None:
        service = self.services[name]
        if "build" not in service:
            self.started[name] = self._stand_in(name)
            return
        port = None if is_job else free_port()
        env = self.environment(name, port)
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*service.get("entrypoint", []), *service["command"]],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        emulated = Emulated(f"127.0.0.1:{port}" if port else self.unstarted, process, log)
        self.started[name] = emulated
        if is_job:
            code = process.wait(HEALTH_TIMEOUT_SECONDS)
            assert code == 0, f"{name} exited with {code}:\n{emulated.logs()}"
        else:
            self._wait_healthy(name, emulated, env)

    def environment(self, name: str, port: int | None) -> dict[str, str]:
        """The service's own environment, its addresses and credentials mapped to this machine; a server's PORT
        becomes `port`."""
        own = {key: str(value) for key, value in self.services[name].get("environment", {}).items()}
        mapped = {key: self._map_url(name, value) if "://" in value else value for key, value in own.items()}
        if port is not None:
            assert "PORT" in own, f"{name} sets no PORT, which its healthcheck and the other services' URLs rely on"
            mapped["PORT"] = str(port)
        return {"PATH": f"{VENV_BIN}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/"), **mapped}

    def stop(self) -> None:
        for emulated in reversed(self.started.values()):
            stop_process(emulated.process)

    def _map_url(self, name: str, url: str) -> str:
        parts = urlsplit(url)
        host = parts.hostname
        if host not in self.services:
            return url  # outside the stack (another Sentry, a real Bolna)
        listens_on = THIRD_PARTY_PORTS.get(host) or int(self.services[host]["environment"]["PORT"])
        assert parts.port == listens_on, f"{name} names {host}:{parts.port}, which listens on {listens_on}: {url}"
        reachable = host in self.started
        address = self.started[host].address if reachable else self.unstarted
        if host == POSTGRES:
            self._check_postgres_credentials(name, parts)
            netloc, path = (MACHINE_POSTGRES_NETLOC, f"/{self.isolation.name}") if reachable else (address, parts.path)
            return urlunsplit(parts._replace(netloc=netloc, path=path))
        if host == RABBITMQ:
            self._check_rabbitmq_credentials(name, parts)
            netloc, path = (MACHINE_RABBITMQ_NETLOC, f"/{self.isolation.name}") if reachable else (address, parts.path)
            return urlunsplit(parts._replace(netloc=netloc, path=path))
        userinfo = f"{parts.username}@" if parts.username else ""  # a DSN's key
        return urlunsplit(parts._replace(netloc=f"{userinfo}{address}"))

    def _check_postgres_credentials(self, name: str, url: Any) -> None:
        server = self.services[POSTGRES]["environment"]
        named = (url.username, url.password, url.path.lstrip("/"))
        expected = (server["POSTGRES_USER"], server["POSTGRES_PASSWORD"], server["POSTGRES_DB"])
        assert named == expected, f"{name} logs in to PostgreSQL as user, password, database {named}, not {expected}"

    def _check_rabbitmq_credentials(self, name: str, url: Any) -> None:
        """The user is one rabbitmq.conf seeds, for this vhost, with the password compose gives the broker; the vhost
        is the one the definitions create."""
        conf = RABBITMQ_CONF.read_text()
        vhost = url.path.lstrip("/")
        pattern = re.search(rf"^default_users\.{re.escape(url.username)}\.vhost_pattern = (.+)$", conf, re.MULTILINE)
        assert pattern, f"{name} connects as {url.username}, a user {RABBITMQ_CONF.name} does not seed"
        assert re.fullmatch(pattern.group(1).strip(), vhost), f"{url.username} may not use vhost {vhost}"
        definitions = json.loads(RABBITMQ_DEFINITIONS.read_text())
        assert vhost in {v["name"] for v in definitions["vhosts"]}, f"{name} uses vhost {vhost}, which nothing creates"
        broker = self.services[RABBITMQ]["environment"]
        assert url.password in broker.values(), f"{name}'s RabbitMQ password is none the broker is given"

    def _stand_in(self, name: str) -> Emulated:
        """Third-party servers: this machine's PostgreSQL and RabbitMQ (checked with the file's own healthcheck), and
        a Sentry sink for Bugsink; Bugsink's own setup job has nothing to do here."""
        healthcheck = self.services[name].get("healthcheck", {}).get("test", [])
        if name == POSTGRES:
            _run_check(name, healthcheck, dict(os.environ))
            return Emulated("127.0.0.1:5432")
        if name == RABBITMQ:
            _run_check(name, healthcheck, dict(os.environ))
            return Emulated("127.0.0.1:5672")
        if name == BUGSINK:
            return Emulated(f"127.0.0.1:{urlsplit(self.sink.dsn).port}")
        assert name == f"{BUGSINK}-setup", f"no stand-in for {name} ({self.services[name].get('image')})"
        return Emulated(self.unstarted)

    def _wait_healthy(self, name: str, emulated: Emulated, env: dict[str, str]) -> None:
        healthcheck = self.services[name]["healthcheck"]["test"]
        deadline = time.monotonic() + HEALTH_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            assert emulated.process and emulated.process.poll() is None, f"{name} exited:\n{emulated.logs()}"
            if _check(healthcheck, env).returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"{name} not healthy after {HEALTH_TIMEOUT_SECONDS}s:\n{emulated.logs()}")


def _check(healthcheck: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    kind, *argv = healthcheck
    assert kind in ("CMD", "CMD-SHELL"), f"unknown healthcheck form {kind}"
    command = ["sh", "-c", *argv] if kind == "CMD-SHELL" else argv
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=30)


def _run_check(name: str, healthcheck: list[str], env: dict[str, str]) -> None:
    result = _check(healthcheck, env)
    assert result.returncode == 0, f"{name}'s healthcheck {healthcheck} failed: {result.stdout}{result.stderr}"


def _jobs(services: dict[str, Any]) -> set[str]:
    """One-shot services: those another service waits for to complete."""
    return {
        dependency
        for service in services.values()
        for dependency, spec in service.get("depends_on", {}).items()
        if spec["condition"] == "service_completed_successfully"
    }


def _callflow_services(services: dict[str, Any]) -> dict[str, Any]:
    return {name: service for name, service in services.items() if "build" in service}


def _seconds(duration: str) -> float:
    """A compose duration (`45s`, `1m30s`) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture
def compose_stack(config: dict[str, Any], tmp_path: Path) -> Iterator[ComposeOnThisMachine]:
    isolation = Isolation.new()  # the vhost is created here; the database is the migrate job's to create
    with ExitStack() as cleanup:
        isolation.create()
        cleanup.callback(isolation.destroy)
        sink = SentrySink().start()
        cleanup.callback(sink.stop)
        stack = ComposeOnThisMachine(config, isolation, sink, tmp_path)
        cleanup.callback(stack.stop)
        stack.up()
        yield stack


def _callctl(stack: ComposeOnThisMachine, *args: str) -> dict[str, Any]:
    """`docker compose exec call-initiator callctl ... --json`: in the call-initiator's environment."""
    env = stack.environment("call-initiator", int(stack.started["call-initiator"].address.rsplit(":", 1)[1]))
    result = subprocess.run(
        ["callctl", *args, "--json"], env=env, cwd=REPO, capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.timeout(300)
def test_the_stack_comes_up_in_order_from_nothing_and_places_calls(compose_stack):
    user = _callctl(compose_stack, "users", "create", "--email", "ada@example.com", "--max-concurrent-calls", "1")
    agent = _callctl(
        compose_stack, "agents", "create", "--user-id", user["id"], "--name", "Maya", "--provider-agent-id", AGENT
    )
    api = f"http://{compose_stack.started['call-initiator'].address}/api/calls"
    auth = {"Authorization": f"Bearer {user['api_token']}"}
    body = {"agentId": agent["id"], "phoneNumber": PHONE}
    with httpx.Client(timeout=30, headers=auth) as http:
        # The first call is placed with the simulator at once; at a limit of one, the second waits in the queue for
        # the queue-processor, which places it when the first one's webhooks free the line.
        placed, queued = http.post(api, json=body), http.post(api, json=body)
        assert (placed.status_code, queued.status_code) == (201, 202), placed.text + queued.text

        def finished() -> list[str] | None:
            views = [http.get(f"{api}/{response.json()['callId']}").json() for response in (placed, queued)]
            found = [view["status"] for view in views]
            return found if all(statuses.is_terminal(status) for status in found) else None

        assert wait_until(finished, 120, "both calls reach a terminal status") == ["completed", "completed"]
