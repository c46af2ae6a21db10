"""calls remember when Bolna was asked and when it was last heard from; indexes for the retention job

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

LIVE = (
    "status NOT IN ('pending', 'completed', 'busy', 'no-answer', 'failed', 'canceled', 'stopped', 'error', "
    "'balance-low')"
)


def upgrade() -> None:
    op.add_column("calls", sa.Column("initiated_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("calls", sa.Column("provider_checked_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_calls_live_provider_checked", "calls", ["provider_checked_at"], postgresql_where=sa.text(LIVE))
    op.add_column("webhook_events", sa.Column("redacted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_webhook_events_unredacted",
        "webhook_events",
        ["received_at"],
        postgresql_where=sa.text("redacted_at IS NULL"),
    )
    op.create_index(
        "ix_outbox_published", "outbox", ["published_at"], postgresql_where=sa.text("published_at IS NOT NULL")
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_published", table_name="outbox")
    op.drop_index("ix_webhook_events_unredacted", table_name="webhook_events")
    op.drop_column("webhook_events", "redacted_at")
    op.drop_index("ix_calls_live_provider_checked", table_name="calls")
    op.drop_column("calls", "provider_checked_at")
    op.drop_column("calls", "initiated_at")
