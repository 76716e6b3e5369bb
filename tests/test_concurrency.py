"""Concurrency independence against a real gunicorn with several workers.

Each story's deliveries are posted all at once (one thread each, released by a
barrier), story after story, to `flowlens-ingest serve --workers 4`. The final
rows must equal those of the same stories applied one by one, in GitHub's order,
to another repository; every answer must be 2xx and no row may be duplicated.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from flowlens_ingest.schema import ci_checks, pipeline_runs, pr_reviews, pull_requests, repositories

from .conftest import Service
from .stories import RandomPicker, apply, build_story, business_rows

pytestmark = pytest.mark.slow

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
        assert conn.execute(
            sa.select(sa.func.count()).select_from(repositories).where(repositories.c.github_id == CONCURRENT_REPO)
        ).scalar_one() == 1
        for table, key in (
            (pull_requests, ("repo_id", "pr_number")),
            (pipeline_runs, ("repo_id", "pr_number")),
            (ci_checks, ("repo_id", "head_sha", "source", "name")),
            (pr_reviews, ("repo_id", "pr_number", "reviewer")),
        ):
            cols = [table.c[k] for k in key]
            duplicates = conn.execute(sa.select(*cols).group_by(*cols).having(sa.func.count() > 1)).all()
            assert duplicates == [], table.name
