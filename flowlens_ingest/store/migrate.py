"""Alembic, driven from the installed package so it works from any working directory."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy.engine import Engine

from flowlens_ingest.store.deadline import deadline, install_deadlines


def script_location() -> Path:
    """The migrations folder: installed as flowlens_ingest/migrations, or alembic/ in a checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "migrations", package.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError("the migrations are missing from this installation")


def alembic_config(url: str) -> Config:
    """An alembic Config for `url`, independent of the current directory."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    # ConfigParser interpolation would eat the % of URL-encoded passwords.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


# Two release steps started at once (two deploys, a retried one) must not migrate side by side:
# the second waits for the first, then finds nothing left to do. A session advisory lock, held by
# alembic/env.py for the whole run.
MIGRATION_LOCK = 0x666C6F776C656E73  # "flowlens"
# How long a release step waits for another's lock before it gives up, saying so (a step that
# lingers, a session left holding it): no wait of the release is unbounded.
MIGRATION_LOCK_WAIT_S = 900.0
# Every database wait of one `db upgrade` ends within this (statements also have a 300 s timeout),
# and its connection is made within the second.
MIGRATION_DEADLINE_S = 3600.0
MIGRATION_CONNECT_S = 10.0
# The release step's questions around the migration (the revision before and after, the log
# setting) each end within this, their connection included, whatever the server does.
QUESTION_S = 30.0


def upgrade(
    url: str,
    revision: str = "head",
    *,
    lock_wait_s: float = MIGRATION_LOCK_WAIT_S,
    connect_s: float = MIGRATION_CONNECT_S,
) -> None:
    """Migrate the database at `url` to `revision`; CommandError if another run holds the lock past `lock_wait_s`.

    A server that does not answer within `connect_s` (OperationalError) is not waited for longer.
    """
    cfg = alembic_config(url)
    cfg.attributes["lock_wait_s"] = lock_wait_s
    cfg.attributes["connect_s"] = connect_s
    command.upgrade(cfg, revision)


def take_migration_lock(conn: sa.Connection, wait_s: float = MIGRATION_LOCK_WAIT_S) -> None:
    """The migration lock for the whole session (released when the connection closes), waited for at most `wait_s`.

    Asked, never tried into an error: YugabyteDB has advisory locks only where they are enabled
    (2.25 and later, `yb_enable_advisory_locks`); without them the run goes unlocked and says so,
    which is safe while one release step runs at a time (the Procfile's does). The wait polls
    `pg_try_advisory_lock`, so it ends at its bound instead of queueing for as long as the holder lives.
    """
    yugabyte, advisory = conn.execute(
        sa.text("SELECT position('-YB-' in version()) > 0, current_setting('yb_enable_advisory_locks', true)")
    ).one()
    conn.commit()
    if yugabyte and advisory != "on":
        logging.getLogger("alembic.env").warning("advisory locks unavailable; migrating without the lock")
        return
    ends = time.monotonic() + wait_s
    take = sa.text("SELECT pg_try_advisory_lock(:key)")
    while not conn.execute(take, {"key": MIGRATION_LOCK}).scalar():
        conn.commit()
        left = ends - time.monotonic()
        if left <= 0:
            raise CommandError(
                f"another release step has held the migration lock for over {wait_s:g} s;"
                " run this one again once it is done"
            )
        time.sleep(min(1.0, left))
    conn.commit()


def release(url: str, revision: str = "head") -> str | None:
    """The release step: migrate, then keep statement text out of the server log where the role may.

    Returns the command an operator should run when the role may not (see quiet_statement_log).
    """
    upgrade(url, revision)
    with _asking(url, QUESTION_S) as engine:
        return quiet_statement_log(engine)


def why_role_cannot_migrate(url: str, *, within: float = QUESTION_S) -> str | None:
    """Why the role of `url` cannot run the migrations (no schema to create in, or no CREATE on it); None if it can.

    Asked, not tried: a refused CREATE TABLE would be an error in the server's log and a traceback
    here. Ownership of tables an earlier role made is left to the migration itself.
    """
    with _asking(url, within) as engine, engine.connect() as conn:
        role, schema, may_create = conn.execute(
            sa.text(
                "SELECT current_user, current_schema(),"
                " current_schema() IS NOT NULL AND has_schema_privilege(current_schema(), 'CREATE')"
            )
        ).one()
    if schema is None:
        return f'role "{role}" has no schema to create tables in (its search_path names none that exists)'
    if may_create:
        return None
    return (
        f'role "{role}" may not create tables in schema "{schema}"; run `{UPGRADE_COMMAND}` as the schema\'s'
        f' owner, or have it run: GRANT CREATE ON SCHEMA "{schema}" TO "{role}";'
    )


def revision_of(url: str, *, within: float = QUESTION_S) -> str | None:
    """The alembic revision of the database at `url` (None: never migrated), known within `within` seconds.

    OperationalError when the server does not answer by then (a proxy that accepts and holds).
    """
    with _asking(url, within) as engine:
        return revisions(engine)[0]


@contextlib.contextmanager
def _asking(url: str, within: float) -> Iterator[Engine]:
    """An engine of its own for a few questions, every wait on it (connecting too) ended within `within` seconds."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    install_deadlines()
    try:
        with deadline(within):
            yield engine
    finally:
        engine.dispose()


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate the database at `url` down to `revision`."""
    command.downgrade(alembic_config(url), revision)


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("postgresql://"))


def resolvable(revision: str, current: str | None) -> bool:
    """Whether alembic can resolve `revision` as a target from `current` without tripping on it.

    Alembic asserts (AssertionError, no message) on a target that leaves it an empty revision id
    ('', '@', 'head+1', '0001-1'), where it says what is wrong with any other (CommandError): asked
    here, offline, so that only those are caught, and nothing of the migration itself.
    """
    try:
        for _ in _scripts().iterate_revisions(revision, current or "base", implicit_base=True):
            pass
    except AssertionError:
        return False
    except (CommandError, RevisionError):
        return True  # a target alembic names as unknown or out of reach: its own message says so
    return True


def head() -> str | None:
    """The newest revision the package ships."""
    return _scripts().get_current_head()


def is_known(revision: str) -> bool:
    """Whether the package ships `revision` (a database migrated by a newer release is not)."""
    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:  # what alembic raises for an id it does not know
        return False


def revisions(engine: Engine) -> tuple[str | None, str | None]:
    """(the database's revision, the package's head revision)."""
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, head()


UPGRADE_COMMAND = "flowlens-ingest db upgrade"


def pending(engine: Engine) -> str | None:
    """Why the database is not ready for this release, naming the command that migrates it; None when it is."""
    current, newest = revisions(engine)
    if current == newest or (current is not None and not is_known(current)):
        return None  # at head, or migrated by a newer release (a rolling deploy)
    at = f"at revision {current}" if current else "not migrated"
    return f"the database is {at}, this release needs {newest}: run `{UPGRADE_COMMAND}`"


# PostgreSQL logs the text of a failing statement (log_min_error_statement = error), and
# psycopg2 sends values as literals in that text: a payload would land in the server's
# log. The routine paths raise no error; for those that remain possible (40001 on
# YugabyteDB, a constraint nobody foresaw) the service's role has statement text kept
# out of the log. Only a superuser, or on PostgreSQL 15+ a role granted SET on the
# parameter, may set it.
QUIET_SETTING = "log_min_error_statement=panic"


def quiet_statement_log_command(role: str, database: str) -> str:
    """What an operator runs to keep `role`'s failing statements in `database` out of the server log."""

    def quoted(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    return (
        f"ALTER ROLE {quoted(role)} IN DATABASE {quoted(database)} SET log_min_error_statement = panic;"
        "  -- as a superuser, or after (PostgreSQL 15+)"
        f" GRANT SET ON PARAMETER log_min_error_statement TO {quoted(role)};"
    )


def quiet_statement_log(engine: Engine) -> str | None:
    """Keep the text of this role's failing statements in this database out of the server log, where it may.

    Set for the role in this database only (nothing else on the server changes),
    for its sessions from then on. Returns None when it is set (now or before),
    else the command an operator runs. Asks first rather than trying: no error as
    control flow.
    """
    with engine.connect() as conn:
        role, database, superuser, settings, version = conn.execute(
            sa.text(
                "SELECT r.rolname, d.datname, r.rolsuper, s.setconfig, current_setting('server_version_num')::int"
                " FROM pg_roles r JOIN pg_database d ON d.datname = current_database()"
                " LEFT JOIN pg_db_role_setting s ON s.setrole = r.oid AND s.setdatabase = d.oid"
                " WHERE r.rolname = current_user"
            )
        ).one()
        if QUIET_SETTING in (settings or []):
            return None
        allowed = superuser or (
            version >= 150000
            and conn.execute(sa.text("SELECT has_parameter_privilege('log_min_error_statement', 'SET')")).scalar_one()
        )
        if not allowed:
            return quiet_statement_log_command(role, database)
        conn.exec_driver_sql(
            f'ALTER ROLE CURRENT_USER IN DATABASE "{database.replace(chr(34), chr(34) * 2)}"'
            " SET log_min_error_statement = panic"
        )
        conn.commit()
    return None
