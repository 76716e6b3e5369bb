"""statements.py and plan.py on a real database: the processing contract, stale guards, derived statuses.

Deliveries go through the service's own path (`ingest`: map, store, journal in one
transaction), or over HTTP with the `deliver` fixture where the answer matters.
"""

from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from flowlens_ingest.store.schema import ci_checks, pipeline_runs, pr_reviews, pull_requests, repositories

from .helpers import load_payload, rows
from .stories import (
    START,
    apply,
    check_run,
    check_suite,
    pull_request,
    repository,
    review,
    sha_for,
    status,
    workflow_job,
    workflow_run,
)

REPO_ID = 5_000_001
REPO = repository(REPO_ID)
SHA_A, SHA_B = sha_for("store", "a"), sha_for("store", "b")
FILES = [
    {
        "filename": "README.md",
        "status": "modified",
        "additions": 1,
        "deletions": 1,
        "changes": 2,
        "patch": "@@ -1 +1 @@\n-Hello\n+Hello, World",
    }
]


def at(seconds: int):
    """A GitHub time, `seconds` after the stories' start."""
    return START + timedelta(seconds=seconds)


def one(db, table: sa.Table, number: int = 1, **where: Any) -> dict[str, Any]:
    """The single row of `table` for PR `number` (or matching `where`), with its xmin."""
    conditions = [table.c[k] == v for k, v in where.items()] or [table.c.pr_number == number]
    with db.connect() as conn:
        result = conn.execute(sa.select(table, sa.literal_column("xmin::text").label("xmin")).where(*conditions)).all()
    assert len(result) == 1, result
    return dict(result[0]._mapping)


def ack(db, table: sa.Table, row: dict[str, Any]) -> int:
    """The poller's acknowledgement: processed only if the version it read is still current."""
    with db.begin() as conn:
        result = conn.execute(
            sa.update(table).where(table.c.id == row["id"], table.c.version == row["version"]).values(processed=True)
        )
        return result.rowcount


def opened(number: int = 1, sha: str = SHA_A, seconds: int = 10, **kw: Any) -> dict[str, Any]:
    """A `pull_request` opened delivery of the test repository."""
    return pull_request("opened", REPO, number, sha, at(seconds), **kw)


def run(
    sha: str,
    name: str,
    status_: str,
    seconds: int,
    conclusion: str | None = None,
    *,
    prs: tuple[int, ...] = (),
    check_id: int = 1,
) -> dict[str, Any]:
    """A check_run of `name` on `sha`, queued/in_progress at `seconds` or completed at it."""
    if status_ == "completed":
        return check_run(
            REPO,
            sha,
            name,
            check_id,
            "completed",
            at(seconds - 1),
            conclusion=conclusion,
            completed_at=at(seconds),
            prs=prs,
        )
    return check_run(REPO, sha, name, check_id, status_, at(seconds), prs=prs)


def build(db, number: int = 1) -> str:
    """The PR's stored status_build."""
    return one(db, pipeline_runs, number)["status_build"]


def approval(db, number: int = 1) -> str:
    """The PR's stored status_approval."""
    return one(db, pipeline_runs, number)["status_approval"]


# --- the processing contract ------------------------------------------------------------------


def test_insert_is_unprocessed_at_version_one(db):
    assert apply(db, "pull_request", opened()) == "applied"
    for table in (pull_requests, pipeline_runs):
        row = one(db, table)
        assert (row["processed"], row["version"]) == (False, 1)
        assert row["updated_at"] is not None
    pipeline = one(db, pipeline_runs)
    assert (pipeline["status_pr"], pipeline["status_build"], pipeline["status_approval"], pipeline["status_merge"]) == (
        "opened",
        "pending",
        "pending",
        "pending",
    )


def test_a_real_change_flags_the_row_again(db):
    apply(db, "pull_request", opened())
    before = {t.name: one(db, t) for t in (pull_requests, pipeline_runs)}
    for table in (pull_requests, pipeline_runs):
        assert ack(db, table, before[table.name]) == 1
    assert apply(db, "pull_request", pull_request("edited", REPO, 1, SHA_A, at(20), title="New title")) == "applied"
    for table in (pull_requests, pipeline_runs):
        row = one(db, table)
        assert (row["processed"], row["version"]) == (False, 2)
        assert row["updated_at"] > before[table.name]["updated_at"]
    assert one(db, pull_requests)["title"] == one(db, pipeline_runs)["title"] == "New title"


def test_no_change_issues_no_update(db):
    apply(db, "pull_request", opened())
    apply(db, "check_run", run(SHA_A, "lint", "completed", 30, "success"))
    before = {t.name: one(db, t) for t in (pull_requests, pipeline_runs)}
    for table in (pull_requests, pipeline_runs):
        ack(db, table, before[table.name])
    before = {t.name: one(db, t) for t in (pull_requests, pipeline_runs)}
    # The same snapshots again (a redelivery under a new delivery id), and a check
    # that leaves status_build as it is: no row is written (xmin does not move).
    apply(db, "pull_request", opened())
    apply(db, "check_run", run(SHA_A, "lint", "completed", 30, "success"))
    apply(db, "check_run", run(SHA_A, "docs", "completed", 40, "skipped", check_id=2))
    for table in (pull_requests, pipeline_runs):
        after = one(db, table)
        assert (after["xmin"], after["version"], after["processed"]) == (
            before[table.name]["xmin"],
            before[table.name]["version"],
            True,
        )


def test_poller_ack_never_loses_a_change(db):
    apply(db, "pull_request", opened())
    seen = one(db, pull_requests)
    assert (seen["version"], seen["processed"]) == (1, False)
    # A change lands between the poller's read and its acknowledgement.
    apply(db, "pull_request", pull_request("labeled", REPO, 1, SHA_A, at(20), title="Changed"))
    assert ack(db, pull_requests, seen) == 0
    row = one(db, pull_requests)
    assert (row["processed"], row["version"]) == (False, 2)
    # Read again, acknowledge: done; a later change flags the row once more.
    assert ack(db, pull_requests, row) == 1
    assert one(db, pull_requests)["processed"] is True
    apply(db, "pull_request", pull_request("closed", REPO, 1, SHA_A, at(30), state="closed"))
    row = one(db, pull_requests)
    assert (row["processed"], row["version"], row["state"]) == (False, 3, "closed")
    assert ack(db, pull_requests, seen) == 0


def test_older_snapshot_never_overwrites(deliver, db):
    assert (
        deliver(pull_request("closed", REPO, 1, SHA_A, at(30), state="closed"), "pull_request").get_json()["outcome"]
        == "applied"
    )
    answer = deliver(opened(), "pull_request")
    assert (answer.status_code, answer.get_json()["outcome"]) == (200, "stale")
    row = one(db, pull_requests)
    assert (row["state"], row["version"], row["closed_at"]) == ("closed", 1, at(30))
    pipeline = one(db, pipeline_runs)
    assert (pipeline["status_merge"], pipeline["status_pr"], pipeline["version"]) == ("closed", "updated", 1)


def test_merged_pull_request(db):
    apply(db, "pull_request", opened())
    apply(db, "pull_request", pull_request("closed", REPO, 1, SHA_A, at(30), state="closed", merged=True))
    row = one(db, pull_requests)
    assert (row["state"], row["merged"], row["merged_at"]) == ("merged", True, at(30))
    assert one(db, pipeline_runs)["status_merge"] == "merged"


def test_files_changed_kept_when_absent_replaced_when_present(db):
    apply(db, "pull_request", opened(files_changed=FILES))
    assert one(db, pull_requests)["files_changed"] == FILES
    apply(db, "pull_request", pull_request("labeled", REPO, 1, SHA_A, at(20)))
    assert one(db, pull_requests)["files_changed"] == FILES
    other = [{**FILES[0], "filename": "docs/index.md", "status": "added"}]
    apply(db, "pull_request", pull_request("synchronize", REPO, 1, SHA_B, at(30), files_changed=other))
    assert one(db, pull_requests)["files_changed"] == other


def test_files_changed_absent_on_insert_is_null(db):
    apply(db, "pull_request", opened())
    assert one(db, pull_requests)["files_changed"] is None


# --- status_build -------------------------------------------------------------------------------


def test_synchronize_takes_the_checks_already_seen_for_the_new_head(db):
    apply(db, "pull_request", opened())
    apply(db, "check_run", run(SHA_A, "lint", "completed", 20, "success"))
    assert build(db) == "passed"
    # Checks of the new commit often arrive before the synchronize itself.
    apply(db, "check_run", run(SHA_B, "lint", "completed", 40, "failure"))
    assert build(db) == "passed"
    apply(db, "pull_request", pull_request("synchronize", REPO, 1, SHA_B, at(50)))
    pipeline = one(db, pipeline_runs)
    assert (pipeline["commit_sha"], pipeline["status_build"], pipeline["status_pr"]) == (SHA_B, "failed", "updated")


def test_synchronize_to_an_unseen_head_is_pending(db):
    apply(db, "pull_request", opened())
    apply(db, "check_run", run(SHA_A, "lint", "completed", 20, "failure"))
    apply(db, "pull_request", pull_request("synchronize", REPO, 1, SHA_B, at(50)))
    assert build(db) == "pending"


def test_a_check_of_the_old_head_after_synchronize_changes_nothing(db):
    apply(db, "pull_request", opened())
    apply(db, "check_run", run(SHA_A, "lint", "in_progress", 20, prs=(1,)))
    apply(db, "pull_request", pull_request("synchronize", REPO, 1, SHA_B, at(30)))
    apply(db, "check_run", run(SHA_B, "lint", "completed", 40, "success", prs=(1,), check_id=2))
    before = one(db, pipeline_runs)
    assert before["status_build"] == "passed"
    apply(db, "check_run", run(SHA_A, "lint", "completed", 60, "failure", prs=(1,)))
    after = one(db, pipeline_runs)
    assert (after["status_build"], after["commit_sha"], after["xmin"]) == ("passed", SHA_B, before["xmin"])
    assert {r["head_sha"]: r["conclusion"] for r in rows(db, ci_checks, "head_sha", "conclusion")} == {
        SHA_A: "failure",
        SHA_B: "success",
    }


def test_a_snapshot_of_one_pr_reads_only_its_own_checks(db):
    # Regression: the pipeline upsert once read the checks of every PR's head.
    apply(db, "pull_request", opened(1, SHA_A))
    apply(db, "pull_request", opened(2, SHA_B))
    apply(db, "check_run", run(SHA_A, "lint", "completed", 20, "success"))
    apply(db, "check_run", run(SHA_B, "lint", "completed", 20, "failure", check_id=2))
    apply(db, "pull_request", pull_request("labeled", REPO, 1, SHA_A, at(30)))
    apply(db, "pull_request", pull_request("labeled", REPO, 2, SHA_B, at(30)))
    assert (build(db, 1), build(db, 2)) == ("passed", "failed")


@pytest.mark.parametrize(
    ("checks", "expected"),
    [
        ([], "pending"),
        ([("queued", None)], "running"),
        ([("in_progress", None), ("completed", "success")], "running"),
        ([("completed", "success"), ("completed", "neutral"), ("completed", "skipped")], "passed"),
        ([("in_progress", None), ("completed", "failure")], "failed"),
        ([("completed", "success"), ("completed", "timed_out")], "failed"),
        ([("completed", "cancelled")], "failed"),
        ([("completed", "action_required")], "failed"),
        ([("completed", "startup_failure")], "failed"),
        # GitHub marks abandoned runs `stale`: they no longer count.
        ([("completed", "stale"), ("completed", "success")], "passed"),
    ],
)
def test_status_build_rule(db, checks, expected):
    apply(db, "pull_request", opened())
    for i, (state, conclusion) in enumerate(checks):
        apply(db, "check_run", run(SHA_A, f"check-{i}", state, 20 + i, conclusion, check_id=i + 1))
    assert build(db) == expected


@pytest.mark.parametrize(
    ("state", "expected"), [("pending", "running"), ("success", "passed"), ("failure", "failed"), ("error", "failed")]
)
def test_commit_status_counts(db, state, expected):
    apply(db, "pull_request", opened())
    apply(db, "check_run", run(SHA_A, "lint", "completed", 20, "success"))
    apply(db, "status", status(REPO, SHA_A, "ci/jenkins", 7, state, at(30)))
    assert build(db) == expected


def test_commit_status_pending_after_final_is_stale(db):
    apply(db, "pull_request", opened())
    apply(db, "status", status(REPO, SHA_A, "ci/jenkins", 8, "failure", at(40)))
    assert apply(db, "status", status(REPO, SHA_A, "ci/jenkins", 7, "pending", at(30))) == "stale"
    assert build(db) == "failed"


def test_commit_status_final_wins_a_tie_with_pending(db):
    apply(db, "pull_request", opened())
    apply(db, "status", status(REPO, SHA_A, "ci/jenkins", 8, "success", at(30)))
    assert apply(db, "status", status(REPO, SHA_A, "ci/jenkins", 7, "pending", at(30))) == "stale"
    assert build(db) == "passed"


def test_other_check_sources_count(db):
    apply(db, "pull_request", opened())
    apply(db, "workflow_job", workflow_job(REPO, SHA_A, "CI", "unit", 11, "in_progress", at(20)))
    assert build(db) == "running"
    apply(
        db,
        "workflow_job",
        workflow_job(
            REPO,
            SHA_A,
            "CI",
            "unit",
            11,
            "completed",
            at(20),
            started_at=at(21),
            completed_at=at(25),
            conclusion="success",
        ),
    )
    apply(
        db, "check_suite", check_suite(REPO, SHA_A, "circleci", 12, "completed", at(20), at(26), conclusion="success")
    )
    assert build(db) == "passed"
    # A workflow run from a fork lists no PRs: it still counts through its head sha.
    apply(db, "workflow_run", workflow_run(REPO, SHA_A, "CI", 13, "completed", at(20), at(27), conclusion="failure"))
    assert build(db) == "failed"


def test_completed_check_outranks_a_late_queued_one(db):
    apply(db, "pull_request", opened())
    apply(
        db,
        "check_run",
        check_run(REPO, SHA_A, "lint", 1, "completed", at(20), conclusion="success", completed_at=at(20)),
    )
    assert apply(db, "check_run", check_run(REPO, SHA_A, "lint", 1, "queued", at(20))) == "stale"
    row = one(db, ci_checks, head_sha=SHA_A)
    assert (row["status"], row["conclusion"]) == ("completed", "success")
    assert build(db) == "passed"


def test_rerequested_check_run_is_replaced_by_its_rerun(db):
    apply(db, "pull_request", opened())
    apply(db, "check_run", run(SHA_A, "lint", "completed", 20, "failure", prs=(1,), check_id=1))
    assert build(db) == "failed"
    # GitHub sends `rerequested` with the old run as it was, then a new run (new id).
    rerequested = run(SHA_A, "lint", "completed", 20, "failure", prs=(1,), check_id=1)
    rerequested["action"] = "rerequested"
    assert apply(db, "check_run", rerequested) == "applied"
    assert build(db) == "failed"
    apply(db, "check_run", run(SHA_A, "lint", "queued", 30, prs=(1,), check_id=2))
    assert build(db) == "running"
    apply(db, "check_run", run(SHA_A, "lint", "completed", 40, "success", prs=(1,), check_id=2))
    # The old run's rerequested delivery arriving late does not bring it back.
    assert apply(db, "check_run", rerequested) == "stale"
    assert build(db) == "passed"
    assert [(r["github_id"], r["conclusion"]) for r in rows(db, ci_checks, "github_id", "conclusion")] == [
        (2, "success")
    ]


def test_a_check_naming_an_unseen_pr_creates_its_pipeline_row(db):
    apply(db, "check_run", run(SHA_A, "lint", "completed", 20, "failure", prs=(1,)))
    pipeline = one(db, pipeline_runs)
    assert (pipeline["commit_sha"], pipeline["status_build"], pipeline["pr_updated_at"]) == (SHA_A, "failed", None)
    assert (pipeline["processed"], pipeline["version"]) == (False, 1)
    assert rows(db, pull_requests) == []
    # The PR event arriving afterwards fills the row in, whatever its time.
    apply(db, "pull_request", opened(seconds=5))
    pipeline = one(db, pipeline_runs)
    assert (pipeline["title"], pipeline["author"], pipeline["status_pr"]) == (
        "Update the README with new information.",
        "Codertocat",
        "opened",
    )
    assert (pipeline["status_build"], pipeline["pr_updated_at"], pipeline["version"]) == ("failed", at(5), 2)
    # ...and an older snapshot after it does not.
    assert apply(db, "pull_request", pull_request("opened", REPO, 1, SHA_B, at(4))) == "stale"
    assert one(db, pipeline_runs)["commit_sha"] == SHA_A


def test_a_check_of_an_unknown_commit_creates_no_pipeline_row(db):
    apply(db, "check_run", run(SHA_A, "lint", "completed", 20, "failure"))
    assert rows(db, pipeline_runs) == []
    assert len(rows(db, ci_checks)) == 1


# --- status_approval ------------------------------------------------------------------------------


def _review(reviewer: str, review_id: int, state: str, seconds: int, action: str = "submitted") -> dict[str, Any]:
    return review(action, REPO, 1, SHA_A, reviewer, review_id, state, at(seconds))


def test_commented_review_does_not_change_a_verdict(db):
    apply(db, "pull_request", opened())
    apply(db, "pull_request_review", _review("alice", 1, "approved", 20))
    apply(db, "pull_request_review", _review("alice", 2, "commented", 30))
    assert approval(db) == "approved"
    assert [r["state"] for r in rows(db, pr_reviews, "state")] == ["approved"]


def test_dismissal_removes_a_verdict_even_when_it_arrives_first(db):
    apply(db, "pull_request", opened())
    apply(db, "pull_request_review", _review("alice", 1, "dismissed", 20, action="dismissed"))
    apply(db, "pull_request_review", _review("alice", 1, "approved", 20))
    assert approval(db) == "pending"
    apply(db, "pull_request_review", _review("alice", 3, "approved", 40))
    assert approval(db) == "approved"


def test_changes_requested_wins_over_approvals(db):
    apply(db, "pull_request", opened())
    apply(db, "pull_request_review", _review("alice", 1, "approved", 20))
    apply(db, "pull_request_review", _review("bob", 2, "changes_requested", 25))
    apply(db, "pull_request_review", _review("carol", 3, "approved", 30))
    assert approval(db) == "changes_requested"
    # Bob's later approval replaces his own earlier verdict.
    apply(db, "pull_request_review", _review("bob", 4, "approved", 35))
    assert approval(db) == "approved"
    # An older review of his, arriving late, is stale.
    assert apply(db, "pull_request_review", _review("bob", 2, "changes_requested", 25)) == "stale"
    assert approval(db) == "approved"


def test_a_review_before_its_pull_request(db):
    apply(db, "pull_request_review", _review("alice", 1, "changes_requested", 20))
    pipeline = one(db, pipeline_runs)
    assert (pipeline["status_approval"], pipeline["commit_sha"], pipeline["pr_updated_at"]) == (
        "changes_requested",
        SHA_A,
        None,
    )
    apply(db, "pull_request", opened(seconds=10))
    pipeline = one(db, pipeline_runs)
    assert (pipeline["status_approval"], pipeline["status_pr"], pipeline["title"]) == (
        "changes_requested",
        "opened",
        "Update the README with new information.",
    )
    assert len(rows(db, pull_requests)) == 1


# --- repositories -----------------------------------------------------------------------------------


def test_rename_and_transfer_keep_one_row_per_github_id(db):
    payload = load_payload("repository/created.payload.json")
    apply(db, "repository", payload)
    [before] = rows(db, repositories, "id", "full_name", "owner")
    renamed = load_payload("repository/renamed.payload.json")
    renamed["repository"].update(
        name="Hello-Again", full_name="Octocoders/Hello-Again", updated_at="2019-05-15T15:21:00Z"
    )
    apply(db, "repository", renamed)
    transferred = load_payload("repository/transferred.payload.json")
    transferred["repository"].update(
        name="Hello-Again", full_name="Codertocat/Hello-Again", updated_at="2019-05-15T15:22:00Z"
    )
    transferred["repository"]["owner"]["login"] = "Codertocat"
    apply(db, "repository", transferred)
    assert rows(db, repositories, "id", "github_id", "name", "full_name", "owner") == [
        {
            "id": before["id"],
            "github_id": 186853261,
            "name": "Hello-Again",
            "full_name": "Codertocat/Hello-Again",
            "owner": "Codertocat",
        }
    ]


def test_a_freed_full_name_is_reused_by_another_repository(deliver, db):
    old = load_payload("repository/created.payload.json")
    assert deliver(old, "repository").status_code == 200
    renamed = load_payload("repository/renamed.payload.json")
    renamed["repository"].update(
        name="Hello-Again", full_name="Octocoders/Hello-Again", updated_at="2019-05-15T15:21:00Z"
    )
    assert deliver(renamed, "repository").status_code == 200
    newcomer = load_payload("repository/created.payload.json")
    newcomer["repository"]["id"] = 999_000_111
    answer = deliver(newcomer, "repository")
    assert (answer.status_code, answer.get_json()["outcome"]) == (200, "applied")
    assert rows(db, repositories, "github_id", "full_name") == [
        {"github_id": 186853261, "full_name": "Octocoders/Hello-Again"},
        {"github_id": 999_000_111, "full_name": "Octocoders/Hello-World"},
    ]


def test_deleted_repository_is_marked(db):
    apply(db, "repository", load_payload("repository/created.payload.json"))
    deleted = load_payload("repository/edited.payload.json")
    deleted["action"] = "deleted"
    apply(db, "repository", deleted)
    [row] = rows(db, repositories, "github_id", "deleted_at")
    assert row["github_id"] == 186853261 and row["deleted_at"] is not None


def test_push_moves_last_activity_forward_only(db):
    apply(db, "push", load_payload("push/payload.json"))
    [row] = rows(db, repositories, "last_activity")
    assert row["last_activity"].isoformat() == "2019-05-15T15:20:57+00:00"
    # An older snapshot (opened.payload.json: pushed_at 15:20:32) does not move it back.
    apply(db, "pull_request", load_payload("pull_request/opened.payload.json"))
    [row] = rows(db, repositories, "last_activity")
    assert row["last_activity"].isoformat() == "2019-05-15T15:20:57+00:00"


@pytest.mark.parametrize("order", [("opened", "review_requested"), ("review_requested", "opened")])
def test_opened_and_another_action_in_the_same_second(db, order):
    # Real GitHub samples: opened and review_requested share updated_at 15:20:33.
    for action in order:
        assert apply(db, "pull_request", load_payload(f"pull_request/{action}.payload.json")) == "applied"
    pipeline = one(db, pipeline_runs, 2)
    assert pipeline["status_pr"] == "updated"
    assert pipeline["pr_updated_at"].isoformat() == "2019-05-15T15:20:33+00:00"
