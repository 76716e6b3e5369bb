"""indexes that spread writes: the poller's partial indexes, a bucketed journal time index

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 18:05:00

YugabyteDB shards an index by a hash of its first column, so an index leading with
`processed` or `outcome` puts every write on one tablet. The poller's indexes become
partial indexes on the unprocessed rows, led by `updated_at`; the journal's time
index is led by a small bucket (a hash of the delivery id), read bucket by bucket in
time order. Every index is built online (flowlens_ingest.online) and every step can
be run again after a partial failure. Existing journal rows keep bucket 0: reads
cover every bucket, so no backfill of a live table is needed.
"""

from alembic import op

from flowlens_ingest.online import create_index, drop_index

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

POLLED = ("pull_requests", "pipeline_runs", "insights")


def upgrade() -> None:
    op.execute("ALTER TABLE webhook_deliveries ADD COLUMN IF NOT EXISTS bucket SMALLINT DEFAULT 0 NOT NULL")
    create_index(
        "ix_webhook_deliveries_bucket_received_at",
        "webhook_deliveries",
        "bucket, received_at",
        yugabyte_columns="bucket HASH, received_at ASC",
    )
    create_index("ix_webhook_deliveries_failed", "webhook_deliveries", "received_at", where="outcome = 'failed'")
    for table in POLLED:
        create_index(f"ix_{table}_unprocessed", table, "updated_at", where="processed = false")
    drop_index("ix_webhook_deliveries_received_at")
    drop_index("ix_webhook_deliveries_outcome_received_at")
    for table in POLLED:
        drop_index(f"ix_{table}_processed_updated_at")


def downgrade() -> None:
    for table in POLLED:
        create_index(f"ix_{table}_processed_updated_at", table, "processed, updated_at")
    create_index("ix_webhook_deliveries_outcome_received_at", "webhook_deliveries", "outcome, received_at")
    create_index("ix_webhook_deliveries_received_at", "webhook_deliveries", "received_at")
    for table in POLLED:
        drop_index(f"ix_{table}_unprocessed")
    drop_index("ix_webhook_deliveries_failed")
    drop_index("ix_webhook_deliveries_bucket_received_at")
    op.execute("ALTER TABLE webhook_deliveries DROP COLUMN IF EXISTS bucket")
