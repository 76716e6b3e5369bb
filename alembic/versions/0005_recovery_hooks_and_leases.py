"""recovery: the hooks deliveries came from, a marker for bodies fetched from the API, leases

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 04:45:00

`recover` reads the delivery log of every hook the journal has seen: `webhook_hooks`
records each (from the X-GitHub-Hook-Installation-Target-Type/-ID headers) with its
API path and how far the scheduled pass has checked it. `webhook_deliveries.body_from_api`
marks a journal body that is GitHub's API JSON (`recover --fetch`), not the signed bytes:
a constant default, so no table rewrite (PostgreSQL 11+) and no scan of the live journal.
`leases` lets one worker across all VMs run the scheduled pass; `backfill_progress` is where
an interrupted `backfill` resumes. New tables, keyed by
their primary keys only: no index on a live table, PostgreSQL 11 syntax.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE webhook_deliveries ADD COLUMN IF NOT EXISTS body_from_api BOOLEAN DEFAULT false NOT NULL"
    )
    op.create_table(
        "webhook_hooks",
        sa.Column("hook_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("target_type", sa.Text(), nullable=False),
        sa.Column("target_id", sa.BigInteger(), nullable=True),
        sa.Column("api_path", sa.Text(), nullable=False),
        sa.Column("checked_through", sa.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("created_at", sa.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("hook_id", name=op.f("pk_webhook_hooks")),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("holder", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("leased_until", sa.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )
    op.create_table(
        "backfill_progress",
        sa.Column("full_name", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("done_through", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.TIMESTAMP(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("full_name", "scope", name=op.f("pk_backfill_progress")),
    )


def downgrade() -> None:
    op.drop_table("backfill_progress")
    op.drop_table("leases")
    op.drop_table("webhook_hooks")
    op.execute("ALTER TABLE webhook_deliveries DROP COLUMN IF EXISTS body_from_api")
