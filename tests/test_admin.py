"""Operator actions at scale: a pruned journal of a million rows, paged replays, bucketed listings."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from flowlens_ingest.cli.main import main
from flowlens_ingest.config import Settings
from flowlens_ingest.database_urls import normalize_database_url
from flowlens_ingest.store import journal_admin
from flowlens_ingest.store.batch import Statement
from flowlens_ingest.store.database import Database
from flowlens_ingest.store.journal import JOURNAL_BUCKETS
from flowlens_ingest.store.schema import pipeline_runs, webhook_deliveries
from flowlens_ingest.store.wire import plain_sql

from .helpers import database_of, rows


def fill_journal(
    db: sa.Engine,
    count: int,
    *,
    age: str,
    outcome: str = "ignored",
    prefix: str = "old",
    bucket: int | None = None,
    step: str = "1 ms",
) -> None:
    """`count` journal entries received `age` ago, `step` apart, in `bucket` or spread over all, in one statement."""
    with db.begin() as conn:
        # A million rows take longer than the service's statement timeout on a busy machine.
        conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
        conn.execute(
            sa.text(
                "INSERT INTO webhook_deliveries"
                " (delivery_id, hook_id, event, received_at, bucket, payload_sha256, outcome, body, content_type)"
                " SELECT :prefix || '-' || n, 1, 'ping', now() - CAST(:age AS interval) + n * CAST(:step AS interval),"
                " coalesce(:bucket, n % :buckets), 'x', :outcome, '\\x7b7d'::bytea, 'application/json'"
                " FROM generate_series(1, :count) AS n"
            ),
            {
                "prefix": prefix,
                "age": age,
                "count": count,
                "outcome": outcome,
                "buckets": JOURNAL_BUCKETS,
                "bucket": bucket,
                "step": step,
            },
        )


def test_prune_of_a_million_unanalyzed_entries_in_one_bucket_fits_a_200_ms_statement_timeout(db, database_url):
    # What migration 0004 left: every old entry in bucket 0, loaded since the last ANALYZE.
    # Planned on such a table, "the oldest 2,000 of the bucket" sorted the whole bucket.
    fill_journal(db, 1_000_000, age="40 days", bucket=0)
    fill_journal(db, 50, age="40 days", outcome="failed", prefix="failed", bucket=0, step="10 s")
    fill_journal(db, 100, age="1 day", prefix="recent")
    settings = Settings(database_url=normalize_database_url(database_url), statement_timeout_ms=200)
    database = Database(settings, application_name="flowlens-tests-prune")
    seen: list[int] = []
    try:
        removed = journal_admin.prune(database, timedelta(days=30), progress=seen.append)
    finally:
        database.dispose()
    assert removed == 1_000_000
    assert seen == sorted(seen) and seen[-1] == 1_000_000 and len(seen) == 1_000_000 // journal_admin.PRUNE_BATCH
    left = {r["delivery_id"].split("-")[0] for r in rows(db, webhook_deliveries, "delivery_id")}
    assert left == {"failed", "recent"}


def test_a_prune_batch_reads_the_bucket_index_in_order_and_never_sorts(db):
    fill_journal(db, 50_000, age="40 days", bucket=0)
    values = {
        "bucket": 0,
        "after": journal_admin.BEGINNING,
        "cutoff": datetime.now(UTC) - timedelta(days=30),
        "batch": 2000,
    }
    sql, bound = plain_sql(Statement(journal_admin._prune_batch, values, (False,)))
    with db.connect() as conn:  # one transaction, as prune's batch; rolled back
        conn.exec_driver_sql(*plain_sql(Statement(journal_admin._index_order_only, {})))
        plan = "\n".join(conn.exec_driver_sql("EXPLAIN " + sql, bound).scalars())
    assert "Index Scan using ix_webhook_deliveries_bucket_received_at" in plan, plan
    assert "Sort" not in plan, plan


def test_prune_goes_past_entries_received_at_the_same_instant_and_failed_ones(db):
    fill_journal(db, 250, age="40 days", bucket=3, step="0 s")
    fill_journal(db, 120, age="40 days", outcome="failed", prefix="failed", bucket=3, step="0 s")
    assert journal_admin.prune(database_of(db), timedelta(days=30), batch=100) == 250
    assert {r["delivery_id"].split("-")[0] for r in rows(db, webhook_deliveries, "delivery_id")} == {"failed"}


def test_a_statement_timeout_is_reported_as_such_not_as_an_outage(db, database_url, monkeypatch, capsys):
    fill_journal(db, 10, age="40 days", bucket=0)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("FLOWLENS_STATEMENT_TIMEOUT_MS", "200")
    # Another session holds the old rows: the prune's first batch waits on them past its timeout.
    with db.connect() as holder:
        holder.execute(sa.select(webhook_deliveries.c.delivery_id).with_for_update())
        status = main(["prune", "--older-than", "30d"])
        holder.rollback()
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "flowlens-ingest: the database's statement timeout (200 ms) cut a prune batch;"
        " what is pruned so far stays pruned; retry, or raise FLOWLENS_STATEMENT_TIMEOUT_MS"
    )
    assert len(rows(db, webhook_deliveries, "delivery_id")) == 10


def test_prune_of_everything_asks_for_yes(db, database_url, monkeypatch, capsys):
    fill_journal(db, 10, age="1 hour")
    monkeypatch.setenv("DATABASE_URL", database_url)
    assert main(["prune", "--older-than", "0d"]) == 2
    assert "--older-than 0 deletes the whole journal; add --yes" in capsys.readouterr().err
    assert len(rows(db, webhook_deliveries, "delivery_id")) == 10
    assert main(["prune", "--older-than", "0d", "--yes"]) == 0
    assert rows(db, webhook_deliveries, "delivery_id") == []


def test_prune_of_the_last_day_asks_for_yes(db, database_url, monkeypatch, capsys):
    fill_journal(db, 10, age="1 hour")
    monkeypatch.setenv("DATABASE_URL", database_url)
    # 30m typed for 30d: refused, one line, nothing deleted.
    assert main(["prune", "--older-than", "30m"]) == 2
    assert capsys.readouterr().err.strip() == (
        "flowlens-ingest: --older-than 30m deletes entries of the last day too; add --yes to do that"
        " (see `flowlens-ingest prune --help`)"
    )
    assert len(rows(db, webhook_deliveries, "delivery_id")) == 10
    # A day or more needs no confirmation (and deletes nothing this recent).
    assert main(["prune", "--older-than", "1d"]) == 0
    assert len(rows(db, webhook_deliveries, "delivery_id")) == 10
    assert main(["prune", "--older-than", "30m", "--yes"]) == 0
    assert rows(db, webhook_deliveries, "delivery_id") == []


def test_prune_picks_up_where_an_interrupted_one_stopped(db):
    fill_journal(db, 3_000, age="40 days")
    database = database_of(db)
    first: list[int] = []

    def stop_after_first_batch(total: int) -> None:
        first.append(total)
        raise KeyboardInterrupt

    with contextlib.suppress(KeyboardInterrupt):
        journal_admin.prune(database, timedelta(days=30), batch=100, progress=stop_after_first_batch)
    # Each batch is committed on its own: the first one is gone, the rest waits.
    assert first == [100]
    assert len(rows(db, webhook_deliveries, "delivery_id")) == 2_900
    assert journal_admin.prune(database, timedelta(days=30), batch=100) == 2_900
    assert rows(db, webhook_deliveries, "delivery_id") == []


def test_deliveries_lists_the_newest_across_every_bucket(db):
    fill_journal(db, 1_000, age="1 hour")
    listed = journal_admin.list_deliveries(database_of(db), limit=30)
    newest = sorted(rows(db, webhook_deliveries, "received_at", "delivery_id"), key=lambda r: r["received_at"])[-30:]
    assert [r.delivery_id for r in listed] == [r["delivery_id"] for r in reversed(newest)]
    assert len({r.delivery_id for r in listed}) == 30


def test_replay_pages_through_the_journal_in_arrival_order(db, monkeypatch):
    fill_journal(db, 1_234, age="1 hour")
    monkeypatch.setattr(journal_admin, "REPLAY_PAGE", 100)
    keys = list(journal_admin.journal_keys(database_of(db), failed_only=False, since=None))
    expected = sorted(
        rows(db, webhook_deliveries, "received_at", "delivery_id", "hook_id"), key=lambda r: r["received_at"]
    )
    assert keys == [(r["delivery_id"], r["hook_id"]) for r in expected]


def test_the_pollers_query_reads_the_partial_index(db):
    with db.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO repositories (id, github_id, name, full_name)"
                " VALUES ('00000000-0000-0000-0000-000000000001', 1, 'r', 'o/r')"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO pipeline_runs (id, repo_id, pr_number, processed, updated_at)"
                " SELECT md5(n::text)::uuid, '00000000-0000-0000-0000-000000000001', n, n % 200 <> 0,"
                " now() - n * interval '1 s' FROM generate_series(1, 20000) AS n"
            )
        )
        conn.execute(sa.text("ANALYZE pipeline_runs"))
        plan = conn.execute(
            sa.text(
                "EXPLAIN (FORMAT JSON) SELECT id, version FROM pipeline_runs"
                " WHERE processed = FALSE ORDER BY updated_at LIMIT 100"
            )
        ).scalar()
    assert "ix_pipeline_runs_unprocessed" in str(plan)
    unprocessed = [r for r in rows(db, pipeline_runs, "processed") if not r["processed"]]
    assert len(unprocessed) == 100
