"""No payload in the database server's log: the routine paths raise no error there at all.

PostgreSQL logs the text of a failing statement, and psycopg2 sends values as
literals in that text. Deliveries applied, duplicated, stale, failed and
replayed against a server of our own (the embedded server's programs, its log
in a file), whose statement logging is left at PostgreSQL's default.
"""

from __future__ import annotations

import copy
import json
import uuid

import pytest
import sqlalchemy as sa

from flowlens_ingest import replay
from flowlens_ingest.spool.drainer import spool_handler
from flowlens_ingest.store import migrate
from flowlens_ingest.web.app import create_app
from flowlens_ingest.web.services import services, start_drainer

from .databases import create_scratch_database, drop_database
from .helpers import github_headers, load_payload, make_settings

pytestmark = pytest.mark.slow

OPENED = load_payload("pull_request/opened.payload.json")


def test_duplicates_stale_failed_and_replayed_deliveries_leave_no_payload_in_the_server_log(throwaway, tmp_path):
    marker = f"private-code-{uuid.uuid4().hex}"
    app = create_app(make_settings(throwaway.url, tmp_path))
    client = app.test_client()

    def deliver(payload: dict, delivery: str, event: str = "pull_request") -> tuple[int, str]:
        body = json.dumps(payload).encode()
        response = client.post("/webhook", data=body, headers=github_headers(body, event, delivery=delivery))
        return response.status_code, response.get_json()["outcome"]

    newer = copy.deepcopy(OPENED)
    newer["pull_request"]["body"] = f"{marker} newer"
    older = copy.deepcopy(newer)
    older["pull_request"]["body"] = f"{marker} older"
    older["pull_request"]["updated_at"] = "2001-01-01T00:00:00Z"
    beyond_integer = copy.deepcopy(newer)
    beyond_integer["number"] = beyond_integer["pull_request"]["number"] = 2**40
    long_head = copy.deepcopy(newer)
    long_head["pull_request"]["number"] = long_head["number"] = 7
    long_head["pull_request"]["head"]["sha"] = marker * 100
    try:
        log_before = (throwaway.root / "server.log").read_text(errors="replace")
        assert deliver(newer, "applied") == (200, "applied")
        assert deliver(newer, "applied") == (200, "duplicate")
        assert deliver(older, "stale") == (200, "stale")
        assert deliver(older, "stale") == (200, "duplicate")
        assert deliver(beyond_integer, "beyond-integer") == (202, "failed")
        assert deliver(beyond_integer, "beyond-integer") == (202, "failed")
        assert deliver(long_head, "long-head") == (202, "failed")
        report = replay.replay(services(app).database)
        assert (report.replayed, report.failed) == (2, 2)
    finally:
        services(app).database.dispose()

    written = (throwaway.root / "server.log").read_text(errors="replace")[len(log_before) :]
    assert marker not in written
    assert [line for line in written.splitlines() if "ERROR" in line] == []


def test_a_database_not_yet_migrated_is_asked_not_sent_deliveries(throwaway, tmp_path):
    # A release started before its migration: once the drainer has found the schema not ready,
    # deliveries are spooled without a statement sent, so the server logs no error for them.
    scratch = create_scratch_database(throwaway.url, prefix="flowlens_unmigrated")
    app = create_app(make_settings(scratch, tmp_path))
    client = app.test_client()
    svc = services(app)
    try:
        assert svc.readiness.check() is not None  # the drainer's tick
        log_before = (throwaway.root / "server.log").read_text(errors="replace")
        for n in range(3):
            body = json.dumps(OPENED).encode()
            response = client.post(
                "/webhook", data=body, headers=github_headers(body, "pull_request", delivery=f"d{n}")
            )
            assert (response.status_code, response.get_json()["outcome"]) == (202, "spooled")
        written = (throwaway.root / "server.log").read_text(errors="replace")[len(log_before) :]
        assert [line for line in written.splitlines() if "ERROR" in line] == []
        # Migrated, the drainer finds it ready and applies what was kept.
        migrate.upgrade(scratch)
        assert svc.readiness.check() is None
        assert svc.spool is not None
        handle = spool_handler(svc.database, svc.settings, svc.metrics, readiness=svc.readiness)
        assert svc.spool.drain(handle) == (3, None)
    finally:
        svc.database.dispose()
        drop_database(scratch)


def test_a_worker_told_at_start_that_the_schema_is_not_ready_sends_no_statement(throwaway, tmp_path):
    # gunicorn's master found the database not migrated and said so: its workers' first deliveries
    # are spooled without a statement, before their drainers have asked anything.
    scratch = create_scratch_database(throwaway.url, prefix="flowlens_unmigrated")
    app = create_app(make_settings(scratch, tmp_path))
    client = app.test_client()
    engine = sa.create_engine(scratch, poolclass=sa.pool.NullPool)
    problem = migrate.pending(engine)
    engine.dispose()
    drainer = start_drainer(app, interval=3600, said_at_start=problem)
    try:
        log_before = (throwaway.root / "server.log").read_text(errors="replace")
        body = json.dumps(OPENED).encode()
        response = client.post("/webhook", data=body, headers=github_headers(body, "pull_request", delivery="first"))
        assert (response.status_code, response.get_json()["outcome"]) == (202, "spooled")
        written = (throwaway.root / "server.log").read_text(errors="replace")[len(log_before) :]
        assert [line for line in written.splitlines() if "ERROR" in line] == []
    finally:
        if drainer is not None:
            drainer.stop()
        services(app).database.dispose()
        drop_database(scratch)


def test_with_the_spool_off_a_schema_not_ready_is_answered_503_without_a_statement(throwaway, tmp_path):
    # No spool, so no drainer to ask: the request path asks (at most once a second, here at once) and
    # answers 503 without sending the delivery's statements, until the migration lands.
    scratch = create_scratch_database(throwaway.url, prefix="flowlens_unmigrated")
    app = create_app(make_settings(scratch, tmp_path, spool_max_bytes=0))
    client = app.test_client()
    engine = sa.create_engine(scratch, poolclass=sa.pool.NullPool)
    problem = migrate.pending(engine)
    engine.dispose()
    svc = services(app)
    assert start_drainer(app, said_at_start=problem) is None and svc.spool is None
    svc.readiness.ask_again_s = 0.0

    def deliver(delivery: str) -> tuple[int, str]:
        body = json.dumps(OPENED).encode()
        response = client.post("/webhook", data=body, headers=github_headers(body, "pull_request", delivery=delivery))
        return response.status_code, response.get_json().get("outcome", response.get_json().get("error", ""))

    try:
        log_before = (throwaway.root / "server.log").read_text(errors="replace")
        assert [deliver(f"d{n}")[0] for n in range(3)] == [503, 503, 503]
        written = (throwaway.root / "server.log").read_text(errors="replace")[len(log_before) :]
        assert [line for line in written.splitlines() if "ERROR" in line] == []
        migrate.upgrade(scratch)
        assert deliver("after") == (200, "applied")
    finally:
        svc.database.dispose()
        drop_database(scratch)


def test_db_upgrade_keeps_statement_text_out_of_the_log_where_the_role_may(server_url):
    """A superuser sets it for its role; a role that may not is given the command to run."""
    admin_engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    suffix = uuid.uuid4().hex[:8]
    scratch = create_scratch_database(server_url)
    roles = {"super": f"flowlens_super_{suffix}", "plain": f"flowlens_plain_{suffix}"}
    with admin_engine.connect() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{roles["super"]}" LOGIN SUPERUSER'))
        conn.execute(sa.text(f'CREATE ROLE "{roles["plain"]}" LOGIN'))
    try:
        answers = {}
        for kind, role in roles.items():
            url = sa.engine.make_url(scratch).set(username=role)
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            answers[kind] = migrate.quiet_statement_log(engine)
            # Asked again, a role already set is not set twice, and one that may not still may not.
            assert migrate.quiet_statement_log(engine) == answers[kind]
            engine.dispose()
        assert answers["super"] is None
        database = sa.engine.make_url(scratch).database
        assert answers["plain"] == migrate.quiet_statement_log_command(roles["plain"], database)
        assert answers["plain"].startswith(
            f'ALTER ROLE "{roles["plain"]}" IN DATABASE "{database}" SET log_min_error_statement = panic;'
        )
        with admin_engine.connect() as conn:
            settings = dict(
                conn.execute(
                    sa.text(
                        "SELECT r.rolname, s.setconfig FROM pg_roles r LEFT JOIN pg_db_role_setting s"
                        " ON s.setrole = r.oid AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = :d)"
                        " WHERE r.rolname IN (:a, :b)"
                    ),
                    {"a": roles["super"], "b": roles["plain"], "d": database},
                ).all()
            )
        assert settings == {roles["super"]: ["log_min_error_statement=panic"], roles["plain"]: None}
    finally:
        drop_database(scratch)
        with admin_engine.connect() as conn:
            for role in roles.values():
                conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))
        admin_engine.dispose()
