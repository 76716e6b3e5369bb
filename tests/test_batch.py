"""Server-side prepared statements: the same rows as plain SQL text, and sessions that lose them recover.

Each worker session PREPAREs a statement the first time it sends it and then only
EXECUTEs it. A session can lose them behind its back (a pooler's DISCARD ALL, a
migration changing a result type): deliveries must still apply, exactly once.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2.extensions
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from bench.proxy import FreezingProxy
from flowlens_ingest.config import Settings
from flowlens_ingest.database_urls import normalize_database_url
from flowlens_ingest.github import jobs
from flowlens_ingest.ingest import ingest
from flowlens_ingest.store import derived, hooks, journal, journal_admin, migrate, statements
from flowlens_ingest.store.batch import Statement
from flowlens_ingest.store.bytea import Bytea
from flowlens_ingest.store.database import Database, make_engine
from flowlens_ingest.store.expressions import param
from flowlens_ingest.store.schema import pipeline_runs, webhook_deliveries
from flowlens_ingest.store.wire import form, send

from .databases import create_scratch_database, drop_database
from .helpers import rows
from .stories import (
    START,
    RandomPicker,
    apply,
    build_story,
    business_rows,
    database_of,
    delivery,
    pull_request,
    repository,
    sha_for,
)

REPO = repository(7_000_001)
SHA_A, SHA_B = sha_for("prepared", "a"), sha_for("prepared", "b")


@contextmanager
def one_session(database_url: str, *, prepared: bool = True) -> Iterator[Engine]:
    """The service's engine with a single pooled connection, so every delivery shares one session."""
    settings = Settings(database_url=normalize_database_url(database_url), pool_size=1, prepared_statements=prepared)
    engine = make_engine(settings)
    try:
        yield engine
    finally:
        engine.dispose()


def prepared_names(engine: Engine) -> set[str]:
    """The statements prepared in the engine's (only) session."""
    with engine.connect() as conn:
        return set(conn.exec_driver_sql("SELECT name FROM pg_prepared_statements").scalars())


def opened_then_synchronized(engine: Engine, between=lambda: None) -> None:
    assert apply(engine, "pull_request", pull_request("opened", REPO, 1, SHA_A, START)) == "applied"
    between()
    later = START.replace(minute=5)
    assert apply(engine, "pull_request", pull_request("synchronize", REPO, 1, SHA_B, later)) == "applied"


def assert_synchronized_once(db: Engine) -> None:
    (pipeline,) = rows(db, pipeline_runs, "commit_sha", "version", "processed")
    assert pipeline == {"commit_sha": SHA_B, "version": 2, "processed": False}
    journal = rows(db, webhook_deliveries, "outcome", "attempts")
    assert journal == [{"outcome": "applied", "attempts": 1}] * 2


def _echo() -> sa.Executable:
    # Constants that look like psycopg2 placeholders, an escaped one, a percent sign,
    # and one parameter used twice: SQLAlchemy writes the SQL, nothing rewrites it.
    return sa.select(
        sa.literal("%(x)s"),
        sa.literal("%%(x)s"),
        sa.literal("50%"),
        param("a"),
        sa.cast(param("a"), sa.Text) + sa.literal("%s"),
        param("b"),
    )


def _one() -> sa.Executable:
    return sa.select(sa.literal(1))


def test_a_prepared_statement_numbers_each_parameter_once():
    prepared = form(_echo, (), prepared=True)
    assert prepared.names == ("a", "b")
    assert prepared.prepare is not None
    assert prepared.prepare.startswith(f"PREPARE {prepared.name} AS SELECT '%(x)s' AS ".encode())
    assert b"'%%(x)s'" in prepared.prepare and b"'50%'" in prepared.prepare
    assert b"$1" in prepared.prepare and b"$2" in prepared.prepare and b"$3" not in prepared.prepare
    assert prepared.text == f"EXECUTE {prepared.name}(%s, %s)"
    assert form(_one, (), prepared=True).text == f"EXECUTE {form(_one, (), prepared=True).name}"
    assert form(_one, (), prepared=True).name != prepared.name


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "plain"])
def test_constants_that_look_like_placeholders_reach_the_server_as_written(database_url, prepared):
    # Regression: the regex that numbered placeholders ignored `%%` escapes and
    # turned `'%%(x)s', %(a)s` into `'%$1', $2`.
    settings = Settings(database_url=normalize_database_url(database_url), pool_size=1, prepared_statements=prepared)
    database = Database(settings, application_name="flowlens-tests-echo")
    try:
        row = database.run([Statement(_echo, {"a": "it's 100%", "b": "%(a)s"})])
        assert row == ("%(x)s", "%%(x)s", "50%", "it's 100%", "it's 100%%s", "%(a)s")
        # Again, on the same session: EXECUTE only, the same answer.
        assert database.run([Statement(_echo, {"a": "it's 100%", "b": "%(a)s"})]) == row
    finally:
        database.dispose()


def test_a_constant_without_a_faithful_literal_is_refused_when_compiled():
    def backslash() -> sa.Executable:
        return sa.select(sa.literal("a\\b"))

    with pytest.raises(sa.exc.CompileError, match="literal"):
        form(backslash, (), prepared=True)


def test_a_session_prepares_each_statement_once(db, database_url):
    with one_session(database_url) as engine:
        assert apply(engine, "pull_request", pull_request("opened", REPO, 1, SHA_A, START)) == "applied"
        first = prepared_names(engine)
        # Repository, pull request, pipeline row, files job, journal.
        assert len(first) == 5 and all(name.startswith("flowlens_") for name in first)
        assert apply(engine, "pull_request", pull_request("opened", REPO, 2, SHA_B, START)) == "applied"
        assert prepared_names(engine) == first


@pytest.mark.parametrize("level", ["READ COMMITTED", "REPEATABLE READ"])
def test_a_delivery_costs_the_database_one_query_whatever_the_isolation_level(db, database_url, level):
    """What the server receives, counted on the wire: the batch alone, a duplicate's too.

    psycopg2 once added a SET default_transaction_isolation as a batch turned autocommit on and
    off (a connection-level isolation level): a round trip a delivery that the service's own
    count did not see.
    """
    proxy, url = FreezingProxy.to(database_url)
    try:
        settings = Settings(
            database_url=normalize_database_url(url + "?sslmode=disable&gssencmode=disable"),
            pool_size=1,
            isolation_level=level,
        )
        engine = make_engine(settings)
        try:
            # The session's first delivery also PREPAREs its statements.
            assert apply(engine, "pull_request", pull_request("opened", REPO, 1, SHA_A, START)) == "applied"
            before = proxy.queries
            assert before > 0
            for number in range(2, 7):
                sha = sha_for("wire", str(number))
                assert apply(engine, "pull_request", pull_request("opened", REPO, number, sha, START)) == "applied"
            payload = pull_request("opened", REPO, 7, SHA_B, START)
            assert apply(engine, "pull_request", payload) == "applied"
            assert ingest(database_of(engine), delivery("pull_request", payload, "wire-dup")).outcome == "applied"
            assert ingest(database_of(engine), delivery("pull_request", payload, "wire-dup")).outcome == "duplicate"
            assert proxy.queries - before == 8
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == level.lower()
        finally:
            engine.dispose()
    finally:
        proxy.close()


def _isolation_in_force() -> sa.Select[Any]:
    """The isolation level of the transaction this statement runs in."""
    return sa.select(sa.func.current_setting("transaction_isolation"))


@pytest.mark.parametrize("rollback_refused", [False, True])
def test_a_batch_runs_at_the_level_it_names_and_leaves_no_transaction_open(db, database_url, rollback_refused):
    """One round trip (an implicit transaction) or two (BEGIN, then COMMIT): the batch's own level either way."""
    with one_session(database_url) as engine:
        pooled = engine.raw_connection()
        try:
            dbapi = pooled.dbapi_connection
            # The session's default is the service's, READ COMMITTED; the batch names another.
            batch = [Statement(_isolation_in_force, {})]
            assert send(dbapi, batch, "REPEATABLE READ", rollback_refused=rollback_refused) == ("repeatable read",)
            assert dbapi.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
            assert send(dbapi, batch, rollback_refused=rollback_refused) == ("read committed",)
        finally:
            pooled.close()


def test_prepared_statements_can_be_turned_off():
    assert Settings.from_env({}).prepared_statements is True
    assert Settings.from_env({"FLOWLENS_PREPARED_STATEMENTS": "off"}).prepared_statements is False


@pytest.mark.parametrize("seed", [3, 11])
def test_a_story_gives_the_same_rows_with_and_without_prepared_statements(db, database_url, seed):
    story_prepared = build_story(RandomPicker(seed), 7_000_100, 1)
    story_plain = build_story(RandomPicker(seed), 7_000_200, 1)
    with one_session(database_url) as engine:
        outcomes_prepared = [apply(engine, event, payload) for event, payload in story_prepared.events]
        assert prepared_names(engine)
    with one_session(database_url, prepared=False) as engine:
        outcomes_plain = [apply(engine, event, payload) for event, payload in story_plain.events]
        assert prepared_names(engine) == set()
    assert outcomes_prepared == outcomes_plain
    assert business_rows(db, 7_000_100) == business_rows(db, 7_000_200)


def test_a_session_that_lost_its_statements_prepares_them_again(db, database_url):
    with one_session(database_url) as engine:

        def forget() -> None:
            # What a pooler's DISCARD ALL does to a session behind the service's back.
            with engine.connect() as conn:
                conn.exec_driver_sql("DEALLOCATE ALL")
            assert prepared_names(engine) == set()

        opened_then_synchronized(engine, between=forget)
        assert prepared_names(engine)
    assert_synchronized_once(db)


def test_a_session_whose_prepares_failed_part_way_is_not_used_again(db, database_url):
    with one_session(database_url) as engine:
        # A release that has not migrated the journal yet: the batch's first statements are prepared,
        # the journal's is refused, and the session now holds statements it did not record.
        with db.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE webhook_deliveries RENAME TO webhook_deliveries_away")
        try:
            result = ingest(
                database_of(engine), delivery("pull_request", pull_request("opened", REPO, 1, SHA_A, START))
            )
            assert result.outcome is None
        finally:
            with db.begin() as conn:
                conn.exec_driver_sql("ALTER TABLE webhook_deliveries_away RENAME TO webhook_deliveries")
        # The next delivery runs on a fresh session: no refusal of a statement prepared twice (42P05), no retry.
        retries: list[str] = []
        later = START.replace(minute=5)
        synchronized = delivery("pull_request", pull_request("synchronize", REPO, 1, SHA_B, later))
        assert ingest(database_of(engine), synchronized, on_retry=retries.append).outcome == "applied"
        assert retries == []


def test_a_migration_under_a_running_worker_does_not_fail_its_deliveries(server_url):
    # A rolling deploy: the release step changes a column a prepared statement
    # returns while this worker's session holds the old plan.
    url = create_scratch_database(server_url, prefix="flowlens_prepared")
    try:
        migrate.upgrade(url)
        with one_session(url) as engine:

            def migrate_outcome_column() -> None:
                admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
                with admin.begin() as conn:
                    conn.exec_driver_sql("ALTER TABLE webhook_deliveries ALTER COLUMN outcome TYPE varchar(16)")
                admin.dispose()

            opened_then_synchronized(engine, between=migrate_outcome_column)
            assert_synchronized_once(engine)
    finally:
        drop_database(url)


def test_statement_constants_are_written_into_the_sql_not_sent_per_delivery():
    # The status names, `version + 1` and the failing conclusions are part of the
    # prepared text; only the delivery's own values travel with each EXECUTE.
    pipeline = form(derived.pipeline_upsert, (), prepared=True)
    assert pipeline.prepare is not None
    assert b"THEN 'failed'" in pipeline.prepare and b"ARRAY['failure', 'timed_out'" in pipeline.prepare
    assert set(pipeline.names) == {
        "id",
        "repo_github_id",
        "pr_number",
        "commit_sha",
        "author",
        "avatar_url",
        "title",
        "status_pr",
        "status_merge",
        "pr_updated_at",
        "digest",
    }


_BODIES = st.one_of(
    st.binary(max_size=64),
    st.text(st.characters(blacklist_categories=("Cs",))).map(str.encode),
)


@given(data=_BODIES)
def test_a_journal_body_reads_back_as_the_very_same_bytes(engine, data):
    """The journal body travels as text where it can (psycopg2 quotes it), else as bytea: exact either way."""
    dbapi = engine.raw_connection()
    try:
        cursor = dbapi.dbapi_connection.cursor()
        cursor.execute("SELECT %s", (Bytea(data),))
        assert bytes(cursor.fetchone()[0]) == data
        dbapi.dbapi_connection.rollback()
    finally:
        dbapi.close()


def test_a_text_body_travels_as_text_not_hex(engine):
    dbapi = engine.raw_connection()
    try:
        sent = dbapi.dbapi_connection.cursor().mogrify("%s", (Bytea(b'{"title": "it\'s"}'),))
    finally:
        dbapi.close()
    assert sent == b"""convert_to('{"title": "it''s"}', 'UTF8')"""


def _every_statement_sent() -> list[tuple[Callable[..., sa.Executable], tuple[Any, ...]]]:
    kinds = [(kind.upsert, variant) for kind in statements.KINDS.values() for variant in ((), (True,), (False,))]
    return [
        *((builder, args) for builder, args in kinds if _takes(builder, len(args))),
        *((statements.repository_upsert, (deleted,)) for deleted in (True, False)),
        *((journal.journal, (stale, replay)) for stale in _STALE_TESTS for replay in (True, False)),
        (derived.pipeline_if_missing, ()),
        (derived.refresh_by_head, ()),
        (derived.refresh_by_number, ()),
        (hooks.hook_seen, ()),
        *((builder, ()) for builder in (jobs.write_list, jobs.write_unchanged, jobs.write_status, jobs.settle_job)),
        (journal_admin._index_order_only, ()),
        *((journal_admin._prune_batch, (include_failed,)) for include_failed in (True, False)),
    ]


_STALE_TESTS = (None, *(kind.stale for kind in statements.KINDS.values() if kind.stale is not None))


def _takes(builder: Callable[..., Any], count: int) -> bool:
    return len(inspect.signature(builder).parameters) == count


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "plain"])
def test_every_statement_the_service_sends_compiles_with_its_constants_inline(prepared):
    # A constant SQLAlchemy cannot write as a faithful literal fails here, not on a delivery.
    for builder, args in _every_statement_sent():
        sent = form(builder, args, prepared)
        if prepared:
            assert sent.prepare is not None
            numbers = {int(n) for n in re.findall(rb"\$(\d+)", sent.prepare)}
            assert numbers == set(range(1, len(sent.names) + 1)), builder.__name__
        else:
            assert sent.text.replace("%%", "").count("%s") == len(sent.names), builder.__name__
