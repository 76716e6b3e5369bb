"""indexes that spread writes: the poller's partial indexes, a bucketed journal time index

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 18:05:00

YugabyteDB shards an index by a hash of its first column, so an index leading with
`processed` or `outcome` puts every write on one tablet. The poller's indexes become
partial indexes on the unprocessed rows, led by `updated_at`; the journal's time
index is led by a small bucket (a hash of the delivery id), read bucket by bucket in
time order. Every index is built online (the helpers below) and every step can
be run again after a partial failure. Existing journal rows keep bucket 0: reads
cover every bucket, so no backfill of a live table is needed.
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

POLLED = ("pull_requests", "pipeline_runs", "insights")

# Indexes on live tables. YugabyteDB's DDL is not transactional (a migration that fails
# half-way leaves what it did), and `CREATE INDEX` inside a transaction block is built
# without online backfill. So an index on a live table is created outside the
# migration's transaction, `CONCURRENTLY` (PostgreSQL; YSQL's default is online anyway),
# with `IF NOT EXISTS`; an INVALID index left by an interrupted concurrent build is
# dropped and built again. PostgreSQL 11 syntax. Defined here, not imported: a migration
# must do tomorrow what it did the day it was written (copy them into a new migration).


def is_yugabyte() -> bool:
    """The migration runs against YugabyteDB's YSQL (False when rendering SQL offline)."""
    if context.is_offline_mode():
        return False
    version = op.get_bind().execute(sa.text("SELECT version()")).scalar()
    return "-YB-" in str(version)


def _invalid(name: str) -> bool:
    if context.is_offline_mode():
        return False
    found = op.get_bind().execute(
        sa.text(
            "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.relname = :name AND pg_table_is_visible(c.oid)"
        ),
        {"name": name},
    )
    return bool(found.scalar())


def create_index(name: str, table: str, columns: str, *, yugabyte_columns: str | None = None, where: str = "") -> None:
    """CREATE INDEX CONCURRENTLY IF NOT EXISTS, outside the migration transaction, re-runnable.

    `yugabyte_columns` is the column list for YSQL when it differs (e.g. `bucket HASH,
    received_at ASC`: PostgreSQL has no HASH column option).
    """
    with op.get_context().autocommit_block():
        if _invalid(name):
            op.execute(drop_statement(name, yugabyte=is_yugabyte()))
        listed = yugabyte_columns if yugabyte_columns and is_yugabyte() else columns
        condition = f" WHERE {where}" if where else ""
        op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} ({listed}){condition}")


def drop_statement(name: str, *, yugabyte: bool) -> str:
    """DROP INDEX IF EXISTS: CONCURRENTLY on PostgreSQL; plain on YugabyteDB, whose YSQL refuses
    CONCURRENTLY ("DROP INDEX CONCURRENTLY not supported yet", yugabyte-db #22717, #31574)."""
    return f"DROP INDEX {'' if yugabyte else 'CONCURRENTLY '}IF EXISTS {name}"


def drop_index(name: str) -> None:
    """DROP INDEX IF EXISTS (concurrently where the server can), outside the migration transaction."""
    with op.get_context().autocommit_block():
        op.execute(drop_statement(name, yugabyte=is_yugabyte()))


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
