"""Operator commands on the journal: list, replay (idempotent), prune, through admin and the CLI."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from flowlens_ingest import replay
from flowlens_ingest.store import journal_admin
from flowlens_ingest.store.schema import metadata, pipeline_runs, pull_requests, webhook_deliveries, webhook_hooks

from .helpers import PAYLOADS, SECRET, database_of, load_payload, rows, run_cli

OPENED = load_payload("pull_request/opened.payload.json")


def data(engine: sa.Engine) -> dict[str, list[dict]]:
    """Every row but the journal's (attempts count replays)."""
    return {t.name: rows(engine, t) for t in metadata.sorted_tables if t is not webhook_deliveries}


def outcomes(engine: sa.Engine) -> dict[str, str]:
    return {e["delivery_id"]: e["outcome"] for e in rows(engine, webhook_deliveries, "delivery_id", "outcome")}


TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def as_history(payload: Any, at: datetime) -> Any:
    """The payload with every GitHub timestamp set to `at`.

    The samples are snapshots of a few objects taken at arbitrary times, several
    with equal timestamps and different contents; nobody can order those (see
    docs/reliability.md). Giving each delivery its own later time makes them a
    history GitHub could have sent.
    """
    if isinstance(payload, dict):
        return {k: as_history(v, at) for k, v in payload.items()}
    if isinstance(payload, list):
        return [as_history(v, at) for v in payload]
    if isinstance(payload, str) and TIMESTAMP.match(payload):
        return at.strftime("%Y-%m-%dT%H:%M:%SZ")
    return payload


def deliver_every_sample(deliver, *, history: bool = False) -> int:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    count = 0
    for path in sorted(PAYLOADS.glob("*/*.json")):
        body = path.read_bytes()
        if history:
            body = json.dumps(as_history(json.loads(body), start + timedelta(seconds=count))).encode()
        response = deliver(body, path.parent.name, delivery=f"{path.parent.name}/{path.name}")
        assert response.status_code == 200
        count += 1
    return count


def test_replay_of_a_failed_delivery_applies_it_after_the_fix(deliver, db, refuse_title):
    payload = copy.deepcopy(OPENED)
    payload["pull_request"]["title"] = "refused"
    assert deliver(payload, "pull_request", delivery="x").status_code == 202
    assert deliver(OPENED, "ping", delivery="p").status_code == 200
    report = replay.replay(database_of(db), failed_only=True)
    assert (report.replayed, report.failed) == (0, 1)
    assert outcomes(db) == {"x": "failed", "p": "ignored"}
    refuse_title()
    report = replay.replay(database_of(db), failed_only=True)
    assert (report.replayed, report.failed, report.skipped_no_payload) == (1, 0, 0)
    assert outcomes(db) == {"x": "applied", "p": "ignored"}
    (entry,) = rows(db, webhook_deliveries, "error", "attempts", "applied_at", "delivery_id")[1:]
    assert entry["error"] is None and entry["attempts"] == 3 and entry["applied_at"] is not None
    assert rows(db, pull_requests, "title", "version") == [{"title": "refused", "version": 1}]
    # Nothing failed is left to replay.
    assert replay.replay(database_of(db), failed_only=True).replayed == 0


def test_replay_of_everything_twice_changes_nothing(deliver, db):
    count = deliver_every_sample(deliver, history=True)
    with db.begin() as conn:
        conn.execute(sa.update(pull_requests).values(processed=True))
        conn.execute(sa.update(pipeline_runs).values(processed=True))
    before, before_outcomes = data(db), outcomes(db)
    for _ in range(2):
        report = replay.replay(database_of(db))
        assert (report.replayed, report.failed, report.skipped_no_payload) == (count, 0, 0)
        assert data(db) == before
    # Replayed in arrival order, every delivery still carries the outcome it had.
    assert outcomes(db) == before_outcomes
    assert {e["attempts"] for e in rows(db, webhook_deliveries, "attempts")} == {3}


def test_replay_rebuilds_the_rows_from_the_journal_alone(deliver, db):
    deliver_every_sample(deliver)
    expected = rebuildable(db)
    with db.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            if table is not webhook_deliveries:
                conn.execute(sa.delete(table))
    report = replay.replay(database_of(db))
    assert report.failed == 0
    assert rebuildable(db) == expected


def rebuildable(engine: sa.Engine) -> dict[str, list[str]]:
    """Every row but what a rebuild legitimately renews (ids, the rows' own times), sorted."""
    renewed = ("id", "repo_id", "created_at", "updated_at", "deleted_at", "run_after")
    return {
        name: sorted(repr(sorted((k, v) for k, v in row.items() if k not in renewed)) for row in table)
        for name, table in data(engine).items()
    }


def two_deliveries_one_received(db, deliver, moved: str, kept: str, by: timedelta) -> None:
    """Deliver `moved` and `kept`, then move `moved`'s arrival `by` from the database's now."""
    deliver(OPENED, "pull_request", delivery=moved)
    deliver(OPENED, "pull_request", delivery=kept)
    with db.begin() as conn:
        conn.execute(
            sa.update(webhook_deliveries)
            .where(webhook_deliveries.c.delivery_id == moved)
            .values(received_at=sa.func.now() + by)
        )


def attempts_by_delivery(db) -> dict[str, int]:
    return {e["delivery_id"]: e["attempts"] for e in rows(db, webhook_deliveries, "delivery_id", "attempts")}


def test_replay_since_takes_only_later_deliveries(deliver, db):
    two_deliveries_one_received(db, deliver, "old", "new", by=-timedelta(days=2))
    report = replay.replay(database_of(db), since=datetime.now(UTC) - timedelta(days=1))
    assert report.replayed == 1
    assert attempts_by_delivery(db) == {"old": 1, "new": 2}


def test_replay_takes_what_had_arrived_when_it_began(deliver, db):
    # As a delivery arriving while a long replay walks the journal would stand.
    two_deliveries_one_received(db, deliver, "during", "before", by=timedelta(hours=1))
    report = replay.replay(database_of(db))
    assert report.replayed == 1
    assert attempts_by_delivery(db) == {"before": 2, "during": 1}


def test_replay_reads_each_delivery_whole_whether_or_not_its_hook_is_recorded(deliver, db):
    # One from a repository hook (recorded, with its target), one sent without GitHub's hook headers.
    # A hook id of this test only: a process records a hook once (ingest.HOOKS), tests empty the tables.
    hooked = deliver(OPENED, "pull_request", delivery="hooked", hook_id="62001", target=("repository", "1296269"))
    assert hooked.status_code == 200
    assert deliver(OPENED, "pull_request", delivery="bare", hook_id=None).status_code == 200
    with db.begin() as conn:
        conn.execute(sa.update(webhook_hooks).values(checked_through=datetime(2026, 12, 1, tzinfo=UTC)))
    kept = ("delivery_id", "hook_id", "received_at", "payload_sha256", "content_type", "body_from_api", "outcome")
    journaled, hooks = rows(db, webhook_deliveries, *kept), rows(db, webhook_hooks)
    report = replay.replay(database_of(db))
    assert (report.replayed, report.failed, report.skipped_no_payload) == (2, 0, 0)
    assert rows(db, webhook_deliveries, *kept) == journaled
    # The recorded hook is neither duplicated nor reset (recovery's place in its log stays).
    assert rows(db, webhook_hooks) == hooks and len(hooks) == 1


def test_replay_skips_entries_journaled_without_payload(deliver, db):
    deliver(OPENED, "pull_request", delivery="kept")
    with db.begin() as conn:
        conn.execute(sa.update(webhook_deliveries).values(body=None))
    report = replay.replay(database_of(db))
    assert (report.replayed, report.skipped_no_payload) == (0, 1)


def test_a_stored_body_that_does_not_read_back_is_named_and_the_replay_goes_on(deliver, db):
    for name in ("cut-gzip", "not-json", "fine"):
        payload = copy.deepcopy(OPENED)
        payload["number"] = payload["pull_request"]["number"] = len(name)
        deliver(payload, "pull_request", delivery=name)
    with db.begin() as conn:
        wd = webhook_deliveries
        conn.execute(
            sa.update(wd).where(wd.c.delivery_id == "cut-gzip").values(body=b"\x1f\x8b\x08", body_encoding="gzip")
        )
        conn.execute(sa.update(wd).where(wd.c.delivery_id == "not-json").values(body=b'{"cut short'))
    report = replay.replay(database_of(db))
    assert (report.replayed, report.failed, report.stopped) == (1, 2, None)
    assert sorted(error.split(":")[0] for error in report.errors) == ["cut-gzip", "not-json"]
    assert all("cannot be read back" in error for error in report.errors)


def test_prune_removes_old_entries_but_keeps_failed_ones(deliver, db):
    deliver(OPENED, "pull_request", delivery="old-applied")
    deliver(dict(OPENED, pull_request=[]), "pull_request", delivery="old-failed")
    deliver(OPENED, "pull_request", delivery="recent")
    with db.begin() as conn:
        conn.execute(
            sa.update(webhook_deliveries)
            .where(webhook_deliveries.c.delivery_id.like("old-%"))
            .values(received_at=sa.func.now() - timedelta(days=31))
        )
    assert journal_admin.prune(database_of(db), timedelta(days=30)) == 1
    assert sorted(outcomes(db)) == ["old-failed", "recent"]
    assert journal_admin.prune(database_of(db), timedelta(days=30), include_failed=True) == 1
    assert sorted(outcomes(db)) == ["recent"]


# --- the command line, as an operator runs it --------------------------------------------


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, DATABASE_URL=database_url, GITHUB_WEBHOOK_SECRET=SECRET)


@pytest.mark.slow
def test_operator_commands(deliver, db, database_url, refuse_title):
    refused = copy.deepcopy(OPENED)
    refused["pull_request"]["title"] = "refused"
    deliver(refused, "pull_request", delivery="broken-one")
    deliver(OPENED, "ping", delivery="ping-one")

    listed = cli(database_url, "deliveries")
    assert listed.returncode == 0, listed.stderr
    assert "broken-one pull_request/opened failed attempts=1" in listed.stdout
    assert "ping-one ping/opened ignored" in listed.stdout
    failed = cli(database_url, "deliveries", "--failed")
    assert "broken-one" in failed.stdout and "ping-one" not in failed.stdout
    assert "test_refuse" in failed.stdout

    as_json = cli(database_url, "deliveries", "--json")
    assert as_json.returncode == 0, as_json.stderr
    listed_json = {e["delivery_id"]: e for e in json.loads(as_json.stdout)}
    assert set(listed_json) == {"broken-one", "ping-one"}
    assert listed_json["broken-one"]["outcome"] == "failed" and "test_refuse" in listed_json["broken-one"]["error"]
    assert TIMESTAMP.match(listed_json["ping-one"]["received_at"]) and listed_json["ping-one"]["event"] == "ping"

    # Text like the other commands, JSON for scripts; the same exit codes either way.
    still = cli(database_url, "replay", "--failed")
    assert still.returncode == 1
    summary, error = still.stdout.splitlines()
    assert summary == "flowlens-ingest: replayed 0 deliveries, 1 failed"
    assert error.startswith("  failed broken-one: IntegrityError 23514") and "test_refuse" in error
    still_json = cli(database_url, "replay", "--failed", "--json")
    assert still_json.returncode == 1 and json.loads(still_json.stdout)["failed"] == 1
    refuse_title()
    fixed = cli(database_url, "replay", "--failed", "--json")
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout) == {"replayed": 1, "failed": 0, "skipped_no_payload": 0, "errors": []}
    since = cli(database_url, "replay", "--since", "2000-01-01T00:00:00Z")
    assert since.returncode == 0, since.stderr
    assert since.stdout.strip() == "flowlens-ingest: replayed 2 deliveries, 0 failed"
    assert outcomes(db) == {"broken-one": "applied", "ping-one": "ignored"}
    with db.begin() as conn:
        conn.execute(
            sa.update(webhook_deliveries).where(webhook_deliveries.c.delivery_id == "ping-one").values(body=None)
        )
    one = cli(database_url, "replay", "--since", "2000-01-01T00:00:00Z")
    assert (
        one.stdout.strip() == "flowlens-ingest: replayed 1 delivery, 0 failed, 1 skipped (journaled without a payload)"
    )

    assert cli(database_url, "replay", "--since", "yesterday").returncode == 2
    assert cli(database_url, "prune", "--older-than", "thirty").returncode == 2
    pruned = cli(database_url, "prune", "--older-than", "30d")
    assert pruned.returncode == 0 and "pruned 0 journal entries" in pruned.stdout
    with db.begin() as conn:
        conn.execute(sa.update(webhook_deliveries).values(received_at=sa.func.now() - timedelta(days=40)))
    pruned = cli(database_url, "prune", "--older-than", "30d")
    assert "pruned 2 journal entries" in pruned.stdout
    assert rows(db, webhook_deliveries) == []


@pytest.mark.slow
def test_replay_names_the_first_failures_and_counts_the_rest(deliver, db, database_url, refuse_title):
    refused = copy.deepcopy(OPENED)
    refused["pull_request"]["title"] = "refused"
    count = replay.MAX_REPORTED_ERRORS + 1
    for number in range(count):
        assert deliver(refused, "pull_request", delivery=f"broken-{number:02}").status_code == 202
    replayed = cli(database_url, "replay", "--failed")
    assert replayed.returncode == 1
    summary, *named, rest = replayed.stdout.splitlines()
    assert summary == f"flowlens-ingest: replayed 0 deliveries, {count} failed"
    assert [line.split(":")[0] for line in named] == [f"  failed broken-{n:02}" for n in range(count - 1)]
    assert rest == "  and 1 more: `flowlens-ingest deliveries --failed` lists them"
