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
from collections.abc import Sequence
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowlens_ingest.schema import pipeline_runs, pull_requests

from .helpers import examples
from .stories import RecordingPicker, apply, as_dicts, build_story, business_rows

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

    # The in-order run itself follows DESIGN.md's status rules.
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
