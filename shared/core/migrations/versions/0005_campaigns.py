"""campaigns and their contacts; a call may be one attempt at a campaign's contact

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_NOW = sa.text("now()")
_EMPTY_LIST = sa.text("'[]'::jsonb")


def upgrade() -> None:
    op.create_table(
        "campaigns",
        sa.Column("id", sa.UUID(), primary_key=True),
        sa.Column("user_id", sa.UUID(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("agent_id", sa.UUID(), sa.ForeignKey("agents.id"), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("pause_reason", sa.String(length=64), nullable=True),
        sa.Column("max_concurrency", sa.Integer(), nullable=True),
        sa.Column("start_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retry_max_attempts", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("retry_on_statuses", postgresql.JSONB(), server_default=_EMPTY_LIST, nullable=False),
        sa.Column("retry_interval_minutes", postgresql.JSONB(), server_default=_EMPTY_LIST, nullable=False),
        sa.Column("window_start_hour", sa.Integer(), nullable=True),
        sa.Column("window_end_hour", sa.Integer(), nullable=True),
        sa.Column("window_days", postgresql.JSONB(), nullable=True),
        sa.Column("contacts_total", sa.Integer(), nullable=False),
        sa.Column("last_dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("trace_headers", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=_NOW, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=_NOW, nullable=False),
    )
    op.create_index("ix_campaigns_user_created", "campaigns", ["user_id", "created_at"])
    op.create_index(
        "ix_campaigns_active", "campaigns", ["user_id"], postgresql_where=sa.text("status IN ('scheduled', 'running')")
    )
    op.create_table(
        "campaign_contacts",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True),
        sa.Column("campaign_id", sa.UUID(), sa.ForeignKey("campaigns.id"), nullable=False),
        sa.Column("row_number", sa.Integer(), nullable=False),
        sa.Column("phone_number", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("variables", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("waiting_for_window", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_call_id", sa.UUID(), nullable=True),
        sa.Column("final_status", sa.String(length=32), nullable=True),
        sa.UniqueConstraint("campaign_id", "phone_number", name="uq_campaign_contacts_number"),
    )
    op.create_index(
        "ix_campaign_contacts_due",
        "campaign_contacts",
        ["campaign_id", "next_attempt_at", "id"],
        postgresql_where=sa.text("state = 'waiting'"),
    )
    op.create_index(
        "ix_campaign_contacts_calling",
        "campaign_contacts",
        ["campaign_id"],
        postgresql_where=sa.text("state = 'calling'"),
    )
    op.create_index("ix_campaign_contacts_row", "campaign_contacts", ["campaign_id", "row_number"])
    op.add_column("calls", sa.Column("campaign_id", sa.UUID(), sa.ForeignKey("campaigns.id"), nullable=True))
    op.add_column(
        "calls", sa.Column("contact_id", sa.BigInteger(), sa.ForeignKey("campaign_contacts.id"), nullable=True)
    )
    op.create_index(
        "ix_calls_campaign",
        "calls",
        ["campaign_id", "created_at", "id"],
        postgresql_where=sa.text("campaign_id IS NOT NULL"),
    )
    op.create_index("ix_calls_campaign_slot_held", "calls", ["campaign_id"], postgresql_where=sa.text("slot_held"))
    op.create_index(
        "ix_calls_campaign_pending",
        "calls",
        ["campaign_id", "created_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.add_column("idempotency_keys", sa.Column("campaign_id", sa.UUID(), sa.ForeignKey("campaigns.id"), nullable=True))


def downgrade() -> None:
    op.drop_column("idempotency_keys", "campaign_id")
    op.drop_index("ix_calls_campaign_pending", table_name="calls")
    op.drop_index("ix_calls_campaign_slot_held", table_name="calls")
    op.drop_index("ix_calls_campaign", table_name="calls")
    op.drop_column("calls", "contact_id")
    op.drop_column("calls", "campaign_id")
    op.drop_table("campaign_contacts")
    op.drop_table("campaigns")
