"""Concurrency independence against a real gunicorn with several workers.

Each story's deliveries are posted all at once (one thread each, released by a
barrier), story after story, to `flowlens-ingest serve --workers 4`. The final
rows must equal those of the same stories applied one by one, in GitHub's order,
to another repository; every answer must be 2xx and no row may be duplicated.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import sqlalchemy as sa

from flowlens_ingest.events.mappers import map_delivery
from flowlens_ingest.store.plan import Plan
from flowlens_ingest.store.schema import (
    ci_checks,
    pipeline_runs,
    pr_reviews,
    pull_requests,
    repositories,
    webhook_deliveries,
)
from flowlens_ingest.store.wire import plain_sql

from .helpers import rows, wait_for
from .serving import Service, metric
from .stories import (
    START,
    RandomPicker,
    apply,
    build_story,
    business_rows,
    check_run,
    pull_request,
    repository,
    sha_for,
)

STORIES = 24
SERIAL_REPO = 8_100_001
CONCURRENT_REPO = 8_100_002


def _post_all_at_once(service: Service, events: list[tuple[str, dict]]) -> list[tuple[int, str]]:
    barrier = threading.Barrier(len(events), timeout=30)

    def post(event_payload: tuple[str, dict]) -> tuple[int, str]:
        event, payload = event_payload
        barrier.wait()
        response = service.post(payload, event)
        outcome = response.json().get("outcome", "") if response.status_code < 500 else ""
        return response.status_code, outcome

    with ThreadPoolExecutor(max_workers=len(events)) as pool:
        return list(pool.map(post, events))


@pytest.mark.slow
def test_simultaneous_deliveries_equal_the_serial_result(db, database_url, tmp_path):
    seeds = range(STORIES)
    # Every story is about its own PR (number seed + 1) of one repository.
    for seed in seeds:
        story = build_story(RandomPicker(seed), SERIAL_REPO, seed + 1)
        for event, payload in story.events:
            assert apply(db, event, payload) in ("applied", "stale")
    expected = business_rows(db, SERIAL_REPO)
    assert len(expected["pipeline_runs"]) == STORIES

    service = Service(database_url, tmp_path, workers=4)
    try:
        service.wait_ready()
        answers = []
        for seed in seeds:
            story = build_story(RandomPicker(seed), CONCURRENT_REPO, seed + 1)
            answers += _post_all_at_once(service, story.events)
    finally:
        service.stop()

    assert [a for a in answers if not 200 <= a[0] < 300] == []
    # Applied or stale: never spooled, failed or a retry exhausted.
    assert {outcome for _, outcome in answers} <= {"applied", "stale"}
    assert business_rows(db, CONCURRENT_REPO) == expected

    with db.connect() as conn:
        assert (
            conn.execute(
                sa.select(sa.func.count()).select_from(repositories).where(repositories.c.github_id == CONCURRENT_REPO)
            ).scalar_one()
            == 1
        )
        for table, key in (
            (pull_requests, ("repo_id", "pr_number")),
            (pipeline_runs, ("repo_id", "pr_number")),
            (ci_checks, ("repo_id", "head_sha", "source", "name")),
            (pr_reviews, ("repo_id", "pr_number", "reviewer")),
        ):
            cols = [table.c[k] for k in key]
            duplicates = conn.execute(sa.select(*cols).group_by(*cols).having(sa.func.count() > 1)).all()
            assert duplicates == [], table.name


# --- two deliveries of one PR interleaved on purpose ---------------------------------------------

PAIR_REPO = repository(8_200_001)
SHA_A, SHA_B = sha_for("pair", "a"), sha_for("pair", "b")


def _check(sha: str, name: str, conclusion: str, check_id: int) -> dict:
    return check_run(
        PAIR_REPO,
        sha,
        name,
        check_id,
        "completed",
        START + timedelta(seconds=20),
        conclusion=conclusion,
        completed_at=START + timedelta(seconds=30 + check_id),
    )


def _interleave(db, first: tuple[str, dict], second: tuple[str, dict]) -> None:
    """Run `first`'s statements in an open transaction, start `second`, then commit `first`.

    Whatever the mechanism, `second` must end up seeing `first` (it waits on the
    repository row lock, or retries): neither effect may be lost.
    """
    statements = Plan(map_delivery(*first)).statements
    with db.connect() as conn:
        tx = conn.begin()
        for statement in statements:
            conn.exec_driver_sql(*plain_sql(statement))
        (pid,) = conn.exec_driver_sql("SELECT pg_backend_pid()").one()
        outcome: list[str] = []
        worker = threading.Thread(target=lambda: outcome.append(apply(db, *second)))
        worker.start()
        # Give `second` every chance to run into `first` before it commits: wait
        # (bounded) until it either blocks on a lock held by us or is done.
        deadline = time.monotonic() + 10
        # Autocommit: inside one transaction pg_stat_activity is read once and then
        # cached, so a watcher polling in a transaction would never see `second` block.
        with db.connect().execution_options(isolation_level="AUTOCOMMIT") as watcher:
            while worker.is_alive() and time.monotonic() < deadline:
                blocked = watcher.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE %(pid)s = ANY(pg_blocking_pids(pid))", {"pid": pid}
                ).scalar_one()
                if blocked:
                    break
                time.sleep(0.01)
        tx.commit()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert outcome == ["applied"]


def test_two_checks_of_one_sha_committing_together_are_both_counted(db):
    apply(db, "pull_request", pull_request("opened", PAIR_REPO, 1, SHA_A, START + timedelta(seconds=10)))
    _interleave(
        db, ("check_run", _check(SHA_A, "lint", "success", 1)), ("check_run", _check(SHA_A, "unit", "failure", 2))
    )
    _interleave(
        db, ("check_run", _check(SHA_A, "docs", "failure", 3)), ("check_run", _check(SHA_A, "unit", "success", 4))
    )
    with db.connect() as conn:
        status = conn.execute(sa.select(pipeline_runs.c.status_build)).scalar_one()
    # lint success, unit success (re-run), docs failure.
    assert status == "failed"


def test_synchronize_and_a_check_of_the_new_head_committing_together(db):
    apply(db, "pull_request", pull_request("opened", PAIR_REPO, 1, SHA_A, START + timedelta(seconds=10)))
    synchronize = pull_request("synchronize", PAIR_REPO, 1, SHA_B, START + timedelta(seconds=40))
    _interleave(db, ("pull_request", synchronize), ("check_run", _check(SHA_B, "lint", "failure", 1)))
    with db.connect() as conn:
        row = conn.execute(sa.select(pipeline_runs.c.commit_sha, pipeline_runs.c.status_build)).one()
    assert tuple(row) == (SHA_B, "failed")


def test_a_check_of_the_new_head_and_the_synchronize_committing_together(db):
    apply(db, "pull_request", pull_request("opened", PAIR_REPO, 1, SHA_A, START + timedelta(seconds=10)))
    synchronize = pull_request("synchronize", PAIR_REPO, 1, SHA_B, START + timedelta(seconds=40))
    _interleave(db, ("check_run", _check(SHA_B, "lint", "failure", 1)), ("pull_request", synchronize))
    with db.connect() as conn:
        row = conn.execute(sa.select(pipeline_runs.c.commit_sha, pipeline_runs.c.status_build)).one()
    assert tuple(row) == (SHA_B, "failed")


# --- a hot repository under snapshot isolation ---------------------------------------------------

HOT_REPO = repository(8_300_001)
HOT_SHA = sha_for("hot", "head")
BURST = 500


@pytest.mark.slow
def test_a_burst_of_500_checks_for_one_repository_under_snapshot_isolation_applies_each_once(
    db, database_url, tmp_path
):
    """YugabyteDB without read committed runs snapshot isolation: every delivery of one
    repository conflicts on its repository row (40001) and is retried. REPEATABLE READ
    reproduces that on PostgreSQL."""
    env = {"FLOWLENS_ISOLATION_LEVEL": "REPEATABLE READ", "FLOWLENS_THREADS": "8"}
    service = Service(database_url, tmp_path, workers=2, env=env)
    answers: list[tuple[int, str, float]] = []
    try:
        service.wait_ready()
        opened = pull_request("opened", HOT_REPO, 1, HOT_SHA, START)
        assert service.post(opened, "pull_request").json()["outcome"] == "applied"

        def send(n: int) -> tuple[int, str, float]:
            payload = check_run(HOT_REPO, HOT_SHA, f"job-{n}", 10_000 + n, "completed", START, conclusion="success")
            started = time.perf_counter()
            answer = service.post(payload, "check_run", delivery=f"hot-{n}")
            return answer.status_code, answer.json()["outcome"], time.perf_counter() - started

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send, range(BURST)))
        # Spooled ones (if any) are applied by the drainers within seconds.
        wait_for(lambda: len(rows(db, webhook_deliveries, "delivery_id")) == BURST + 1, what="every delivery journaled")
        retries = sum(metric(service, "flowlens_db_retries_total", reason=code) or 0 for code in ("40001", "40P01"))
    finally:
        service.stop()
    assert {status for status, _, _ in answers} <= {200, 202}
    journal = rows(db, webhook_deliveries, "delivery_id", "outcome", "attempts")
    assert {(e["outcome"], e["attempts"]) for e in journal} == {("applied", 1)}
    assert len(rows(db, ci_checks, "name")) == BURST
    (pipeline,) = rows(db, pipeline_runs, "status_build")
    assert pipeline["status_build"] == "passed"
    latencies = sorted(seconds for _, _, seconds in answers)
    spooled = sum(outcome == "spooled" for _, outcome, _ in answers)
    print(
        f"\nhot repository: {BURST} check deliveries from 16 senders under REPEATABLE READ:"
        f" {retries:.0f} retries (40001), {spooled} spooled,"
        f" p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p99 {latencies[int(len(latencies) * 0.99)] * 1000:.0f} ms"
    )
