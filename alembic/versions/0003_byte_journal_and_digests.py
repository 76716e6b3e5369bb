"""byte journal, and content digests for a total merge order

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 17:45:00

The journal keeps the exact bytes a delivery's signature covered (`body`), not
a re-serialized JSONB copy that refused text PostgreSQL cannot store. Existing
rows are carried over as the JSON text of their payload. Snapshot tables get a
`digest` column: the last key of the order that merges snapshots with equal
GitHub timestamps. Every column added is nullable or has a constant default (no
table rewrite on PostgreSQL 11+).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SNAPSHOT_TABLES = ("repositories", "pull_requests", "pipeline_runs", "ci_checks", "pr_reviews")


def upgrade() -> None:
    op.add_column("webhook_deliveries", sa.Column("body", sa.LargeBinary(), nullable=True))
    op.add_column(
        "webhook_deliveries", sa.Column("body_encoding", sa.Text(), server_default="identity", nullable=False)
    )
    op.add_column("webhook_deliveries", sa.Column("content_type", sa.Text(), nullable=True))
    op.create_check_constraint(
        op.f("ck_webhook_deliveries_body_encoding"), "webhook_deliveries", "body_encoding IN ('identity', 'gzip')"
    )
    op.execute(
        "UPDATE webhook_deliveries SET body = convert_to(payload::text, 'UTF8'), content_type = 'application/json'"
        " WHERE payload IS NOT NULL"
    )
    op.drop_column("webhook_deliveries", "payload")
    for table in SNAPSHOT_TABLES:
        op.add_column(table, sa.Column("digest", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    for table in SNAPSHOT_TABLES:
        op.drop_column(table, "digest")
    op.add_column(
        "webhook_deliveries",
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), autoincrement=False, nullable=True),
    )
    # Best effort: plain JSON bodies come back; form-encoded or compressed ones do not.
    op.execute(
        "UPDATE webhook_deliveries SET payload = convert_from(body, 'UTF8')::jsonb"
        " WHERE body_encoding = 'identity' AND content_type LIKE 'application/json%'"
        " AND convert_from(body, 'UTF8') NOT LIKE '%\\u0000%'"
    )
    op.drop_constraint(op.f("ck_webhook_deliveries_body_encoding"), "webhook_deliveries", type_="check")
    op.drop_column("webhook_deliveries", "content_type")
    op.drop_column("webhook_deliveries", "body_encoding")
    op.drop_column("webhook_deliveries", "body")
