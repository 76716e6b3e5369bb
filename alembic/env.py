"""Alembic environment: one transaction per migration, bounded lock waits.

YugabyteDB runs each migration in its own transaction too; keep every migration
to syntax PostgreSQL 11 understands (YugabyteDB's YSQL is built on it).
"""

from __future__ import annotations

import logging.config
import os
import sys

import sqlalchemy as sa
from alembic import context

from flowlens_ingest.config import ConfigError
from flowlens_ingest.database_urls import normalize_database_url
from flowlens_ingest.store.schema import metadata

config = context.config
if config.config_file_name is not None:
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL", "")
    if not url:
        raise SystemExit("DATABASE_URL is not set")
    try:
        return normalize_database_url(url)
    except ConfigError as exc:
        # One line and exit 2, as every entry point says a configuration error.
        print(f"flowlens-ingest: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=metadata,
        literal_binds=True,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


# Two release steps started at once (two deploys, a retried one) must not migrate
# side by side: the second waits for the first, then finds nothing left to do.
MIGRATION_LOCK = 0x666C6F776C656E73  # "flowlens"


def take_migration_lock(conn: sa.Connection) -> None:
    """A session advisory lock for the whole run (released when the connection closes)."""
    try:
        conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
        conn.commit()
    except sa.exc.DBAPIError:
        # YugabyteDB releases before advisory locks (2.25) refuse the call: run unlocked,
        # which is safe as long as one release step runs at a time (the Procfile's does).
        conn.rollback()
        logging.getLogger("alembic.env").warning("advisory locks unavailable; migrating without the lock")


def run_online() -> None:
    engine = sa.create_engine(database_url(), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        take_migration_lock(conn)
        # Fail fast instead of queueing behind live traffic's locks.
        conn.execute(sa.text("SET lock_timeout = '10s'"))
        conn.execute(sa.text("SET statement_timeout = '300s'"))
        conn.commit()
        context.configure(
            connection=conn,
            target_metadata=metadata,
            transaction_per_migration=True,
            compare_type=True,
            compare_server_default=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
