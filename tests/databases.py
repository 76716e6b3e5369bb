"""Databases of a test's own: scratch databases on the test server, and a PostgreSQL server to stop and start."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from flask import Flask
from sqlalchemy.engine import make_url

from flowlens_ingest.store import migrate
from flowlens_ingest.web.app import create_app
from flowlens_ingest.web.services import services

from .helpers import free_port, make_settings


def create_scratch_database(admin_url: str, prefix: str = "flowlens_test") -> str:
    """Create an empty database on the server of `admin_url`; return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    """Drop a scratch database, closing whatever still holds it."""
    target = make_url(url)
    admin = sa.create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"
            ),
            {"d": target.database},
        )
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{target.database}"'))
    admin.dispose()


@contextlib.contextmanager
def app_on_scratch_database(server_url: str, tmp_path: Path, *, revision: str | None = None) -> Iterator[Flask]:
    """An app on a database of its own, migrated to `revision` (None: no schema at all)."""
    url = create_scratch_database(server_url, prefix="flowlens_ops")
    try:
        if revision is not None:
            migrate.upgrade(url)
            engine = sa.create_engine(url)
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": revision})
            engine.dispose()
        app = create_app(make_settings(url, tmp_path))
        yield app
        services(app).database.dispose()
    finally:
        drop_database(url)


class ThrowawayPostgres:
    """A PostgreSQL server of our own on a TCP port of 127.0.0.1, to stop and start at will."""

    def __init__(self, *, standby_of: ThrowawayPostgres | None = None) -> None:
        """A new cluster (initdb), or with `standby_of` a streaming standby of that running one (pg_basebackup -R)."""
        from flowlens_ingest.postgres import programs as pg_programs

        self.root = Path(tempfile.mkdtemp(prefix="flowlens-throwaway-pg-"))
        self.pgdata = self.root / "pgdata"
        self.port = free_port()
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"
        self.pgdata.mkdir(mode=0o700)
        # The embedded database's way of running PostgreSQL's programs (never as root).
        self.identity = pg_programs.identity_for(self.pgdata)
        if standby_of is None:
            self._run("initdb", "-D", str(self.pgdata), "--auth=trust", "--encoding=utf8", "-U", "postgres")
            return
        # A copy of the primary as it is now, which starts as a hot standby streaming from it
        # (-R: standby.signal and primary_conninfo; initdb's pg_hba lets local replication in).
        self._run(
            "pg_basebackup",
            *("-D", str(self.pgdata), "-h", "127.0.0.1", "-p", str(standby_of.port), "-U", "postgres"),
            *("-R", "-X", "stream", "-c", "fast", "--no-password"),
        )

    def _run(self, program: str, *args: str) -> None:
        self.identity.run(program, *args)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-h 127.0.0.1 -p {self.port} -c unix_socket_directories='' -c fsync=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.pgdata),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "-l",
            str(self.root / "server.log"),
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop it the way an outage looks: connections cut, new ones refused (`immediate`: a crash, no checkpoint)."""
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-m", mode, "stop")

    def promote(self) -> None:
        """A standby becomes a primary; returns once it accepts writes."""
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "promote")

    def running(self) -> bool:
        """Whether the postmaster is up."""
        return (self.pgdata / "postmaster.pid").exists()

    def remove(self) -> None:
        """Stop if running and delete the data directory."""
        if self.running():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
