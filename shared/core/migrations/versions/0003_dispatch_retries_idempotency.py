"""queued calls retry provider failures with backoff; Idempotency-Key on POST /api/calls

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("calls", sa.Column("dispatch_attempts", sa.Integer(), server_default=sa.text("0"), nullable=False))
    op.add_column("calls", sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_calls_slot_lease", "calls", ["slot_lease_expires_at"], postgresql_where=sa.text("slot_held"))
    op.create_table(
        "idempotency_keys",
        sa.Column("user_id", sa.UUID(), sa.ForeignKey("users.id"), primary_key=True),
        sa.Column("key", sa.String(length=255), primary_key=True),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("call_id", sa.UUID(), sa.ForeignKey("calls.id"), nullable=True),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", postgresql.JSONB(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_created_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_calls_slot_lease", table_name="calls")
    op.drop_column("calls", "next_attempt_at")
    op.drop_column("calls", "dispatch_attempts")
