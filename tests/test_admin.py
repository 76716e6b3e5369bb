"""Operator actions at scale: a pruned journal of 200,000 rows, paged replays, bucketed listings."""

from __future__ import annotations

import contextlib
from datetime import timedelta

import sqlalchemy as sa

from flowlens_ingest import admin
from flowlens_ingest.config import Settings, normalize_database_url
from flowlens_ingest.database import Database
from flowlens_ingest.journal import JOURNAL_BUCKETS
from flowlens_ingest.schema import pipeline_runs, webhook_deliveries

from .helpers import database_of, rows


def fill_journal(db: sa.Engine, count: int, *, age: str, outcome: str = "ignored", prefix: str = "old") -> None:
    """`count` journal entries received `age` ago, spread over the buckets, in one statement."""
    with db.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO webhook_deliveries"
                " (delivery_id, hook_id, event, received_at, bucket, payload_sha256, outcome, body, content_type)"
                " SELECT :prefix || '-' || n, 1, 'ping', now() - CAST(:age AS interval) + n * interval '1 ms',"
                " n % :buckets, 'x', :outcome, '\\x7b7d'::bytea, 'application/json'"
                " FROM generate_series(1, :count) AS n"
            ),
            {"prefix": prefix, "age": age, "count": count, "outcome": outcome, "buckets": JOURNAL_BUCKETS},
        )


def test_prune_of_200000_entries_fits_a_500_ms_statement_timeout(db, database_url):
    fill_journal(db, 200_000, age="40 days")
    fill_journal(db, 50, age="40 days", outcome="failed", prefix="failed")
    fill_journal(db, 100, age="1 day", prefix="recent")
    # The service's Database with a statement timeout far below one unbatched DELETE.
    settings = Settings(database_url=normalize_database_url(database_url), statement_timeout_ms=500)
    database = Database(settings, application_name="flowlens-tests-prune")
    seen: list[int] = []
    try:
        removed = admin.prune(database, timedelta(days=30), progress=seen.append)
    finally:
        database.dispose()
    assert removed == 200_000
    assert seen == sorted(seen) and seen[-1] == 200_000 and len(seen) >= 200_000 // admin.PRUNE_BATCH
    left = {r["delivery_id"].split("-")[0] for r in rows(db, webhook_deliveries, "delivery_id")}
    assert left == {"failed", "recent"}


def test_prune_picks_up_where_an_interrupted_one_stopped(db):
    fill_journal(db, 3_000, age="40 days")
    database = database_of(db)
    first: list[int] = []

    def stop_after_first_batch(total: int) -> None:
        first.append(total)
        raise KeyboardInterrupt

    with contextlib.suppress(KeyboardInterrupt):
        admin.prune(database, timedelta(days=30), batch=100, progress=stop_after_first_batch)
    # Each batch is committed on its own: the first one is gone, the rest waits.
    assert first == [100]
    assert len(rows(db, webhook_deliveries, "delivery_id")) == 2_900
    assert admin.prune(database, timedelta(days=30), batch=100) == 2_900
    assert rows(db, webhook_deliveries, "delivery_id") == []


def test_deliveries_lists_the_newest_across_every_bucket(db):
    fill_journal(db, 1_000, age="1 hour")
    listed = admin.list_deliveries(database_of(db), limit=30)
    newest = sorted(rows(db, webhook_deliveries, "received_at", "delivery_id"), key=lambda r: r["received_at"])[-30:]
    assert [r.delivery_id for r in listed] == [r["delivery_id"] for r in reversed(newest)]
    assert len({r.delivery_id for r in listed}) == 30


def test_replay_pages_through_the_journal_in_arrival_order(db, monkeypatch):
    fill_journal(db, 1_234, age="1 hour")
    monkeypatch.setattr(admin, "REPLAY_PAGE", 100)
    keys = list(admin._keys(database_of(db), failed_only=False, since=None))
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
