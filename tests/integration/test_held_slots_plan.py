"""A customer's held slots are counted through that customer's own index, whatever the planner's statistics say.

The partial indexes over held slots are as good as empty when the table was last analysed at a quiet hour. If any
of them could serve `user_id = $1 AND slot_held`, the planner, estimating one row in each, may pick one that reads
every customer's held slots: under load that is thousands of rows per `POST /api/calls` and per dispatch, under the
customer's lock (a million-call benchmark spent 6.5 ms per count on 73,000 held slots)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, Executable, Uuid, bindparam

from services.queue_processor import campaigns
from services.queue_processor.dispatch import dispatchable_query
from shared.calls import store
from tests.support.query_plans import explain, migrated_database, run_seed

CUSTOMERS = 300
FINISHED_CALLS = 100_000
HELD_SLOTS = 30_000  # a busy hour: a hundred live calls per customer, none of them seen by the last ANALYZE

_SEED = f"""
SET LOCAL session_replication_role = replica;
INSERT INTO users (id, email, api_token_hash, credits, max_concurrent_calls)
SELECT md5('user' || u)::uuid, 'user' || u || '@example.com', md5('token' || u) || md5('hash' || u), 1000, 500
FROM generate_series(1, {CUSTOMERS}) u;
INSERT INTO agents (id, user_id, name, provider_agent_id)
SELECT md5('agent' || u)::uuid, md5('user' || u)::uuid, 'Agent ' || u, md5('provider' || u)::uuid::text
FROM generate_series(1, {CUSTOMERS}) u;
INSERT INTO calls (id, user_id, agent_id, phone_number, status, created_at, updated_at)
SELECT md5('call' || n)::uuid, md5('user' || (1 + n % {CUSTOMERS}))::uuid, md5('agent' || (1 + n % {CUSTOMERS}))::uuid,
       '+14155550123', 'completed', now() - interval '30 days', now() - interval '30 days'
FROM generate_series(1, {FINISHED_CALLS}) n;
"""
_BUSY_HOUR = f"""
SET LOCAL session_replication_role = replica;
INSERT INTO calls (id, user_id, agent_id, phone_number, status, execution_id, slot_held, slot_lease_expires_at,
                   initiated_at, provider_checked_at, created_at, updated_at)
SELECT md5('live' || n)::uuid, md5('user' || (1 + n % {CUSTOMERS}))::uuid, md5('agent' || (1 + n % {CUSTOMERS}))::uuid,
       '+14155550123', 'in-progress', md5('execution' || n)::uuid::text, true, now() + interval '1 hour', now(), now(),
       now(), now()
FROM generate_series(1, {HELD_SLOTS}) n;
"""


@pytest.fixture(scope="module", autouse=True)
def _own_database_and_vhost() -> None:
    """Replaces tests/integration/conftest.py's: this module makes a database of its own and needs no broker."""


@pytest.fixture(scope="module")
def busy_after_a_quiet_analyse() -> Iterator[Connection]:
    with migrated_database("callflow_held") as engine:
        run_seed(engine, _SEED)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE")  # as autovacuum leaves it after a quiet hour
        run_seed(engine, _BUSY_HOUR)
        with engine.connect() as connection:
            yield connection


_INDEX_SCANS = ("Index Scan", "Index Only Scan", "Bitmap Index Scan")


def _whole_reads_of_held_slots(connection: Connection, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan's nodes that read every customer's held slots: `calls` whole, or an index over held slots without a
    condition."""
    held_slot_indexes = set(
        connection.exec_driver_sql(
            "SELECT indexrelid::regclass::text FROM pg_index"
            " WHERE indrelid = 'calls'::regclass AND pg_get_expr(indpred, indrelid) LIKE '%%slot_held%%'"
        ).scalars()
    )

    def whole_reads(node: dict[str, Any]) -> list[dict[str, Any]]:
        whole = node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "calls"
        whole = whole or (
            node["Node Type"] in _INDEX_SCANS and node["Index Name"] in held_slot_indexes and "Index Cond" not in node
        )
        found = [node] if whole else []
        return found + [read for child in node.get("Plans", []) for read in whole_reads(child)]

    return whole_reads(plan)


CUSTOMER = uuid.UUID(hashlib.md5(b"user7").hexdigest())
CAMPAIGN = uuid.uuid4()
# Each count of held slots, and the column its own indexes are keyed by.
QUERIES: dict[str, tuple[Callable[[], Executable], str]] = {
    "held slots": (lambda: store.held_slots_query(CUSTOMER), "user_id"),
    "held slots and the queue ahead": (
        lambda: store.slots_and_queue_query(CUSTOMER, uuid.uuid4(), datetime.now(UTC)),
        "user_id",
    ),
    "what a wake-up has to do": (
        lambda: dispatchable_query(CUSTOMER, datetime.now(UTC), bindparam("ended_call_id", None, type_=Uuid())),
        "user_id",
    ),
    "a campaign's held slots": (lambda: campaigns.held_by_campaign_query(CAMPAIGN), "campaign_id"),
}


_INDEXES_KEYED_BY = """
SELECT i.indexrelid::regclass::text FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
WHERE i.indrelid = 'calls'::regclass AND a.attname = %s
"""


def _plan(connection: Connection, query: str) -> dict[str, Any]:
    statement, _ = QUERIES[query]
    return explain(connection, statement())


@pytest.mark.parametrize("query", QUERIES)
def test_held_slots_are_never_read_for_every_customer_at_once(busy_after_a_quiet_analyse, query):
    connection = busy_after_a_quiet_analyse
    assert _whole_reads_of_held_slots(connection, _plan(connection, query)) == []


@pytest.mark.parametrize("query", QUERIES)
def test_no_other_index_over_held_slots_could_serve_a_count(busy_after_a_quiet_analyse, query):
    """Which of two indexes estimated alike the planner picks is a tie it breaks as it likes, so no other index
    over held slots may be able to serve the count: without the indexes keyed by its own column, and with the
    table's scan priced out, the plan still reads none of them whole."""
    connection = busy_after_a_quiet_analyse
    _, key = QUERIES[query]
    connection.rollback()  # the EXPLAINs before began a transaction
    with connection.begin() as transaction:
        for index in connection.exec_driver_sql(_INDEXES_KEYED_BY, (key,)).scalars().all():
            connection.exec_driver_sql(f"DROP INDEX {index}")
        connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
        whole_reads = _whole_reads_of_held_slots(connection, _plan(connection, query))
        transaction.rollback()
    # With no index left that can serve it, the planner reads the table all the same: that is no other index.
    assert [read for read in whole_reads if read["Node Type"] != "Seq Scan"] == []
