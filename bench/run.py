"""`make bench`: Callflow's performance figures, each against a baseline measured in the same run.

The whole stack runs as real processes (as in the end-to-end tests) with production's Sentry settings, sending to
a local endpoint that counts envelopes and keeps nothing (`SentrySink(keep=False)`), on a database and vhost of its
own, dropped at the end. A year of history is seeded first, and every figure is measured on top of it; webhook
ingest also on a second, empty database, by a receiver of its own, in turn with the one on the history. Targets
are ratios to the baselines, except where the issue sets an absolute bound. Prints one table and writes the same
data to bench/results/latest.json. Exits 1 when a measurement failed (an unexpected answer, a socket error, a
webhook answered but not applied); a target missed is a figure, not a failure.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
from rich.console import Console
from rich.table import Table

from bench import seed
from bench.load import LoadFailure, WrkResult, alternating, wrk
from shared.bolna.execution import CONTEXT_CALL_ID_KEY
from shared.core import migrate
from shared.messaging.publisher import Envelope
from shared.messaging.topology import EVENTS_EXCHANGE, MessageType, open_channel
from tests.conftest import WEBHOOK_SECRET
from tests.support.isolation import Isolation, drop_database
from tests.support.processes import ServiceProcess, free_port
from tests.support.sentry_sink import SentrySink
from tests.support.stack import BOLNA_API_KEY, FAST_CALLS, Stack, running_stack

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "latest.json"

WARM_UP_SECONDS = 2
MEASURE_SECONDS = 8
# Webhook ingest and its baselines are measured in turn, round after round, MEASURE_SECONDS each in all, each round
# starting with the next of them: whatever the shared machine does meanwhile falls on each of them in turn, rather
# than on whichever ran when it happened. So is the receiver on an empty database, to compare the history's cost alike.
INGEST_ROUNDS = 4
# Between rounds, the work a round leaves behind (its messages published and consumed, its Sentry envelopes sent)
# is done before the next round starts, rather than charged to it.
ROUND_PAUSE_SECONDS = 0.5
ROUNDS = 200  # sequential requests per figure at one connection
WARM_UP_ROUNDS = 20
# Seeded calls per wrk run, each taking four webhooks: room for 10,000 webhooks/s (a run that runs out fails).
WARM_UP_CALLS = 5_000
MEASURED_CALLS = 20_000
INGEST_CUSTOMERS = 1_000  # the seeded calls' owners: each `completed` charges one of them
API_CUSTOMERS = 300
DISPATCH_CUSTOMERS = 300
DISPATCH_CALLS_PER_CUSTOMER = 4
DISPATCH_DEADLINE_SECONDS = 30  # a slower dispatcher is measured on the calls placed by then
CREDITS = 1_000_000_000
NO_LIMIT = 1_000_000
CAMPAIGN_CONTACTS = 10_000  # at most 10,000: their numbers are +1 415 555 0000 to 9999
WARM_UP_CONTACTS = 100  # a fresh server's first upload also loads what a worker loads once (phone number metadata)
UPLOAD_FORMS = ("JSON", "CSV")
CAMPAIGN_LIMIT = 200  # the concurrent calls of the customer whose campaign is uploaded
CAMPAIGN_DISPATCH_SECONDS = 15  # the campaign's calls placed in that time, or all of them if sooner

PRODUCTION_SENTRY = {
    "SENTRY_ENVIRONMENT": "production",
    "SENTRY_TRACES_SAMPLE_RATE": "0.2",
    "SENTRY_PROFILES_SAMPLE_RATE": "0.1",
    "SENTRY_RELEASE": "callflow@bench",
}
# Every call Bolna accepts sends its `queued` webhook at once and then stays live for the rest of the run (it
# holds its slot, so the limits above are high): each placed call costs one webhook, as in the first seconds of a
# real call, without a flood of later statuses competing with the figures measured after it.
LIVE_FOR_THE_RUN = {**FAST_CALLS, "step_delay_seconds": 3600.0}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of /proc/<pid>/stat's CPU times
CPU_READ_ATTEMPTS = 5
T = TypeVar("T")
console = Console(width=None if sys.stdout.isatty() else 150)  # a log file gets the whole table unwrapped


@dataclass(frozen=True)
class Row:
    figure: str
    baseline_is: str
    unit: str
    callflow: float | None
    baseline: float | None
    target: str
    met: Callable[[float, float | None], bool] | None  # (callflow, baseline) -> whether the target holds
    difference: bool = False  # compared as callflow - baseline rather than callflow / baseline
    absolute: bool = False  # the target bounds Callflow's own value: it holds or not whatever the baseline

    @property
    def ratio(self) -> float | None:
        if self.callflow is None or self.baseline is None:
            return None
        return self.callflow - self.baseline if self.difference else self.callflow / self.baseline

    @property
    def measured(self) -> bool:
        return self.callflow is not None and (self.baseline is not None or self.absolute)

    @property
    def target_met(self) -> bool | None:
        if self.met is None or not self.measured:
            return None
        return self.met(self.callflow, self.baseline)

    def as_json(self) -> dict[str, Any]:
        return {
            "figure": self.figure,
            "baseline_is": self.baseline_is,
            "unit": self.unit,
            "callflow": _rounded(self.callflow),
            "baseline": _rounded(self.baseline),
            "comparison": "difference" if self.difference else "ratio",
            "ratio": _rounded(self.ratio, 3),
            "target": self.target,
            "met": self.target_met,
        }


def _rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(frozen=True)
class IngestDatabase:
    """A database webhooks are ingested into: where their calls are seeded and checked, and the calls' owners."""

    conn: psycopg.Connection
    owners: list[seed.Customer]


@dataclass(frozen=True)
class IngestServer:
    """A server the webhook-ingest figures are measured on. One that applies the webhooks to a `database` has their
    calls seeded there, and is checked to have applied (and `bills`: billed) every webhook it answered. Each run
    also reads the CPU its processes used."""

    process: ServiceProcess
    database: IngestDatabase | None  # None: it applies nothing
    bills: bool = True


class Bench:
    def __init__(self, database_url: str, empty_database_url: str, logs: Path):
        self.database_url = database_url
        self.empty_database_url = empty_database_url
        self.logs = logs
        self.conn = seed.connect(database_url)
        self.empty_conn = seed.connect(empty_database_url)
        self.measurements: dict[str, Any] = {}
        self.failures: dict[str, str] = {}
        self.seeding_seconds: float | None = None
        self._next_call = 1

    def measure(self, name: str, measurement: Callable[[], T]) -> T | None:
        """Runs one measurement and keeps its numbers; one that fails is reported and the run goes on."""
        started = time.monotonic()
        try:
            result = measurement()
        except LoadFailure as exc:
            self.failures[name] = str(exc)
            console.print(f"[red]{name}: FAILED[/red] {exc}")
            return None
        self.measurements[name] = _as_json(result)
        console.print(f"{name}: measured in {time.monotonic() - started:.0f} s")
        return result

    def run(self, sink: SentrySink) -> list[Row]:
        with running_stack(sink, self.logs, PRODUCTION_SENTRY, LIVE_FOR_THE_RUN) as stack:
            console.print("seeding 1,000,000 calls and 4,000,000 webhooks ...")
            self.seeding_seconds = seed.history(self.database_url)
            console.print(f"seeded the history in {self.seeding_seconds:.1f} s (VACUUM ANALYZE included)")
            history, empty = (
                IngestDatabase(conn, seed.customers(conn, INGEST_CUSTOMERS, CREDITS, NO_LIMIT))
                for conn in (self.conn, self.empty_conn)
            )
            without_sentry = {**PRODUCTION_SENTRY, "SENTRY_DSN": ""}
            on_empty = {**stack.webhook_receiver.env, "DATABASE_URL": self.empty_database_url}
            with self.serving("bench.baselines.echo", {}) as echo:
                with (
                    self.serving("bench.baselines.durable_ingest", {}) as durable_ingest,
                    self.serving("services.webhook_receiver", without_sentry) as unobserved,
                    self.serving("services.webhook_receiver", on_empty) as receiver_on_empty,
                ):
                    servers = {
                        "bare Flask echo": IngestServer(echo, database=None),
                        "minimal durable ingest": IngestServer(durable_ingest, history, bills=False),
                        "webhook ingest": IngestServer(stack.webhook_receiver, history),
                        "webhook ingest without Sentry": IngestServer(unobserved, history),
                        "webhook ingest, empty database": IngestServer(receiver_on_empty, empty),
                    }
                    in_turn = self.measure(
                        "webhook ingest and its baselines, in turn", lambda: self.ingest_in_turn(servers)
                    )
                bare, durable, ingest, no_sentry, empty_ingest = (
                    in_turn[name] if in_turn else None for name in servers
                )
                placed = self.measure("POST /api/calls -> 201", lambda: self.placed_calls(stack))
                queued = self.measure("POST /api/calls -> 202", lambda: self.queued_calls(stack, echo.url))
                api = self.measure("POST /api/calls at 16 connections", lambda: self.api_load(stack))
                dispatch = self.measure("dispatch burst", lambda: self.dispatch_burst(stack))
                uploads = {
                    form: self.measure(f"POST /api/campaigns as {form}", lambda form=form: self.upload(stack, form))
                    for form in UPLOAD_FORMS
                }
                campaign = self.measure("campaign dispatch", lambda: self.campaign_dispatch(stack))
                memory = {_service_name(process): _rss_mib(process) for process in stack.processes}
                memory["bare Flask echo"] = _rss_mib(echo)
                self.measurements["rss_mib"] = memory
        return _rows(
            empty_ingest, bare, durable, ingest, no_sentry, placed, queued, api, dispatch, uploads, campaign, memory
        )

    @contextmanager
    def serving(self, module: str, env: dict[str, str]) -> Iterator[ServiceProcess]:
        """A process of its own, under the same gunicorn settings as the stack's services."""
        process = ServiceProcess(module, free_port(), {"WEB_CONCURRENCY": "2", **env}, self.logs).start()
        try:
            yield process
        finally:
            process.stop()

    def ingest_in_turn(self, servers: dict[str, IngestServer]) -> dict[str, WrkResult]:
        """Unique webhooks at 16 connections to each server, each on calls of its own: a warm-up each, then in turn
        for INGEST_ROUNDS rounds of a share of MEASURE_SECONDS each, each round starting with the next server; each
        server's rounds taken as one run."""
        for server in servers.values():
            self._webhooks(server, WARM_UP_SECONDS, WARM_UP_CALLS)
        names = list(servers)
        rounds: dict[str, list[WrkResult]] = {name: [] for name in names}
        for round_number in range(INGEST_ROUNDS):
            first = round_number % len(names)
            for name in names[first:] + names[:first]:
                rounds[name].append(
                    self._webhooks(servers[name], MEASURE_SECONDS / INGEST_ROUNDS, MEASURED_CALLS // INGEST_ROUNDS)
                )
        return {name: WrkResult.of_rounds(runs) for name, runs in rounds.items()}

    def _webhooks(self, server: IngestServer, seconds: float, calls: int) -> WrkResult:
        """One run; its CPU includes the pause after it, in which the server finishes the run's background work."""
        first, self._next_call = self._next_call, self._next_call + calls
        if server.database is not None:
            seed.live_calls(server.database.conn, first, calls, server.database.owners)
        target = f"{server.process.url}/webhooks/bolna?token={WEBHOOK_SECRET}"
        cpu_before = _cpu_seconds(server.process)
        result = wrk("webhooks.lua", target, [str(first), str(calls)], seconds, expected={200})
        if server.database is not None:
            self._check_applied(server.database.conn, first, calls, server.bills)
        time.sleep(ROUND_PAUSE_SECONDS)
        return replace(result, cpu_seconds=_cpu_seconds(server.process) - cpu_before)

    def _check_applied(self, conn: psycopg.Connection, first: int, calls: int, bills: bool) -> None:
        """A 200 must stand for the work: webhooks of the run stored, every one applied to its call, and every call
        completed billed (a slow run may end before any call reached `completed`). Requests still in flight when wrk
        stopped get a few seconds to finish."""
        deadline = time.monotonic() + 5
        while True:
            stored, unapplied, completed, unbilled = conn.execute(
                """
                SELECT count(*),
                       count(*) FILTER (WHERE webhook_events.applied_at IS NULL),
                       count(DISTINCT calls.id) FILTER (WHERE calls.status = 'completed'),
                       count(DISTINCT calls.id) FILTER (WHERE calls.status = 'completed' AND credits_charged IS NULL)
                FROM webhook_events JOIN calls USING (execution_id)
                WHERE execution_id BETWEEN %s AND %s
                """,
                (seed.execution_id(first), seed.execution_id(first + calls - 1)),
            ).fetchone()
            unbilled = unbilled if bills else 0
            if stored and not (unapplied or unbilled):
                return
            if time.monotonic() > deadline:
                raise LoadFailure(
                    f"after the run: {stored} webhooks stored, {unapplied} not applied, {completed} calls completed, "
                    f"{unbilled} of them not billed"
                )
            time.sleep(0.2)

    def placed_calls(self, stack: Stack) -> dict[str, Any]:
        """POST /api/calls answered 201 against Bolna's own answer to the POST /call it makes, one at a time."""
        [owner] = seed.customers(self.conn, 1, CREDITS, NO_LIMIT)
        request = {"agentId": str(owner.agent_id), "phoneNumber": seed.PHONE_NUMBER}
        bolna = {"Authorization": f"Bearer {BOLNA_API_KEY}"}

        def provider() -> httpx.Response:
            # The body BolnaClient.place_call sends.
            body = {
                "agent_id": str(owner.provider_agent_id),
                "recipient_phone_number": seed.PHONE_NUMBER,
                "user_data": {CONTEXT_CALL_ID_KEY: str(uuid.uuid4())},
                "retry_config": {"enabled": False},
            }
            return stack.http.post(f"{stack.simulator.url}/call", json=body, headers=bolna)

        callflow, bolna_answer = alternating(
            lambda: stack.api("POST", "/api/calls", json=request, headers=owner.auth),
            provider,
            expected=(201, 200),
            rounds=ROUNDS,
            warm_up=WARM_UP_ROUNDS,
        )
        return {"callflow": callflow.as_json(), "provider": bolna_answer.as_json()}

    def queued_calls(self, stack: Stack, echo_url: str) -> dict[str, Any]:
        """POST /api/calls answered 202 (the customer is at its limit: no Bolna request) against the bare echo."""
        [owner] = seed.customers(self.conn, 1, CREDITS, max_concurrent_calls=1)
        request = {"agentId": str(owner.agent_id), "phoneNumber": seed.PHONE_NUMBER}
        first = stack.api("POST", "/api/calls", json=request, headers=owner.auth)
        if first.status_code != 201:  # the call that holds the only slot for the rest of the run
            raise LoadFailure(f"the call taking the only slot: {first.status_code} {first.text}")
        callflow, echo = alternating(
            lambda: stack.api("POST", "/api/calls", json=request, headers=owner.auth),
            lambda: stack.http.post(f"{echo_url}/api/calls", json=request, headers=owner.auth),
            expected=(202, 200),
            rounds=ROUNDS,
            warm_up=WARM_UP_ROUNDS,
        )
        return {"callflow": callflow.as_json(), "echo": echo.as_json()}

    def api_load(self, stack: Stack) -> WrkResult:
        """POST /api/calls at 16 connections, customer after customer, every call placed with Bolna (201)."""
        owners = seed.customers(self.conn, API_CUSTOMERS, CREDITS, NO_LIMIT)
        listing = self.logs / "api-customers.txt"
        listing.write_text("".join(f"{owner.token} {owner.agent_id}\n" for owner in owners))
        url = f"{stack.call_initiator.url}/api/calls"
        wrk("place_calls.lua", url, [str(listing)], WARM_UP_SECONDS, expected={201})
        return wrk("place_calls.lua", url, [str(listing)], MEASURE_SECONDS, expected={201})

    def dispatch_burst(self, stack: Stack) -> dict[str, Any]:
        """Queued calls woken at once, one `call.queued` message each (what POST /api/calls publishes for a call it
        queues): calls per second from the first message until Bolna accepted them all."""
        owners = seed.customers(self.conn, DISPATCH_CUSTOMERS, CREDITS, NO_LIMIT)
        queued = seed.pending_calls(self.conn, owners, DISPATCH_CALLS_PER_CUSTOMER)
        # Bolna only answers: the webhooks of the calls placed are the ingest figures' business, not dispatch's.
        stack.sim_config(webhook_drop_rate=1.0)
        agents = [str(owner.provider_agent_id) for owner in owners]
        # Not confirmed: one confirm at a time, the benchmark publishes about 280 messages a second here, and would
        # measure its own publishing rather than the dispatcher (a message lost would show as a call not placed).
        with open_channel(os.environ["RABBITMQ_URL"], confirmed=False) as channel:
            started = time.monotonic()
            for user_id, call_id in queued:
                message = Envelope(MessageType.CALL_QUEUED, {"user_id": user_id, "call_id": call_id})
                channel.basic_publish(
                    EVENTS_EXCHANGE, message.message_type, message.encode(), message.properties(), mandatory=True
                )
            published = time.monotonic() - started
        placed = 0
        while placed < len(queued) and time.monotonic() - started < DISPATCH_DEADLINE_SECONDS:
            time.sleep(0.05)
            placed = _live_calls_of(stack, agents)
        seconds = time.monotonic() - started
        # Calls still queued at the deadline would hold the placing threads through the next figure (campaign
        # dispatch shares them): they are placed, uncounted, before it starts.
        left = len(queued) - placed
        while left and time.monotonic() - started < 2 * DISPATCH_DEADLINE_SECONDS:
            time.sleep(0.2)
            left = len(queued) - _live_calls_of(stack, agents)
        if left:
            console.print(f"[yellow]dispatch burst: {left} calls still queued as the campaign figure starts[/yellow]")
        return {
            "calls": len(queued),
            "placed": placed,
            "left_queued_after_the_drain": left,
            "seconds": round(seconds, 2),
            "publishing_seconds": round(published, 2),
            "calls_per_second": round(placed / seconds, 1),
        }

    def upload(self, stack: Stack, form: str) -> dict[str, Any]:
        """POST /api/campaigns creating CAMPAIGN_CONTACTS contacts sent as `form`, against the bare echo given the
        same body: each on a fresh server of one gunicorn worker, warmed up by a small upload, so that neither an
        earlier request's memory nor a first request's imports blur this one's. The request's wall time, and how far
        the server's resident memory rose above what it was before."""
        [owner] = seed.customers(self.conn, 1, CREDITS, CAMPAIGN_LIMIT)
        warm_up, measured = (
            _campaign_request(owner, contacts, form) for contacts in (WARM_UP_CONTACTS, CAMPAIGN_CONTACTS)
        )
        results: dict[str, Any] = {"body_bytes": len(measured["content"])}
        one_worker = {"WEB_CONCURRENCY": "1"}
        for side, module, env, status in (
            ("callflow", "services.call_initiator", {**stack.call_initiator.env, **one_worker}, 201),
            ("echo", "bench.baselines.echo", one_worker, 200),
        ):
            with self.serving(module, env) as server:
                _measured_post(server, "/api/campaigns", warm_up, status)
                answer, results[side] = _measured_post(server, "/api/campaigns", measured, status)
            if side == "callflow" and (stored := answer.json()["contacts"]) != CAMPAIGN_CONTACTS:
                raise LoadFailure(f"the campaign holds {stored} of {CAMPAIGN_CONTACTS} contacts")
        return results

    def campaign_dispatch(self, stack: Stack) -> dict[str, Any]:
        """A campaign of CAMPAIGN_CONTACTS contacts, its customer without a limit, started while Bolna answers at once
        and its calls stay live (as in the dispatch burst): the campaign's calls Bolna accepted per second, from the
        start request until every contact was called or CAMPAIGN_DISPATCH_SECONDS passed."""
        [owner] = seed.customers(self.conn, 1, CREDITS, NO_LIMIT)
        created = stack.api("POST", "/api/campaigns", **_campaign_request(owner, CAMPAIGN_CONTACTS, "JSON"))
        if created.status_code != 201:
            raise LoadFailure(f"creating the campaign: {created.status_code} {created.text[:500]}")
        campaign = f"/api/campaigns/{created.json()['campaignId']}"
        stack.sim_config(webhook_drop_rate=1.0)  # as the dispatch burst: the figure is dispatch's, not ingest's
        accepted_before = stack.sim_stats()["calls_accepted"]
        started = time.monotonic()
        answer = stack.api("POST", f"{campaign}/start", headers=owner.auth)
        if answer.status_code != 200:
            raise LoadFailure(f"starting the campaign: {answer.status_code} {answer.text[:500]}")
        placed = 0
        while placed < CAMPAIGN_CONTACTS and time.monotonic() - started < CAMPAIGN_DISPATCH_SECONDS:
            time.sleep(0.1)
            placed = stack.sim_stats()["calls_accepted"] - accepted_before
        seconds = time.monotonic() - started
        # Canceled, so that the contacts left are never called: the memory figures come after the run, not under it.
        stack.api("POST", f"{campaign}/cancel", headers=owner.auth)
        return {
            "contacts": CAMPAIGN_CONTACTS,
            "placed": placed,
            "seconds": round(seconds, 2),
            "calls_per_second": round(placed / seconds, 1),
            "calls_by_status": stack.api("GET", campaign, headers=owner.auth).json()["calls"],
        }


def _as_json(value: Any) -> Any:
    if hasattr(value, "as_json"):
        return value.as_json()
    if isinstance(value, dict):
        return {key: _as_json(item) for key, item in value.items()}
    return value


def _live_calls_of(stack: Stack, agents: list[str]) -> int:
    """The simulator's live calls of these agents: no call of the run ends (LIVE_FOR_THE_RUN)."""
    active = stack.sim_stats()["active_calls"]
    return sum(active.get(agent, 0) for agent in agents)


def _campaign_request(owner: seed.Customer, contacts: int, form: str) -> dict[str, Any]:
    """The httpx arguments of POST /api/campaigns creating `contacts` contacts, each with a name and two variables:
    a JSON body, or a CSV body with the settings in the query string."""
    settings = {"name": f"Bench {form} campaign", "agentId": str(owner.agent_id)}
    listed = [(f"+1415555{n:04d}", f"Contact {n}", f"ref-{n}") for n in range(contacts)]
    if form == "CSV":
        rows = "".join(f"{number},{name},{reference},gold\n" for number, name, reference in listed)
        return {
            "params": settings,
            "content": ("phone_number,name,customer_ref,plan\n" + rows).encode(),
            "headers": {**owner.auth, "Content-Type": "text/csv"},
        }
    body = {
        **settings,
        "contacts": [
            {"phoneNumber": number, "name": name, "variables": {"customer_ref": reference, "plan": "gold"}}
            for number, name, reference in listed
        ],
    }
    # Encoded here, so the request's wall time is the server's and the transport's alone.
    return {"content": json.dumps(body).encode(), "headers": {**owner.auth, "Content-Type": "application/json"}}


def _measured_post(
    server: ServiceProcess, path: str, request: dict[str, Any], expected: int
) -> tuple[httpx.Response, dict[str, float]]:
    """POSTs `request` (any answer but `expected` fails), timing it; and the peak resident memory of the server's
    processes while it ran (their VmHWM, reset just before) less their resident memory before, summed over them."""
    pids = _process_tree(server)
    before = {pid: _status_kib(pid, "VmRSS") for pid in pids}
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak restarts from the resident memory now
    started = time.perf_counter()
    answer = httpx.post(f"{server.url}{path}", timeout=60, **request)
    seconds = time.perf_counter() - started
    if answer.status_code != expected:
        raise LoadFailure(f"{server.module} POST {path}: {answer.status_code} {answer.text[:500]}")
    growth_kib = sum(_status_kib(pid, "VmHWM") - before[pid] for pid in pids)
    return answer, {"ms": round(seconds * 1000, 1), "peak_growth_mib": round(growth_kib / 1024, 1)}


def _service_name(process: ServiceProcess) -> str:
    return process.module.rsplit(".", 1)[-1].replace("_", "-")


def _process_tree(process: ServiceProcess) -> list[int]:
    """A service's main process (a gunicorn master) and every process under it."""
    assert process.process is not None
    pending, found = [process.process.pid], []
    while pending:
        pid = pending.pop()
        found.append(pid)
        try:
            for children in Path(f"/proc/{pid}").glob("task/*/children"):
                pending.extend(int(child) for child in children.read_text().split())
        except OSError:  # a thread or process gone since it was listed
            continue
    return found


def _cpu_seconds(process: ServiceProcess) -> float:
    """CPU (user and system) a service has used: its processes', and that of the ones they outlived (a gunicorn
    worker replaced after its `max_requests` counts in its master's). Read again if a worker was reaped while the
    tree was read, which could leave its CPU out of both (a few times at most: workers are replaced seconds apart)."""
    for _ in range(CPU_READ_ATTEMPTS):
        tree = _process_tree(process)  # the master first
        reaped = _cpu_times(tree[0])[2:]
        ticks = sum(sum(_cpu_times(pid)) for pid in tree)
        if _cpu_times(tree[0])[2:] == reaped:
            break
    return ticks / CLOCK_TICKS


def _cpu_times(pid: int) -> list[int]:
    """utime, stime, cutime and cstime of /proc/<pid>/stat, in clock ticks; zeros for a process gone since it was
    listed."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return [0, 0, 0, 0]
    return [int(field) for field in stat.rsplit(")", 1)[1].split()[11:15]]


def _status_kib(pid: int, field: str) -> int:
    """A memory figure of /proc/<pid>/status, such as VmRSS (resident now) or VmHWM (the peak of it)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:"))


def _rss_mib(process: ServiceProcess) -> float:
    """Resident memory of a service: its main process and every process under it."""
    return round(sum(_status_kib(pid, "VmRSS") for pid in _process_tree(process)) / 1024, 1)


def _rows(
    empty: WrkResult | None,
    bare: WrkResult | None,
    durable: WrkResult | None,
    ingest: WrkResult | None,
    no_sentry: WrkResult | None,
    placed: dict[str, Any] | None,
    queued: dict[str, Any] | None,
    api: WrkResult | None,
    dispatch: dict[str, Any] | None,
    uploads: dict[str, dict[str, Any] | None],
    campaign: dict[str, Any] | None,
    memory: dict[str, float],
) -> list[Row]:
    def rate(result: WrkResult | None) -> float | None:
        return result.requests_per_second if result else None

    def cpu(result: WrkResult | None) -> float | None:
        return result.cpu_ms_per_request if result else None

    def p50(result: dict[str, Any] | None, side: str) -> float | None:
        return result[side]["p50_ms"] if result else None

    def at_least(share: float) -> Callable[[float, float | None], bool]:
        return lambda callflow, baseline: baseline is not None and callflow >= share * baseline

    def upload(form: str, side: str, figure: str) -> float | None:
        result = uploads[form]
        return result[side][figure] if result else None

    burst = f"{dispatch['placed']:,} of {dispatch['calls']:,} calls placed" if dispatch else "queued calls"
    called = f"{campaign['placed']:,} of {CAMPAIGN_CONTACTS:,} contacts called" if campaign else "its contacts"
    echo_memory = "bare Flask echo, same gunicorn setup"
    echo_upload = "bare Flask echo, same body"
    campaign_rows = [
        row
        for form in UPLOAD_FORMS
        for row in (
            Row(f"POST /api/campaigns, {CAMPAIGN_CONTACTS:,} contacts as {form}", echo_upload, "ms",
                upload(form, "callflow", "ms"), upload(form, "echo", "ms"), "< 5 s",
                lambda callflow, _: callflow < 5000, absolute=True),
            Row(f"POST /api/campaigns as {form}: call-initiator peak RSS growth", echo_upload, "MiB",
                upload(form, "callflow", "peak_growth_mib"), upload(form, "echo", "peak_growth_mib"), "< 300 MiB",
                lambda callflow, _: callflow < 300, absolute=True),
        )
    ]  # fmt: skip
    return [
        Row("webhook ingest, 16 connections", "minimal durable ingest", "req/s", rate(ingest), rate(durable),
            "≥ 75%", at_least(0.75)),
        Row("webhook ingest p99, 16 connections", "minimal durable ingest", "ms", ingest and ingest.p99_ms,
            durable and durable.p99_ms, "< 100 ms", lambda callflow, _: callflow < 100, absolute=True),
        Row("webhook ingest, 16 connections", "bare Flask echo", "req/s", rate(ingest), rate(bare), "—", None),
        Row("webhook ingest, 1M calls vs empty", "the same on an empty database, in turn", "req/s", rate(ingest),
            rate(empty), "≥ 90%", at_least(0.9)),
        Row("webhook ingest, production Sentry", "the same, Sentry not initialised", "req/s", rate(ingest),
            rate(no_sentry), "≥ 90%", at_least(0.9)),
        Row("webhook ingest: the server's CPU per webhook", "minimal durable ingest", "ms", cpu(ingest),
            cpu(durable), "—", None),
        Row("webhook ingest: the server's CPU per webhook, production Sentry", "the same, Sentry not initialised",
            "ms", cpu(ingest), cpu(no_sentry), "—", None),
        Row("POST /api/calls → 201, p50, 1 connection", "Bolna's answer to POST /call (simulator)", "ms",
            p50(placed, "callflow"), p50(placed, "provider"), "≤ +10 ms",
            lambda callflow, baseline: callflow - baseline <= 10, difference=True),
        Row("POST /api/calls → 202, p50, 1 connection", "bare Flask echo", "ms", p50(queued, "callflow"),
            p50(queued, "echo"), "≤ 8 ms", lambda callflow, _: callflow <= 8, absolute=True),
        Row(f"POST /api/calls → 201, 16 connections, {API_CUSTOMERS} customers", "webhook ingest", "req/s",
            rate(api), rate(ingest), "≥ 50%", at_least(0.5)),
        Row(f"dispatch burst: {burst}", "simulator POST /call, 1 connection", "calls/s",
            dispatch and dispatch["calls_per_second"], placed and placed["provider"]["requests_per_second"],
            "≥ 300 calls/s", lambda callflow, _: callflow >= 300, absolute=True),
        *campaign_rows,
        Row(f"campaign dispatch, no limit: {called}", "dispatch burst (direct calls), this run",
            "calls/s", campaign and campaign["calls_per_second"], dispatch and dispatch["calls_per_second"],
            "≥ 100%", at_least(1.0)),
        Row("RSS of call-initiator after the run", echo_memory, "MiB", memory["call-initiator"],
            memory["bare Flask echo"], "—", None),
        Row("RSS of webhook-receiver after the run", echo_memory, "MiB", memory["webhook-receiver"],
            memory["bare Flask echo"], "—", None),
        # One process (a consumer, its jobs and a health endpoint): no baseline is served like it.
        Row("RSS of queue-processor after the run", "none comparable", "MiB", memory["queue-processor"], None, "—",
            None),
    ]  # fmt: skip


def _table(rows: list[Row], seeding_seconds: float | None) -> Table:
    table = Table(
        title="Callflow performance (issue 10): each figure against a baseline measured in this run",
        caption=(
            f"{MEASURE_SECONDS} s wrk runs at 16 connections after a {WARM_UP_SECONDS} s warm-up (webhook ingest and "
            f"its baselines in turn, over {INGEST_ROUNDS} rounds); {ROUNDS} requests at 1 connection; history "
            f"seeded in {seeding_seconds or 0:.1f} s; ratio = Callflow / baseline, except +ms = Callflow - baseline"
        ),
    )
    for column in ("figure", "Callflow", "baseline", "ratio", "target", "met?"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for row in rows:
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "—"}[row.target_met]
        if row.met is not None and not row.measured:
            met = "[red]FAILED[/red]"
        if row.ratio is None:
            ratio = "—"
        else:
            ratio = f"{row.ratio:+.1f} ms" if row.difference else f"{row.ratio:.0%}"
        table.add_row(
            f"{row.figure}\n[dim]baseline: {row.baseline_is}[/dim]",
            _value(row.callflow, row.unit),
            _value(row.baseline, row.unit),
            ratio,
            row.target,
            met,
        )
    return table


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:,.1f} {unit}"


def main() -> int:
    started = time.monotonic()
    isolation = Isolation.new()
    # Only a database: its receiver publishes to the run's vhost, as the stack's does.
    empty_database = Isolation(f"{isolation.name}_empty")
    os.environ.update(
        DATABASE_URL=isolation.database_url, RABBITMQ_URL=isolation.rabbitmq_url, WEBHOOK_SECRET=WEBHOOK_SECRET
    )
    isolation.create()
    sink = SentrySink(keep=False).start()
    try:
        migrate.upgrade(isolation.database_url)
        migrate.upgrade(empty_database.database_url)
        with tempfile.TemporaryDirectory() as logs:
            bench = Bench(isolation.database_url, empty_database.database_url, Path(logs))
            try:
                rows = bench.run(sink)
            finally:
                bench.conn.close()
                bench.empty_conn.close()
    finally:
        sink.stop()
        try:
            isolation.destroy()
        finally:
            drop_database(empty_database.name)
    total = time.monotonic() - started
    console.print(_table(rows, bench.seeding_seconds))
    RESULTS.parent.mkdir(exist_ok=True)
    results = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "total_seconds": round(total, 1),
        "seeding_seconds": _rounded(bench.seeding_seconds, 1),
        "figures": [row.as_json() for row in rows],
        "measurements": bench.measurements,
        "failures": bench.failures,
        "sentry_envelopes_sent": sink.envelopes,
    }
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    for name, failure in bench.failures.items():
        console.print(f"[red]FAILED[/red] {name}: {failure}")
    console.print(f"total {total:.0f} s; written to {RESULTS.relative_to(REPO)}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
