"""Schema changes on live tables, for migrations: indexes built online, every step safe to re-run.

YugabyteDB's DDL is not transactional (a migration that fails half-way leaves what it
did), and `CREATE INDEX` inside a transaction block is built without online backfill.
So an index on a live table is created here outside the migration's transaction,
`CONCURRENTLY` (PostgreSQL; YSQL's default is online anyway), with `IF NOT EXISTS`;
an INVALID index left by an interrupted concurrent build is dropped and built again.
Everything here is PostgreSQL 11 syntax.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op


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
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        listed = yugabyte_columns if yugabyte_columns and is_yugabyte() else columns
        condition = f" WHERE {where}" if where else ""
        op.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} ({listed}){condition}")


def drop_index(name: str) -> None:
    """DROP INDEX CONCURRENTLY IF EXISTS, outside the migration transaction."""
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
