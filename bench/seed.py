"""Rows for the benchmark, written in SQL: customers, the calls each figure works on, and a year of history.

Ids follow patterns the wrk scripts can rebuild from a number, so a webhook names a seeded call without a lookup.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from services.bolna_simulator.config import SIMULATED_FROM_NUMBER, TRANSCRIPT
from shared.core.tokens import hash_token, new_api_token

HISTORY_CUSTOMERS = 5_000
HISTORY_CALLS = 1_000_000
HISTORY_EVENTS_PER_CALL = 4  # 4,000,000 stored webhooks
HISTORY_DAYS = 365
PAYLOAD_RETENTION_DAYS = 30  # WEBHOOK_PAYLOAD_RETENTION_DAYS: older payloads were redacted to their ids
PHONE_NUMBER = "+14155550123"


def execution_id(number: int) -> str:
    """The Bolna execution id of seeded live call `number`, as `live_calls` and bench/wrk/webhooks.lua write it."""
    return f"e0000000-0000-4000-8000-{number:012d}"


def conninfo(database_url: str) -> str:
    """The services' SQLAlchemy DATABASE_URL as plain psycopg takes it."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def connect(database_url: str) -> psycopg.Connection:
    """A plain psycopg connection (autocommit) to the database the services use."""
    return psycopg.connect(conninfo(database_url), autocommit=True)


@dataclass(frozen=True)
class Customer:
    user_id: uuid.UUID
    agent_id: uuid.UUID
    provider_agent_id: uuid.UUID
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def customers(conn: psycopg.Connection, count: int, credits: int, max_concurrent_calls: int) -> list[Customer]:
    """Customers with one configured agent each; their API tokens are stored hashed, as `callctl` stores them."""
    made = [Customer(uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), new_api_token()) for _ in range(count)]
    with conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO users (id, email, api_token_hash, credits, max_concurrent_calls)
            SELECT id, id || '@example.com', token_hash, %(credits)s, %(limit)s
            FROM unnest(%(ids)s::uuid[], %(hashes)s::text[]) AS made(id, token_hash)
            """,
            {
                "ids": [c.user_id for c in made],
                "hashes": [hash_token(c.token) for c in made],
                "credits": credits,
                "limit": max_concurrent_calls,
            },
        )
        cur.execute(
            """
            INSERT INTO agents (id, user_id, name, provider_agent_id)
            SELECT id, user_id, 'Maya', provider_agent_id::text
            FROM unnest(%s::uuid[], %s::uuid[], %s::uuid[]) AS made(id, user_id, provider_agent_id)
            """,
            ([c.agent_id for c in made], [c.user_id for c in made], [c.provider_agent_id for c in made]),
        )
    return made


def live_calls(conn: psycopg.Connection, first: int, count: int, owners: Sequence[Customer]) -> None:
    """Calls `first` .. `first + count - 1` as Bolna has just started them: `initiated` with their execution id,
    their slot held on the full lease, as the call-initiator leaves a call once Bolna answered. A fifth carry a
    sampled trace, like the calls POST /api/calls traced at SENTRY_TRACES_SAMPLE_RATE 0.2."""
    with conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO calls (id, user_id, agent_id, phone_number, status, execution_id, slot_held,
                               slot_lease_expires_at, initiated_at, provider_checked_at, trace_headers)
            SELECT ('00000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid, owner.user_id, owner.agent_id,
                   %(phone)s, 'initiated', 'e0000000-0000-4000-8000-' || lpad(n::text, 12, '0'), true,
                   now() + interval '1 hour', now(), now(),
                   jsonb_build_object('sentry-trace', md5('trace' || n) || '-' || left(md5('span' || n), 16) || '-'
                                      || CASE WHEN n %% 5 = 0 THEN '1' ELSE '0' END)
            FROM generate_series(%(first)s::bigint, %(last)s::bigint) n
            JOIN unnest(%(users)s::uuid[], %(agents)s::uuid[]) WITH ORDINALITY AS owner(user_id, agent_id, position)
              ON owner.position = 1 + n %% %(owners)s
            """,
            {
                "phone": PHONE_NUMBER,
                "first": first,
                "last": first + count - 1,
                "users": [c.user_id for c in owners],
                "agents": [c.agent_id for c in owners],
                "owners": len(owners),
            },
        )


def pending_calls(conn: psycopg.Connection, owners: Sequence[Customer], per_customer: int) -> list[tuple[str, str]]:
    """Calls waiting in the queue, as POST /api/calls leaves them when their customer is at its limit; returns
    (user id, call id) of each, oldest first."""
    with conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO calls (id, user_id, agent_id, phone_number, status, created_at, updated_at)
            SELECT gen_random_uuid(), owner.user_id, owner.agent_id, %(phone)s, 'pending', queued_at, queued_at
            FROM unnest(%(users)s::uuid[], %(agents)s::uuid[]) AS owner(user_id, agent_id),
                 generate_series(1, %(per)s) k,
                 LATERAL (SELECT now() - k * interval '1 millisecond' AS queued_at) queued
            RETURNING user_id::text, id::text, created_at
            """,
            {
                "phone": PHONE_NUMBER,
                "users": [c.user_id for c in owners],
                "agents": [c.agent_id for c in owners],
                "per": per_customer,
            },
        )
        rows = cur.fetchall()
    return [(user, call) for user, call, _ in sorted(rows, key=lambda row: row[2])]


_TRANSCRIPT_SQL = f"$transcript${TRANSCRIPT}$transcript$"  # dollar-quoted: the statements run without parameters


def _hex_sql(kind: int, number: str, halves: int = 2) -> str:
    """SQL for 16 (or 8, with one half) random-looking bytes as hex, derived from the SQL number `number` and the
    `kind` of id: PostgreSQL's seeded 64-bit hashes of it. md5, over three times as costly, was most of the
    seeding's time, with millions of ids to make. The same number and kind give the same id in every statement."""
    return (
        "encode("
        + " || ".join(f"int8send(hashint8extended({number}, {kind * 2 + half}))" for half in range(halves))
        + ", 'hex')"
    )


def _uuid_sql(kind: int, number: str) -> str:
    return f"{_hex_sql(kind, number)}::uuid"


# The kinds of id the history derives from a call's or a customer's number (`_hex_sql`).
_CALL, _USER, _AGENT, _PROVIDER_AGENT, _EXECUTION, _TRACE, _SPAN, _RECORDING, _PROVIDER_CALL = range(1, 10)
# The history's SQL expressions of call number `n`. Mostly completed calls; the rest ended without a conversation.
# Derived from the number, so the calls and their webhooks, written by separate statements, agree.
_HISTORY_STATUS = """CASE WHEN n % 200 < 156 THEN 'completed' WHEN n % 200 < 172 THEN 'no-answer'
    WHEN n % 200 < 184 THEN 'busy' WHEN n % 200 < 194 THEN 'failed' WHEN n % 200 < 197 THEN 'canceled'
    WHEN n % 200 < 198 THEN 'stopped' ELSE 'error' END"""
# Oldest first, over the past year, so the tables' physical order follows time as in production.
_HISTORY_CREATED = f"now() - interval '1 hour' - (1 - n::float / {HISTORY_CALLS}) * interval '{HISTORY_DAYS} days'"
_HISTORY_DURATION = "(20 + n::bigint * 7919 % 580)::int"
# What each call's rows are made of, computed once per call: `OFFSET 0` keeps the planner from folding this into
# the statement that uses it, which would compute each expression again wherever it is named.
_HISTORY_CALL_VALUES = f"""
    SELECT n, u, {_uuid_sql(_CALL, "n")} AS call_id, {_uuid_sql(_USER, "u")} AS user_id,
           {_hex_sql(_EXECUTION, "n")}::uuid::text AS execution, status, status = 'completed' AS completed,
           duration, created
    FROM (
        SELECT n, 1 + n % {HISTORY_CUSTOMERS} AS u, {_HISTORY_STATUS} AS status, {_HISTORY_DURATION} AS duration,
               {_HISTORY_CREATED} AS created
        FROM generate_series({{first}}, {{last}}) n
        OFFSET 0
    ) numbered
    OFFSET 0"""

HISTORY_CUSTOMERS_SQL = f"""
INSERT INTO users (id, email, api_token_hash, credits, max_concurrent_calls, created_at)
SELECT {_uuid_sql(_USER, "u")}, 'history-' || u || '@example.com', md5('token' || u) || md5('hash' || u),
       100 + u % 5000, 2 + u % 9, now() - interval '{HISTORY_DAYS + 30} days'
FROM generate_series(1, {HISTORY_CUSTOMERS}) u;
INSERT INTO agents (id, user_id, name, provider_agent_id, created_at)
SELECT {_uuid_sql(_AGENT, "u")}, {_uuid_sql(_USER, "u")}, 'Agent ' || u,
       {_hex_sql(_PROVIDER_AGENT, "u")}::uuid::text, now() - interval '{HISTORY_DAYS + 30} days'
FROM generate_series(1, {HISTORY_CUSTOMERS}) u;
"""

_HISTORY_CALLS_SQL = f"""
SET session_replication_role = replica;  -- every reference is consistent by construction: skip the FK triggers
INSERT INTO calls (id, user_id, agent_id, phone_number, status, execution_id, error_type, error_detail, slot_held,
                   initiated_at, provider_checked_at, duration_seconds, credits_charged, transcript, recording_url,
                   trace_headers, created_at, updated_at)
SELECT call_id, user_id, {_uuid_sql(_AGENT, "u")}, '{PHONE_NUMBER}', status, execution,
       CASE WHEN status = 'failed' THEN 'bolna_call_failed' END,
       CASE WHEN status = 'failed' THEN 'Call failed: the carrier rejected the call' END,
       false, created, created + interval '3 minutes',
       CASE WHEN completed THEN duration END, CASE WHEN completed THEN ceil(duration / 60.0)::int END,
       CASE WHEN completed THEN {_TRANSCRIPT_SQL} END,
       CASE WHEN completed THEN 'https://recordings.example.invalid/' || {_hex_sql(_RECORDING, "n")} || '.mp3' END,
       jsonb_build_object('sentry-trace', {_hex_sql(_TRACE, "n")} || '-' || {_hex_sql(_SPAN, "n", halves=1)} || '-0'),
       created, created + interval '3 minutes'
FROM ({_HISTORY_CALL_VALUES}
) history;
INSERT INTO credit_ledger (user_id, call_id, amount, reason, created_at)
SELECT user_id, call_id, -ceil(duration / 60.0)::int, 'call_charge', created + interval '3 minutes'
FROM ({_HISTORY_CALL_VALUES}
) history
WHERE completed;
"""

# Four webhooks per call, a few seconds apart, each applied 40 ms after it arrived. Payloads past their retention
# hold only their ids (what the retention job leaves); recent ones are the whole execution object.
_HISTORY_EVENTS_SQL = f"""
SET session_replication_role = replica;
INSERT INTO webhook_events (execution_id, status, attempt, payload, call_id, received_at, applied_at, redacted_at)
SELECT execution, status, 0,
       CASE WHEN redacted THEN jsonb_build_object('id', execution, 'status', status)
            ELSE jsonb_build_object(
                'id', execution, 'agent_id', {_hex_sql(_PROVIDER_AGENT, "u")}::uuid,
                'status', status, 'created_at', created, 'updated_at', received,
                'conversation_duration', CASE WHEN final THEN duration ELSE 0 END,
                'transcript', CASE WHEN final AND status = 'completed' THEN {_TRANSCRIPT_SQL} END,
                'telephony_data', jsonb_build_object(
                    'duration', CASE WHEN final THEN duration ELSE 0 END::text, 'to_number', '{PHONE_NUMBER}',
                    'from_number', '{SIMULATED_FROM_NUMBER}',
                    'provider_call_id', 'CA' || {_hex_sql(_PROVIDER_CALL, "n")},
                    'call_type', 'outbound', 'provider', 'twilio', 'hosted_telephony', true),
                'context_details', jsonb_build_object(
                    'recipient_data', jsonb_build_object('callflow_call_id', call_id),
                    'recipient_phone_number', '{PHONE_NUMBER}'))
       END,
       call_id, received, received + interval '40 milliseconds',
       CASE WHEN redacted THEN received + interval '{PAYLOAD_RETENTION_DAYS} days' END
FROM (
    SELECT n, u, call_id, execution, created, duration, final, redacted,
           CASE WHEN final THEN status
                WHEN completed THEN (ARRAY['initiated', 'ringing', 'in-progress'])[step]
                ELSE (ARRAY['queued', 'initiated', 'ringing'])[step] END AS status,
           created + step * interval '4 seconds' + CASE WHEN final THEN duration * interval '1 second'
                                                        ELSE interval '0' END AS received
    FROM (
        SELECT *, step = {HISTORY_EVENTS_PER_CALL} AS final
        FROM (
            -- the steps as a set in the select list: each call's webhooks one after the other, in time order
            SELECT call.*, created < now() - interval '{PAYLOAD_RETENTION_DAYS} days' AS redacted,
                   generate_series(1, {HISTORY_EVENTS_PER_CALL}) AS step
            FROM ({_HISTORY_CALL_VALUES}
            ) call
        ) stepped
        OFFSET 0
    ) per_step
    OFFSET 0
) events;
"""


def history_calls_sql(first: int, last: int) -> str:
    """The statements writing history calls `first` .. `last` and their charges, for the customers that
    HISTORY_CUSTOMERS_SQL writes."""
    return _HISTORY_CALLS_SQL.format(first=first, last=last)


def history_webhooks_sql(first: int, last: int) -> str:
    """The statements writing the webhooks of history calls `first` .. `last`."""
    return _HISTORY_EVENTS_SQL.format(first=first, last=last)


HISTORY_EVENT_BATCHES = 10  # statements writing the webhooks, so that two connections share the work evenly
HISTORY_TABLES = ("calls", "webhook_events", "credit_ledger")
# The secondary indexes of the history's tables, as statements that build them again. Their keys (hashed uuids) are
# random: maintained row by row, each of millions of rows reads and dirties a random page of an index larger than
# the buffer cache, where one sorted build after the load reads each table once. Primary keys stay (foreign keys
# rest on them), and so do partial indexes: the history holds few of their rows, and a predicate rebuilt from
# its catalogue text can differ from the one the planner matches queries against.
_SECONDARY_INDEXES_SQL = """
SELECT index.relname, CASE WHEN constraint_.conname IS NULL THEN pg_get_indexdef(index.oid)
    ELSE format('ALTER TABLE %%I ADD CONSTRAINT %%I %%s', tab.relname, constraint_.conname,
                pg_get_constraintdef(constraint_.oid)) END,
    constraint_.conname IS NOT NULL, tab.relname
FROM pg_index x
JOIN pg_class index ON index.oid = x.indexrelid
JOIN pg_class tab ON tab.oid = x.indrelid
LEFT JOIN pg_constraint constraint_ ON constraint_.conindid = index.oid AND constraint_.contype = 'u'
WHERE tab.relname = ANY(%s) AND NOT x.indisprimary AND x.indpred IS NULL
ORDER BY tab.relname DESC
"""


def history(database_url: str) -> float:
    """A year of finished calls (1,000,000, with their charges) and their 4,000,000 webhooks, then VACUUM ANALYZE
    and a checkpoint, so no figure pays for the seeding's writes. The calls and the webhooks are written at once
    on two connections (two cores), with the tables' secondary indexes dropped, then built again on the same two
    connections. Returns the seconds it took."""
    started = time.monotonic()
    with connect(database_url) as conn:
        conn.execute(HISTORY_CUSTOMERS_SQL)
        rebuilds = _drop_secondary_indexes(conn)

    def run(statements: str) -> None:
        with connect(database_url) as conn:
            conn.execute(statements)

    batch = HISTORY_CALLS // HISTORY_EVENT_BATCHES
    event_batches = [history_webhooks_sql(first, first + batch - 1) for first in range(1, HISTORY_CALLS, batch)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for done in [
            pool.submit(run, statements) for statements in [history_calls_sql(1, HISTORY_CALLS), *event_batches]
        ]:
            done.result()
        for done in [pool.submit(run, f"SET maintenance_work_mem = '256MB'; {build}") for build in rebuilds]:
            done.result()
    with connect(database_url) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
    return time.monotonic() - started


def _drop_secondary_indexes(conn: psycopg.Connection) -> list[str]:
    """Drops the history tables' secondary indexes and unique constraints; returns the statements that build them
    again."""
    found = conn.execute(_SECONDARY_INDEXES_SQL, (list(HISTORY_TABLES),)).fetchall()
    for name, _, is_constraint, table in found:
        drop = "ALTER TABLE {table} DROP CONSTRAINT {name}" if is_constraint else "DROP INDEX {name}"
        conn.execute(sql.SQL(drop).format(table=sql.Identifier(table), name=sql.Identifier(name)))
    return [build for _, build, _, _ in found]
