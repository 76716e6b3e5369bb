"""Alembic environment: one run at a time (migrate.take_migration_lock), one transaction per migration, bounded waits.

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
from flowlens_ingest.store import migrate
from flowlens_ingest.store.deadline import deadline, install_deadlines
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


def run_online() -> None:
    # Every wait bounded: connecting, the lock (migrate.take_migration_lock), and each statement
    # (statement_timeout below, and the client's deadline for a server that stops answering).
    install_deadlines()
    engine = sa.create_engine(database_url(), poolclass=sa.pool.NullPool)
    with deadline(migrate.MIGRATION_DEADLINE_S):
        # libpq's connect_timeout does not apply to the wait callback's connections: a deadline does.
        with deadline(config.attributes.get("connect_s", migrate.MIGRATION_CONNECT_S)):
            connection = engine.connect()
        with connection as conn:
            _migrate(conn)
    engine.dispose()


def _migrate(conn: sa.Connection) -> None:
    migrate.take_migration_lock(conn, config.attributes.get("lock_wait_s", migrate.MIGRATION_LOCK_WAIT_S))
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


if context.is_offline_mode():
    run_offline()
else:
    run_online()
