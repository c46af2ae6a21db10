"""held slots: a count of one customer's, or one campaign's, held slots is served by its own index only

The three indexes over held slots were partial on `slot_held` alone, so the planner could serve `user_id = ... AND
slot_held` (every POST /api/calls and every dispatch, under the customer's lock) from the campaign or lease index,
reading every customer's held slots, and a campaign's count from the customer index. It did, when the table was
last analysed with few slots held: each partial index is then estimated at one row, and it breaks the tie as it
likes. Each predicate now also names its index's own column, which its queries imply (`user_id = ...`, `campaign_id
= ...`, `slot_lease_expires_at < now()`) and the others' do not.

The new indexes are all built beside the old ones first, then swapped in: writes to `calls` wait while they are built
(a scan of the table each), reads only for the swaps, which end the migration's transaction.

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
    "ix_calls_user_slot_held": ("user_id", "slot_held AND user_id IS NOT NULL"),
    "ix_calls_campaign_slot_held": ("campaign_id", "slot_held AND campaign_id IS NOT NULL"),
    "ix_calls_slot_lease": ("slot_lease_expires_at", "slot_held AND slot_lease_expires_at IS NOT NULL"),
}


def _swap_in(predicates: dict[str, str]) -> None:
    """Builds every index anew first (its build holds writes back, not reads), then drops each old one and renames
    its successor (the drop locks the table until the commit, so it comes last)."""
    for name, predicate in predicates.items():
        column, _ = _INDEXES[name]
        op.create_index(f"{name}_new", "calls", [column], postgresql_where=sa.text(predicate))
    for name in predicates:
        op.drop_index(name, table_name="calls")
        op.execute(f"ALTER INDEX {name}_new RENAME TO {name}")


def upgrade() -> None:
    _swap_in({name: predicate for name, (_, predicate) in _INDEXES.items()})


def downgrade() -> None:
    _swap_in(dict.fromkeys(_INDEXES, "slot_held"))
