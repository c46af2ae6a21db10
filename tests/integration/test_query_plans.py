"""Every hot query is served by an index at production scale.

On a database of its own holding a million calls, a million stored webhooks and 200,000 outbox rows, each hot
statement, built by the very function the code runs it from, is EXPLAINed with realistic parameters. No plan may
read calls, webhook_events, outbox or idempotency_keys whole: neither a Seq Scan nor a scan of a whole (not partial)
index without an Index Cond. Such a plan is cheap on a test's few rows and a scan of the table per request in
production, often under a lock."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, Executable, create_engine, text
from sqlalchemy.engine import make_url

from services.call_initiator.placing import user_and_agent_query
from services.queue_processor.dispatch import dispatchable_query, due_retries_query
from services.queue_processor.jobs import KEPT_WEBHOOK_MIN_AGE_SECONDS, OUTBOX_MIN_AGE
from services.queue_processor.reconcile import ReconcileBounds, silent_calls_query, unconfirmed_calls_query
from services.queue_processor.retention import Retention, RetentionPeriods
from shared.bolna.execution import CONTEXT_CALL_ID_KEY, AgentExecution
from shared.calls import provider_events, store
from shared.core import migrate
from shared.core.config import Settings
from shared.core.models import Call
from shared.messaging import outbox
from tests.support.isolation import POSTGRES_ADMIN_URL, drop_database

# Seeding takes about 30 s on a 2-core machine, in the first test's setup; the rest of the margin is for a busy one.
pytestmark = pytest.mark.timeout(240)

WATCHED_TABLES = frozenset({"calls", "webhook_events", "outbox", "idempotency_keys"})
USERS = 2_000
CALLS = 1_000_000
WEBHOOK_EVENTS = 1_000_000  # two per call with an execution, for the first half of the calls
OUTBOX_ROWS = 200_000
IDEMPOTENCY_KEYS = 50_000

# Built in SQL, so a million rows take seconds. Ids are md5-derived, so the parameters below name real rows.
# Foreign keys are not checked while seeding (session_replication_role): every reference is made consistent.
SEED = f"""
SET LOCAL session_replication_role = replica;
SELECT setseed(0.42);

INSERT INTO users (id, email, api_token_hash, credits, max_concurrent_calls, created_at)
SELECT md5('user' || u)::uuid, 'user' || u || '@example.com', md5('token' || u) || md5('hash' || u), 1000, 5,
       now() - interval '90 days'
FROM generate_series(1, {USERS}) u;

INSERT INTO agents (id, user_id, name, provider_agent_id)
SELECT md5('agent' || u)::uuid, md5('user' || u)::uuid, 'Agent ' || u, md5('provider' || u)::uuid::text
FROM generate_series(1, {USERS}) u;

-- Of a million calls: 0.4% pending (a fifth of them retried, due now or soon), 0.4% live with their execution
-- (a twentieth past their lease), 0.02% initiating (half of those unconfirmed past their short lease), the rest
-- ended over 60 days: most completed, a few failed before Bolna named an execution.
INSERT INTO calls (id, user_id, agent_id, phone_number, status, execution_id, slot_held, slot_lease_expires_at,
                   dispatch_attempts, next_attempt_at, initiated_at, provider_checked_at, duration_seconds,
                   credits_charged, created_at, updated_at)
SELECT md5('call' || g)::uuid, md5('user' || u)::uuid, md5('agent' || u)::uuid, '+14155550123', status,
       CASE WHEN status IN ('pending', 'initiating') OR (status = 'failed' AND r > 0.99) THEN NULL
            ELSE 'exec-' || g END,
       held,
       CASE WHEN NOT held THEN NULL
            WHEN r >= 0.0078 AND r < 0.0081 THEN now() - interval '1 minute'
            WHEN status = 'initiating' THEN now() + interval '30 seconds'
            ELSE now() + random() * interval '1 hour' END,
       CASE WHEN status = 'pending' AND r < 0.0008 THEN 1 ELSE 0 END,
       CASE WHEN status = 'pending' AND r < 0.0008 THEN now() + (random() - 0.5) * interval '10 minutes' END,
       CASE WHEN status <> 'pending' THEN created END,
       CASE WHEN status = 'pending' THEN NULL WHEN held THEN now() - random() * interval '10 minutes'
            ELSE created + interval '3 minutes' END,
       CASE WHEN status = 'completed' THEN 30 + (r * 1e6)::int % 600 END,
       CASE WHEN status = 'completed' THEN 1 + (r * 1e6)::int % 10 END,
       created, created
FROM (
    SELECT g, u, r, status,
           status IN ('initiating', 'queued', 'initiated', 'ringing', 'in-progress') AS held,
           CASE WHEN status IN ('completed', 'busy', 'no-answer', 'failed', 'canceled', 'error')
                THEN now() - interval '1 hour' - random() * interval '60 days'
                ELSE now() - random() * interval '1 hour' END AS created
    FROM (
        SELECT g, 1 + g % {USERS} AS u, r,
               CASE WHEN r < 0.004 THEN 'pending'
                    WHEN r < 0.008 THEN (ARRAY['queued', 'initiated', 'ringing', 'in-progress'])[1 + g % 4]
                    WHEN r < 0.0082 THEN 'initiating'
                    WHEN r < 0.85 THEN 'completed'
                    ELSE (ARRAY['busy', 'no-answer', 'failed', 'canceled', 'error'])[1 + g % 5] END AS status
        FROM (SELECT g, random() AS r FROM generate_series(1, {CALLS}) g) numbered
    ) typed
) seeded;

-- Two webhooks per execution, received over 60 days in id order: applied but for a few that never found their
-- call, and redacted once past the 30 days of payload retention.
INSERT INTO webhook_events (execution_id, status, attempt, payload, call_id, received_at, applied_at, attempts,
                            next_attempt_at, redacted_at)
SELECT 'exec-' || c, status, 0,
       CASE WHEN age > interval '30 days' THEN jsonb_build_object('id', 'exec-' || c, 'status', status)
            ELSE jsonb_build_object('id', 'exec-' || c, 'status', status, 'transcript', repeat('words ', 20)) END,
       CASE WHEN NOT kept THEN md5('call' || c)::uuid END,
       now() - age,
       CASE WHEN NOT kept THEN now() - age + interval '50 milliseconds' END,
       CASE WHEN kept THEN 8 ELSE 0 END,
       CASE WHEN kept THEN now() - age + interval '4 minutes' END,
       CASE WHEN age > interval '30 days' THEN now() - age + interval '30 days' END
FROM (
    SELECT e, (e + 1) / 2 AS c, CASE WHEN e % 2 = 0 THEN 'completed' ELSE 'in-progress' END AS status,
           ({WEBHOOK_EVENTS} - e) * interval '60 days' / {WEBHOOK_EVENTS} AS age, random() < 0.001 AS kept
    FROM generate_series(1, {WEBHOOK_EVENTS}) e
) events;

-- The outbox over its 24 hours of retention and the hour until the next retention run; the last rows unpublished.
INSERT INTO outbox (message_id, message_type, body, created_at, published_at)
SELECT gen_random_uuid(), CASE WHEN o % 2 = 0 THEN 'slot.released' ELSE 'call.queued' END,
       jsonb_build_object('user_id', md5('user' || (1 + o % {USERS}))::uuid),
       now() - age, CASE WHEN o <= {OUTBOX_ROWS} - 50 THEN now() - age + interval '20 milliseconds' END
FROM (SELECT o, ({OUTBOX_ROWS} - o) * interval '25 hours' / {OUTBOX_ROWS} AS age
      FROM generate_series(1, {OUTBOX_ROWS}) o) aged;

INSERT INTO idempotency_keys (user_id, key, request_hash, call_id, response_status, created_at)
SELECT md5('user' || (1 + k % {USERS}))::uuid, 'key-' || k, md5('request' || k) || md5('body' || k),
       md5('call' || k)::uuid, 201, now() - ({IDEMPOTENCY_KEYS} - k) * interval '25 hours' / {IDEMPOTENCY_KEYS}
FROM generate_series(1, {IDEMPOTENCY_KEYS}) k;
"""


def _seeded_id(kind: str, n: int) -> uuid.UUID:
    """The id the seed gave row n of a kind (md5(kind || n)::uuid in SQL)."""
    return uuid.UUID(hashlib.md5(f"{kind}{n}".encode()).hexdigest())


USER = _seeded_id("user", 7)
CALL = _seeded_id("call", 600_007)  # one of the later calls, with no webhook yet
EXECUTION = "exec-600007"
SETTINGS = Settings.model_construct()  # the defaults


def _webhook() -> AgentExecution:
    context = {"recipient_data": {CONTEXT_CALL_ID_KEY: str(CALL)}}
    return AgentExecution({"id": EXECUTION, "status": "ringing", "context_details": context})


def _new_call() -> Call:
    """A call being placed now: has_older_pending looks for the user's calls waiting ahead of it."""
    return Call(id=uuid.uuid4(), user_id=USER, created_at=datetime.now(UTC))


_retention = Retention(uow_factory=None, periods=RetentionPeriods.from_settings(SETTINGS))  # only builds statements
_reconcile = ReconcileBounds.from_settings(SETTINGS)

HOT_QUERIES: dict[str, Callable[[], Executable]] = {
    "SqlCallStore.held_slots": lambda: store.held_slots_query(USER),
    "SqlCallStore.has_older_pending": lambda: store.older_pending_query(_new_call()),
    "SqlCallStore.due_calls": lambda: store.due_calls_query(USER, 8),
    "Dispatcher._has_work": lambda: dispatchable_query(USER),
    "SqlCallStore.users_with_pending_calls": store.users_with_pending_calls_query,
    "Dispatcher.users_to_retry": due_retries_query,
    "provider_events.ingest duplicate": lambda: provider_events.waiting_duplicate_query(_webhook()),
    "provider_events.process": lambda: provider_events.waiting_event_query(1),
    "provider_events._find_call by execution id": lambda: provider_events.linked_call_query(EXECUTION),
    "provider_events._find_call by echoed call id": lambda: provider_events.echoed_call_query(CALL, EXECUTION),
    "provider_events.apply_kept_events": lambda: provider_events.kept_events_query(EXECUTION),
    "CallPlacer.link_execution": lambda: provider_events.call_and_kept_events_query(CALL, EXECUTION),
    "place_call": lambda: user_and_agent_query(USER, CALL),
    "provider_events.unapplied_event_ids": lambda: provider_events.unapplied_events_query(
        KEPT_WEBHOOK_MIN_AGE_SECONDS, 500
    ),
    "outbox.publish_pending": lambda: outbox.unpublished_query(OUTBOX_MIN_AGE, 200),
    "outbox.publish_committed": lambda: outbox.claim_query([OUTBOX_ROWS - 1, OUTBOX_ROWS]),
    "ProviderReconciler.unconfirmed_calls": lambda: unconfirmed_calls_query(_reconcile),
    "ProviderReconciler.silent_calls": lambda: silent_calls_query(_reconcile),
    **{f"Retention.{name}": batch for name, batch in _retention.steps().items()},
}


def _explain(connection: Connection, statement: Executable) -> dict[str, Any]:
    """The plan PostgreSQL makes for the statement with its parameters, compiled as SQLAlchemy runs it."""
    compiled = statement.compile(dialect=connection.dialect, compile_kwargs={"render_postcompile": True})
    [[plans]] = connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled.string}", compiled.params).all()
    return plans[0]["Plan"]


@pytest.fixture(scope="module", autouse=True)
def _own_database_and_vhost() -> None:
    """Replaces tests/integration/conftest.py's: this module makes a database of its own and needs no broker."""


@pytest.fixture(scope="module")
def planner() -> Iterator[tuple[Connection, dict[str, tuple[str, bool]]]]:
    """A connection to a seeded, analysed database, and each index's table and whether it is partial."""
    url = make_url(POSTGRES_ADMIN_URL).set(database=f"callflow_plans_{uuid.uuid4().hex[:10]}")
    database_url = url.render_as_string(hide_password=False)
    engine = create_engine(url)
    try:
        migrate.upgrade(database_url)
        with engine.begin() as connection:
            connection.connection.cursor().execute(SEED)  # the driver's own cursor: `%` is SQL's modulo here
        with engine.connect() as connection:
            connection.exec_driver_sql("ANALYZE")
            indexes = connection.execute(
                text("SELECT indexrelid::regclass::text, indrelid::regclass::text, indpred IS NOT NULL FROM pg_index")
            )
            yield connection, {index: (table, partial) for index, table, partial in indexes}
    finally:
        engine.dispose()
        drop_database(str(url.database))


def _full_scans(node: dict[str, Any], indexes: dict[str, tuple[str, bool]]) -> list[str]:
    """The plan's nodes that read a watched table whole: a Seq Scan, or a full index scanned without a condition."""
    found = []
    kind = node["Node Type"]
    if kind == "Seq Scan" and node["Relation Name"] in WATCHED_TABLES:
        found.append(f"Seq Scan on {node['Relation Name']}")
    if kind in ("Index Scan", "Index Only Scan", "Bitmap Index Scan") and "Index Cond" not in node:
        table, partial = indexes[node["Index Name"]]
        if table in WATCHED_TABLES and not partial:
            found.append(f"{kind} of all of {node['Index Name']}")
    for child in node.get("Plans", []):
        found.extend(_full_scans(child, indexes))
    return found


def _outline(node: dict[str, Any], depth: int = 1) -> str:
    """The plan as EXPLAIN's text shows it, in short: each node, its table or index, its conditions."""
    scanned = " ".join(
        f"{key}={node[key]}" for key in ("Relation Name", "Index Name", "Index Cond", "Filter") if key in node
    )
    children = "".join(_outline(child, depth + 1) for child in node.get("Plans", []))
    return f"\n{'  ' * depth}{node['Node Type']} {scanned}{children}"


@pytest.mark.parametrize("query", HOT_QUERIES)
def test_a_hot_query_reads_no_table_in_full(planner, query):
    connection, indexes = planner
    plan = _explain(connection, HOT_QUERIES[query]())
    assert _full_scans(plan, indexes) == [], f"{query} reads a whole table:{_outline(plan)}"
