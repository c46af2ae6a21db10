"""calls keep the trace their request started; failed webhook applies are counted and retried later

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    empty_object = sa.text("'{}'::jsonb")
    op.add_column(
        "calls",
        sa.Column("trace_headers", postgresql.JSONB(), server_default=empty_object, nullable=False),
    )
    op.add_column("webhook_events", sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False))
    op.add_column("webhook_events", sa.Column("last_error", sa.Text(), nullable=True))
    op.add_column("webhook_events", sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("webhook_events", "next_attempt_at")
    op.drop_column("webhook_events", "last_error")
    op.drop_column("webhook_events", "attempts")
    op.drop_column("calls", "trace_headers")
