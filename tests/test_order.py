"""Order independence: any permutation of a PR story's deliveries gives the in-order rows.

Each hypothesis example draws a story (tests/stories.py) and a permutation of its
deliveries. The story is applied in GitHub's order to one repository and, built
again from the same choices, in the drawn order to a fresh repository; the
business columns of pull_requests, pipeline_runs, ci_checks and pr_reviews must
be equal. A fresh repository per run is how each example starts from empty
tables without a TRUNCATE per example (the `db` fixture empties them once).

Stories give every snapshot its own GitHub timestamp: two snapshots of one
object sharing both timestamp and rank cannot be ordered (see stories.py).
"""

import itertools
import json
import random
from collections.abc import Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from flowlens_ingest import replay
from flowlens_ingest.ingest import ingest
from flowlens_ingest.store.schema import (
    ci_checks,
    files_jobs,
    metadata,
    pipeline_runs,
    pr_reviews,
    pull_requests,
    repositories,
)

from .helpers import PAYLOADS, database_of, examples, rows
from .stories import RecordingPicker, apply, as_dicts, build_story, business_rows, delivery

T = TypeVar("T")
NUMBER = 42
_repo_ids = itertools.count(7_000_000)


class DrawPicker:
    """Story choices drawn by hypothesis (so they shrink)."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def choice(self, options: Sequence[T]) -> T:
        """One of `options`."""
        return self.data.draw(st.sampled_from(list(options)))

    def integer(self, low: int, high: int) -> int:
        """An integer in [low, high]."""
        return self.data.draw(st.integers(low, high))


def _in_order_rows(engine: Any, picker: RecordingPicker) -> tuple[Any, dict[str, list[tuple[Any, ...]]]]:
    story = build_story(picker, next(_repo_ids), NUMBER)
    for event, payload in story.events:
        assert apply(engine, event, payload) in ("applied", "stale")
    return story, business_rows(engine, story.repo_id)


# The `db` fixture only empties the tables once, before the first example; each
# example then works in repositories of its own, so sharing it is safe.
@settings(
    max_examples=examples(200),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_permutation_gives_the_in_order_rows(db, data):
    recorder = RecordingPicker(DrawPicker(data))
    story, expected = _in_order_rows(db, recorder)

    # The in-order run itself follows the status rules of docs/design.md.
    [pipeline] = as_dicts(pipeline_runs, expected["pipeline_runs"])
    assert pipeline["commit_sha"] == story.head_sha
    assert pipeline["status_build"] == story.expected_build()
    assert pipeline["status_approval"] == story.expected_approval()
    assert (pipeline["status_pr"], pipeline["status_merge"]) == (story.status_pr, story.status_merge)
    [pr] = as_dicts(pull_requests, expected["pull_requests"])
    assert (pipeline["processed"], pr["processed"]) == (False, False)

    again = build_story(recorder.replay(), next(_repo_ids), NUMBER)
    assert [e for e, _ in again.events] == [e for e, _ in story.events]
    order = data.draw(st.permutations(range(len(again.events))), label="order")
    for index in order:
        event, payload = again.events[index]
        assert apply(db, event, payload) in ("applied", "stale")
    assert business_rows(db, again.repo_id) == expected


# --- the whole corpus of real payloads: forward, reversed, shuffled ------------------------------

CORPUS = [(p.parent.name, json.loads(p.read_text())) for p in sorted(PAYLOADS.glob("*/*.json"))]
# The rows' own bookkeeping (ids, times, counters of how often they changed) legitimately
# differs between orders; everything else must not.
RENEWED = {"id", "repo_id", "created_at", "updated_at", "deleted_at", "version", "processed", "run_after"}
TABLES = (repositories, pull_requests, pipeline_runs, ci_checks, pr_reviews, files_jobs)


def state(engine: Engine) -> dict[str, list[str]]:
    """Every business row of every table (repository ids as GitHub's), sorted."""
    found: dict[str, list[str]] = {}
    with engine.connect() as conn:
        for table in TABLES:
            columns = [c for c in table.c if c.name not in RENEWED]
            query = sa.select(*columns)
            if "repo_id" in table.c:
                query = query.add_columns(repositories.c.github_id.label("repository")).join(
                    repositories, repositories.c.id == table.c.repo_id
                )
            found[table.name] = sorted(repr(sorted(dict(r._mapping).items())) for r in conn.execute(query))
    return found


def apply_all(engine: Engine, deliveries: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, list[str]]:
    empty(engine)
    for event, payload in deliveries:
        apply(engine, event, payload)
    return state(engine)


def empty(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(t.name for t in metadata.sorted_tables)} CASCADE"))


def test_the_corpus_in_any_order_gives_the_same_rows(db):
    forward = apply_all(db, CORPUS)
    assert sum(map(len, forward.values())) > 20
    assert apply_all(db, CORPUS[::-1]) == forward
    shuffled = list(CORPUS)
    random.Random(1729).shuffle(shuffled)
    assert apply_all(db, shuffled) == forward


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(range(len(CORPUS))))
def test_any_permutation_of_the_corpus_gives_the_same_rows(db, order):
    expected = apply_all(db, CORPUS)
    assert apply_all(db, [CORPUS[i] for i in order]) == expected


def test_replaying_everything_twice_changes_and_flags_nothing(db):
    database = database_of(db)
    for n, (event, payload) in enumerate(CORPUS):
        ingest(database, delivery(event, payload, delivery_id=f"corpus-{n}"))
    before = state(db)
    versions = {t.name: rows(db, t, "id", "version") for t in (pull_requests, pipeline_runs)}
    with db.begin() as conn:
        for table in (pull_requests, pipeline_runs):
            conn.execute(sa.update(table).values(processed=True))
    for _ in range(2):
        report = replay.replay(database)
        assert report.failed == 0 and report.replayed == len(CORPUS)
    assert state(db) == before
    assert {t.name: rows(db, t, "id", "version") for t in (pull_requests, pipeline_runs)} == versions
    assert {r["processed"] for t in (pull_requests, pipeline_runs) for r in rows(db, t, "processed")} == {True}
