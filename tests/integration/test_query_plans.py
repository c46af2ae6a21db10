"""Every hot query is served by an index at production scale.

On a database of its own holding half a million direct calls, a million campaign contacts in 20,241 campaigns (one
of 20,000 contacts) with their million calls, 800,000 stored webhooks and 200,000 outbox rows, each hot statement,
built by the very function the code runs it from, is EXPLAINed with realistic parameters. No plan may read calls,
webhook_events, outbox, idempotency_keys, campaigns or campaign_contacts whole: neither a Seq Scan nor a scan of a
whole (not partial) index without an Index Cond. Such a plan is cheap on a test's few rows and a scan of the table
per request in production, often under a lock."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Executable, Uuid, bindparam, text

from services.call_initiator.placing import user_and_agent_query
from services.queue_processor import campaigns
from services.queue_processor.dispatch import dispatchable_query, due_retries_query
from services.queue_processor.jobs import KEPT_WEBHOOK_MIN_AGE_SECONDS, OUTBOX_MIN_AGE
from services.queue_processor.reconcile import ReconcileBounds, silent_calls_query, unconfirmed_calls_query
from services.queue_processor.retention import Retention, RetentionPeriods
from shared.bolna.execution import CONTEXT_CALL_ID_KEY, AgentExecution
from shared.calls import provider_events, store
from shared.campaigns import views
from shared.campaigns.commands import FIRST_ATTEMPT_DUE
from shared.core.config import Settings
from shared.messaging import outbox
from tests.support.query_plans import explain, migrated_database, run_seed

# Seeding takes about 35 s on a 2-core machine, in the first test's setup; the rest of the margin is for a busy one.
pytestmark = pytest.mark.timeout(240)

WATCHED_TABLES = frozenset({"calls", "webhook_events", "outbox", "idempotency_keys", "campaigns", "campaign_contacts"})
USERS = 2_000
HOT_USER = 7  # the customer whose queries are EXPLAINed: a few direct calls, and the largest running campaign
DIRECT_CALLS = 500_000
WEBHOOK_EVENTS = 800_000  # two per direct call, for the first 400,000
OUTBOX_ROWS = 200_000
IDEMPOTENCY_KEYS = 50_000
# A million contacts: HOT_USER's running campaign, 240 campaigns of 2,000 and 20,000 of 25. Their attempts add
# about a million campaign calls to the direct ones.
BIG_CAMPAIGN_CONTACTS = 20_000
LARGE_CAMPAIGNS, LARGE_CAMPAIGN_CONTACTS = 240, 2_000
SMALL_CAMPAIGNS, SMALL_CAMPAIGN_CONTACTS = 20_000, 25
CAMPAIGNS = 1 + LARGE_CAMPAIGNS + SMALL_CAMPAIGNS
CALLING_PER_CAMPAIGN = 5  # a running campaign's contacts being called, up to its customer's limit of 5

# Built in SQL, so a million rows take seconds. Ids are md5-derived, so the parameters below name real rows.
# Foreign keys are not checked while seeding (session_replication_role): every reference is made consistent.
# The database is dropped after the module, so its tables skip the write-ahead log (a quarter of the seeding's
# time); the referencing tables go first, as a logged table may not reference an unlogged one.
SEED = f"""
ALTER TABLE credit_ledger SET UNLOGGED;
ALTER TABLE webhook_events SET UNLOGGED;
ALTER TABLE idempotency_keys SET UNLOGGED;
ALTER TABLE calls SET UNLOGGED;
ALTER TABLE campaign_contacts SET UNLOGGED;
ALTER TABLE campaigns SET UNLOGGED;
ALTER TABLE agents SET UNLOGGED;
ALTER TABLE users SET UNLOGGED;
ALTER TABLE outbox SET UNLOGGED;
SET LOCAL session_replication_role = replica;
SELECT setseed(0.42);

INSERT INTO users (id, email, api_token_hash, credits, max_concurrent_calls, created_at)
SELECT md5('user' || u)::uuid, 'user' || u || '@example.com', md5('token' || u) || md5('hash' || u), 1000, 5,
       now() - interval '90 days'
FROM generate_series(1, {USERS}) u;

INSERT INTO agents (id, user_id, name, provider_agent_id)
SELECT md5('agent' || u)::uuid, md5('user' || u)::uuid, 'Agent ' || u, md5('provider' || u)::uuid::text
FROM generate_series(1, {USERS}) u;

-- Of the direct calls: 0.4% pending (a fifth of them retried, due now or soon), 0.4% live with their execution
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
        FROM (SELECT g, random() AS r FROM generate_series(1, {DIRECT_CALLS}) g) numbered
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

-- Campaigns, owned ten by ten (campaigns 1-9 are HOT_USER's): most completed over 60 days; of every 40, one running
-- and one scheduled (started a few hours ago), one paused, one draft, one canceled. Campaign 1 is the largest.
CREATE TEMP TABLE seeded_campaigns ON COMMIT DROP AS
SELECT k, md5('campaign' || k)::uuid AS id, size, sum(size) OVER (ORDER BY k) - size AS contacts_before, status,
       owner, created,
       CASE WHEN status NOT IN ('draft', 'scheduled') THEN created + interval '10 minutes' END AS started
FROM (
    SELECT k,
           CASE WHEN k = 1 THEN {BIG_CAMPAIGN_CONTACTS} WHEN k <= 1 + {LARGE_CAMPAIGNS} THEN {LARGE_CAMPAIGN_CONTACTS}
                ELSE {SMALL_CAMPAIGN_CONTACTS} END AS size,
           status, 1 + (k / 10 + {HOT_USER} - 1) % {USERS} AS owner,
           CASE WHEN status IN ('completed', 'canceled')
                THEN now() - interval '1 day' - ({CAMPAIGNS} - k) * interval '60 days' / {CAMPAIGNS}
                ELSE now() - interval '6 hours' - k % 48 * interval '1 hour' END AS created
    FROM (
        SELECT k, CASE WHEN k = 1 OR k % 40 = 0 THEN 'running' WHEN k % 40 = 1 THEN 'scheduled'
                       WHEN k % 40 = 2 THEN 'paused' WHEN k % 40 = 3 THEN 'draft' WHEN k % 40 = 4 THEN 'canceled'
                       ELSE 'completed' END AS status
        FROM generate_series(1, {CAMPAIGNS}) k
    ) numbered
) sized;

INSERT INTO campaigns (id, user_id, agent_id, name, status, max_concurrency, retry_max_attempts, retry_on_statuses,
                       retry_interval_minutes, contacts_total, last_dispatched_at, created_at, started_at,
                       finished_at, updated_at)
SELECT id, md5('user' || owner)::uuid, md5('agent' || owner)::uuid, 'Campaign ' || k, status,
       CASE WHEN k % 3 = 0 THEN 10 END, 2, '["no-answer", "busy"]', '[60]', size,
       CASE WHEN started IS NOT NULL THEN now() - k % 60 * interval '1 second' END, created, started,
       CASE WHEN status IN ('completed', 'canceled') THEN started + interval '1 day' END, created
FROM seeded_campaigns;

-- A campaign's contacts are called in row order. A completed campaign's all have their final result; a canceled
-- one's first half, the rest canceled; a running or paused one's first 40% (a tenth of those waiting for their
-- retry), then, if running, CALLING_PER_CAMPAIGN being called (one call sent back to the queue, one ended but not
-- yet settled, the others live), the rest waiting (one in 7 for its calling window). Contacts called twice (one in
-- 8) had a no-answer first. Every attempt is a call of the campaign's customer.
INSERT INTO campaign_contacts (id, campaign_id, row_number, phone_number, name, variables, state, next_attempt_at,
                               waiting_for_window, attempts, last_call_id, final_status)
SELECT c, id, r, '+1415' || lpad(r::text, 7, '0'), 'Contact ' || r, jsonb_build_object('customer_ref', 'ref-' || c),
       state,
       CASE WHEN retrying THEN now() + r % 60 * interval '1 minute'
            WHEN windowed THEN date_trunc('day', now()) + interval '33 hours'
            ELSE '{FIRST_ATTEMPT_DUE.isoformat()}' END,
       windowed, attempts, CASE WHEN attempts > 0 THEN md5('campaign-call' || c || '-' || attempts)::uuid END,
       CASE WHEN state = 'done' AND called
            THEN (ARRAY['completed', 'completed', 'completed', 'completed', 'completed', 'completed',
                        'completed', 'no-answer', 'busy', 'failed'])[1 + r % 10]
            WHEN state = 'done' THEN 'canceled' END
FROM (
    SELECT c, id, r, created, started, called, retrying,
           CASE WHEN calling THEN 'calling' WHEN retrying THEN 'waiting'
                WHEN called OR status = 'canceled' THEN 'done' ELSE 'waiting' END AS state,
           CASE WHEN calling OR retrying THEN 1 WHEN called THEN 1 + (r % 8 = 0)::int ELSE 0 END AS attempts,
           NOT (calling OR called) AND status IN ('running', 'paused', 'scheduled') AND r % 7 = 0 AS windowed
    FROM (
        SELECT contacts_before + r AS c, id, r, status, created, started,
               CASE WHEN status = 'completed' THEN true WHEN status = 'canceled' THEN r <= size / 2
                    WHEN status IN ('running', 'paused') THEN r <= size * 2 / 5 ELSE false END AS called,
               status IN ('running', 'paused') AND r <= size * 2 / 5 AND r % 10 = 0 AS retrying,
               status = 'running' AND r > size * 2 / 5 AND r <= size * 2 / 5 + {CALLING_PER_CAMPAIGN} AS calling
        FROM seeded_campaigns, generate_series(1, size) r
    ) ordered
) stated;

INSERT INTO calls (id, user_id, agent_id, phone_number, status, execution_id, slot_held, slot_lease_expires_at,
                   dispatch_attempts, next_attempt_at, initiated_at, provider_checked_at, duration_seconds,
                   credits_charged, campaign_id, contact_id, created_at, updated_at)
SELECT md5('campaign-call' || contact || '-' || attempt)::uuid, md5('user' || owner)::uuid,
       md5('agent' || owner)::uuid, phone_number, call_status,
       CASE WHEN call_status <> 'pending' THEN 'campaign-exec-' || contact || '-' || attempt END,
       held, CASE WHEN held THEN now() + interval '30 minutes' END,
       (call_status = 'pending')::int, CASE WHEN call_status = 'pending' THEN now() - interval '1 minute' END,
       CASE WHEN call_status <> 'pending' THEN placed END,
       CASE WHEN call_status = 'pending' THEN NULL WHEN held THEN now() - contact % 10 * interval '1 minute'
            ELSE placed + interval '3 minutes' END,
       CASE WHEN call_status = 'completed' THEN 30 + contact % 600 END,
       CASE WHEN call_status = 'completed' THEN 1 + contact % 10 END,
       campaign_id, contact, placed, placed
FROM (
    SELECT contacts.id AS contact, campaign_id, owner, phone_number, attempt, call_status,
           call_status IN ('queued', 'initiated', 'ringing', 'in-progress') AS held,
           CASE WHEN state = 'calling' THEN now() - row_number % 5 * interval '1 minute'
                ELSE started + row_number * interval '1 second' + (attempt - 1) * interval '1 hour' END AS placed
    FROM campaign_contacts contacts JOIN seeded_campaigns ON seeded_campaigns.id = contacts.campaign_id,
         generate_series(1, attempts) attempt,
         LATERAL (
             SELECT CASE WHEN attempt < attempts OR state = 'waiting' THEN 'no-answer'
                         WHEN state = 'done' THEN final_status
                         WHEN row_number % 5 = 0 THEN 'pending'
                         WHEN row_number % 5 = 1 THEN 'completed'
                         ELSE (ARRAY['queued', 'initiated', 'ringing', 'in-progress'])[1 + row_number % 4]
                    END AS call_status
         ) attempted
) campaign_calls;
SELECT setval('campaign_contacts_id_seq', (SELECT max(id) FROM campaign_contacts));
"""


def _seeded_id(kind: str, n: int | str) -> uuid.UUID:
    """The id the seed gave row n of a kind (md5(kind || n)::uuid in SQL)."""
    return uuid.UUID(hashlib.md5(f"{kind}{n}".encode()).hexdigest())


USER = _seeded_id("user", HOT_USER)
CALL = _seeded_id("call", 450_007)  # one of the later direct calls, with no webhook yet
EXECUTION = "exec-450007"
SETTINGS = Settings.model_construct()  # the defaults
CAMPAIGN = _seeded_id("campaign", 1)  # HOT_USER's running campaign of BIG_CAMPAIGN_CONTACTS
# Its contact 8,001 (the first called after the first 40%) is being called, and its call has ended: not yet settled.
ENDED_ATTEMPT = _seeded_id("campaign-call", "8001-1")


def _webhook() -> AgentExecution:
    context = {"recipient_data": {CONTEXT_CALL_ID_KEY: str(CALL)}}
    return AgentExecution({"id": EXECUTION, "status": "ringing", "context_details": context})


def _next_calls_page() -> tuple[datetime, uuid.UUID]:
    """A cursor as GET /api/campaigns/{id}/calls gives for a next page: (created_at, id) some way into the campaign's
    calls."""
    return datetime.now(UTC) - timedelta(hours=6), _seeded_id("campaign-call", "100-1")


_retention = Retention(uow_factory=None, periods=RetentionPeriods.from_settings(SETTINGS))  # only builds statements
_reconcile = ReconcileBounds.from_settings(SETTINGS)

HOT_QUERIES: dict[str, Callable[[], Executable]] = {
    "SqlCallStore.held_slots": lambda: store.held_slots_query(USER),
    # A call being placed now (not stored yet): the user's calls waiting ahead of it, and the slots held.
    "SqlCallStore.slots_and_queue": lambda: store.slots_and_queue_query(USER, uuid.uuid4(), None),
    "SqlCallStore.due_calls": lambda: store.due_calls_query(USER, 8),
    "Dispatcher._work_due": lambda: dispatchable_query(USER, datetime.now(UTC), ENDED_ATTEMPT),
    # A direct call's freed slot, or a queued call: no ended attempt to look for (a NULL parameter, as it runs).
    "Dispatcher._work_due without an ended call": lambda: dispatchable_query(
        USER, datetime.now(UTC), bindparam("ended_call_id", None, type_=Uuid())
    ),
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
    "outbox.publish_committed": lambda: outbox.claim_as_published_query([OUTBOX_ROWS - 1, OUTBOX_ROWS]),
    "outbox.AfterCommitPublisher._give_up": lambda: outbox.claim_query([OUTBOX_ROWS - 1, OUTBOX_ROWS]),
    "ProviderReconciler.unconfirmed_calls": lambda: unconfirmed_calls_query(_reconcile),
    "ProviderReconciler.silent_calls": lambda: silent_calls_query(_reconcile),
    **{f"Retention.{name}": batch for name, batch in _retention.steps().items()},
    "Dispatcher.users_with_campaign_work": lambda: campaigns.users_with_campaign_work_query(datetime.now(UTC)),
    "CampaignDispatch.settle calls requeued after a cancel": lambda: campaigns.canceled_campaign_calls_query(USER),
    "CampaignDispatch.settle": lambda: campaigns.finished_attempts_query(USER),
    "CampaignDispatch.settle of an ended attempt": lambda: campaigns.finished_attempts_query(USER, ENDED_ATTEMPT),
    "CampaignDispatch.finish_if_done": lambda: campaigns.has_open_contacts_query(CAMPAIGN),
    "CampaignDispatch.pick running campaigns": lambda: campaigns.running_campaigns_query(USER),
    "CampaignDispatch.pick held by the campaign": lambda: campaigns.held_by_campaign_query(CAMPAIGN),
    "_CampaignTurn queued calls": lambda: campaigns.queued_campaign_calls_query(CAMPAIGN, CALLING_PER_CAMPAIGN),
    "_CampaignTurn due contacts": lambda: campaigns.due_contacts_query(
        CAMPAIGN, datetime.now(UTC), campaigns.CONTACT_BATCH
    ),
    "campaign_view contacts": lambda: views.contact_counts_query(CAMPAIGN),
    "campaign_view calls": lambda: views.call_counts_query(CAMPAIGN),
    "campaign_view results": lambda: views.final_results_query(CAMPAIGN),
    "GET /api/campaigns": lambda: views.campaigns_of_query(USER, views.MAX_PAGE),
    "calls_page first": lambda: views.campaign_calls_query(CAMPAIGN, None, None, views.MAX_PAGE),
    "calls_page by status, next": lambda: views.campaign_calls_query(
        CAMPAIGN, "completed", _next_calls_page(), views.MAX_PAGE
    ),
    "result_rows": lambda: views.results_query(CAMPAIGN),
}
# Read through a server-side cursor (yield_per): PostgreSQL plans those for their first rows.
STREAMED_QUERIES = frozenset({"result_rows"})


@pytest.fixture(scope="module", autouse=True)
def _own_database_and_vhost() -> None:
    """Replaces tests/integration/conftest.py's: this module makes a database of its own and needs no broker."""


@pytest.fixture(scope="module")
def planner() -> Iterator[tuple[Connection, dict[str, tuple[str, bool]]]]:
    """A connection to a seeded, analysed database, and each index's table and whether it is partial."""
    with migrated_database("callflow_plans") as engine:
        run_seed(engine, SEED)
        with engine.connect() as connection:
            connection.exec_driver_sql("ANALYZE")
            indexes = connection.execute(
                text("SELECT indexrelid::regclass::text, indrelid::regclass::text, indpred IS NOT NULL FROM pg_index")
            )
            yield connection, {index: (table, partial) for index, table, partial in indexes}


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
    plan = explain(connection, HOT_QUERIES[query](), streamed=query in STREAMED_QUERIES)
    assert _full_scans(plan, indexes) == [], f"{query} reads a whole table:{_outline(plan)}"
