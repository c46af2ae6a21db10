"""held slots: only the customer's own index can serve a count of one customer's held slots

The campaign and lease indexes over held slots were partial on `slot_held` alone, so the planner could serve
`user_id = ... AND slot_held` (every POST /api/calls and every dispatch, under the customer's lock) from either,
reading every customer's held slots. It does when the table was last analysed with few slots held: each partial
index is then estimated at one row, and it breaks the tie as it likes. Their predicates now also name their own
column, which their own queries imply (`campaign_id = ...`, `slot_lease_expires_at < now()`) and that one does not.
Each index is rebuilt in this migration's transaction: a scan of `calls` under a lock that holds writes back.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_INDEXES = {
    "ix_calls_campaign_slot_held": ("campaign_id", "slot_held AND campaign_id IS NOT NULL"),
    "ix_calls_slot_lease": ("slot_lease_expires_at", "slot_held AND slot_lease_expires_at IS NOT NULL"),
}


def upgrade() -> None:
    for name, (column, predicate) in _INDEXES.items():
        op.drop_index(name, table_name="calls")
        op.create_index(name, "calls", [column], postgresql_where=sa.text(predicate))


def downgrade() -> None:
    for name, (column, _) in _INDEXES.items():
        op.drop_index(name, table_name="calls")
        op.create_index(name, "calls", [column], postgresql_where=sa.text("slot_held"))
