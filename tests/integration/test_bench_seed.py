"""The benchmark's history (`bench/seed.py`): the rows it derives from each call's number in separate statements
reference each other as the services' own would, so every figure measured on top of it runs on a consistent
database. Seeded here for the oldest and the newest 500 calls of the history: payloads redacted, and whole."""

from __future__ import annotations

from bench import seed
from tests.support.query_plans import migrated_database

CALLS_PER_END = 500
# Each counts the rows that break one reference; the foreign keys are not checked while the history is written.
BROKEN_REFERENCES = {
    "calls without their customer": """
        SELECT count(*) FROM calls LEFT JOIN users ON users.id = calls.user_id WHERE users.id IS NULL""",
    "calls with another customer's agent": """
        SELECT count(*) FROM calls
        LEFT JOIN agents ON agents.id = calls.agent_id AND agents.user_id = calls.user_id WHERE agents.id IS NULL""",
    "charges without their call and customer": """
        SELECT count(*) FROM credit_ledger
        LEFT JOIN calls ON calls.id = credit_ledger.call_id AND calls.user_id = credit_ledger.user_id
        WHERE calls.id IS NULL""",
    "webhooks without their call": """
        SELECT count(*) FROM webhook_events LEFT JOIN calls ON calls.id = webhook_events.call_id
        WHERE calls.id IS NULL""",
    "webhooks of another execution than their call's": """
        SELECT count(*) FROM webhook_events JOIN calls ON calls.id = webhook_events.call_id
        WHERE calls.execution_id <> webhook_events.execution_id""",
    "whole payloads naming another agent than their call's": """
        SELECT count(*) FROM webhook_events
        JOIN calls ON calls.id = webhook_events.call_id JOIN agents ON agents.id = calls.agent_id
        WHERE webhook_events.redacted_at IS NULL
          AND webhook_events.payload ->> 'agent_id' IS DISTINCT FROM agents.provider_agent_id""",
    "whole payloads naming another call": """
        SELECT count(*) FROM webhook_events
        WHERE redacted_at IS NULL
          AND (payload #>> '{context_details,recipient_data,callflow_call_id}')::uuid IS DISTINCT FROM call_id""",
    "calls not charged their credits once if completed, or charged if not": """
        SELECT count(*) FROM calls
        WHERE (SELECT array_agg(amount) FROM credit_ledger WHERE call_id = calls.id)
              IS DISTINCT FROM CASE WHEN status = 'completed' THEN ARRAY[-credits_charged] END""",
    "calls whose webhooks are not four statuses in the order a call moves, ending with its own": """
        SELECT count(*) FROM calls
        WHERE status IN ('queued', 'initiated', 'ringing', 'in-progress')
           OR coalesce(
                  (SELECT array_agg(status ORDER BY received_at) FROM webhook_events WHERE call_id = calls.id), '{}'
              ) NOT IN (
                  ARRAY['initiated', 'ringing', 'in-progress', status], ARRAY['queued', 'initiated', 'ringing', status]
              )""",
}


def test_the_historys_calls_charges_and_webhooks_reference_each_other():
    with migrated_database("callflow_bench_seed") as engine:
        with seed.connect(engine.url.render_as_string(hide_password=False)) as conn:
            conn.execute(seed.HISTORY_CUSTOMERS_SQL)
            for first in (1, seed.HISTORY_CALLS - CALLS_PER_END + 1):
                conn.execute(seed.history_calls_sql(first, first + CALLS_PER_END - 1))
                conn.execute(seed.history_webhooks_sql(first, first + CALLS_PER_END - 1))
            broken = {name: conn.execute(query).fetchone()[0] for name, query in BROKEN_REFERENCES.items()}
            calls, webhooks, whole, charges = conn.execute(
                """SELECT (SELECT count(*) FROM calls), (SELECT count(*) FROM webhook_events),
                          (SELECT count(*) FROM webhook_events WHERE redacted_at IS NULL),
                          (SELECT count(*) FROM credit_ledger)"""
            ).fetchone()
    assert broken == dict.fromkeys(BROKEN_REFERENCES, 0)
    assert (calls, webhooks) == (2 * CALLS_PER_END, 2 * CALLS_PER_END * seed.HISTORY_EVENTS_PER_CALL)
    assert 0 < whole < webhooks, "the newest calls' payloads are whole, the oldest redacted"
    assert 0 < charges < calls, "most calls completed and were charged; some ended without a conversation"
