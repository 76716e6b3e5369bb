"""The `db` commands: migrate (`db upgrade`) and open psql (`db shell`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from flowlens_ingest.cli.connect import database_label, load_settings, require_embedded, unavailable
from flowlens_ingest.cli.output import NOT_DONE, fail
from flowlens_ingest.config import ConfigError, child_environment
from flowlens_ingest.postgres import programs as pg_programs

# How long `db shell`'s psql waits to connect when the operator did not say.
PSQL_CONNECT_TIMEOUT_S = 10


def db_upgrade(revision: str) -> int:
    """alembic upgrade on DATABASE_URL, or on the embedded database."""
    import sqlalchemy as sa
    from alembic.util import CommandError

    from flowlens_ingest.store import migrate

    settings = load_settings()
    url = settings.database_url
    server = None
    where = "DATABASE_URL"
    if not url:
        from flowlens_ingest.postgres import embedded

        # Run from the wrong folder, this must not make a new database: `serve` makes it.
        require_embedded(settings)
        server, url = embedded.start(settings.data_dir)
        where = f"the embedded database in {settings.data_dir / 'pgdata'}"
    try:
        before = migrate.revision_of(url)
        if not migrate.resolvable(revision, before):
            return fail(f"cannot upgrade to {revision!r}: it names no revision (head, or an id from `alembic history`)")
        cannot = migrate.why_role_cannot_migrate(url) if before != migrate.head() else None
        if cannot is not None:
            return fail(f"the database {database_label(settings)} cannot be migrated: {cannot}", NOT_DONE)
        command = migrate.release(url, revision)
        after = migrate.revision_of(url)
    except CommandError as exc:
        return fail(f"cannot upgrade to {revision!r}: {exc}")
    except sa.exc.OperationalError as exc:
        return unavailable(settings, exc, "nothing migrated")
    finally:
        # This command's use of the embedded server ends here, whatever became of the migration.
        if server is not None:
            server.close()
    print(f"flowlens-ingest: {where} {_upgraded(revision, before, after)}")
    if command is not None:
        print(
            "flowlens-ingest: this role may not keep its failing statements' text (payload values) out of"
            f" the server log; have an administrator run:\n  {command}",
            file=sys.stderr,
        )
    return 0


def _upgraded(asked: str, before: str | None, after: str | None) -> str:
    """What `db upgrade` did, from the revisions before and after it."""
    from flowlens_ingest.store import migrate

    def name(revision: str | None) -> str:
        return f"{revision} (head)" if revision is not None and revision == migrate.head() else str(revision)

    if before != after:
        start = f"revision {before}" if before is not None else "no revision (never migrated)"
        return f"upgraded from {start} to {name(after)}"
    if asked not in ("head", "heads", after):
        # Asked for an older revision: upgrade never goes down (alembic does nothing).
        return f"already at {name(after)}, past {asked}: nothing to do (db upgrade never downgrades)"
    return f"already at {name(after)}, nothing to do"


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """A SQLAlchemy URL as the libpq connection string psql needs, its password moved to PGPASSWORD (not in `ps`).

    Built from the very keywords the service's driver gets (SQLAlchemy's reading of the URL),
    so psql goes where the service goes: `?host=h1:5432&host=h2:5432` as a libpq URI would
    be one host named `h2:5432`, while the keywords say `host=h1,h2 port=5432,5432`.
    """
    import sqlalchemy as sa
    from psycopg2.extensions import make_dsn

    parsed = sa.engine.make_url(url)
    keywords = {key: str(value) for key, value in parsed.get_dialect()().create_connect_args(parsed)[1].items()}
    password = keywords.pop("password", None)
    env = {"PGPASSWORD": password} if password else {}
    return make_dsn(**keywords), env


def db_shell(arguments: Sequence[str]) -> int:
    """psql on DATABASE_URL, or on the embedded database with the psql bundled with it."""
    import shutil

    settings = load_settings()
    server = None
    if settings.database_url:
        url = settings.database_url
        psql = shutil.which("psql")
        if psql is None:
            try:
                psql = str(pg_programs.psql_path())
            except ConfigError:
                return fail("psql not found: install PostgreSQL's client (e.g. apt install postgresql-client)")
    else:
        require_embedded(settings)
        from flowlens_ingest.postgres import embedded

        server, url = embedded.start(settings.data_dir, create=False)
        psql = str(pg_programs.psql_path())
    dsn, extra = _libpq(url)
    # A server that accepts and never answers: psql gives up on connecting after this, unless the
    # operator says otherwise (PGCONNECT_TIMEOUT, or connect_timeout in DATABASE_URL).
    extra.setdefault("PGCONNECT_TIMEOUT", os.environ.get("PGCONNECT_TIMEOUT", str(PSQL_CONNECT_TIMEOUT_S)))
    # Ctrl-C belongs to psql (it cancels the query), not to us.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = subprocess.call([psql, dsn, *arguments], env=child_environment(**extra))
    finally:
        signal.signal(signal.SIGINT, previous)
    if server is not None:
        server.close()
    return code
