"""rules.py: the status rules of docs/design.md for pipeline_runs, as tables of inputs and the status they give.

Pure functions: no database. statements.py evaluates status_build and
status_approval in SQL from the same constants; test_statements.py checks the
SQL on a real database.
"""

from __future__ import annotations

import itertools

import pytest

from flowlens_ingest.events.enums import ApprovalStatus, BuildStatus, MergeStatus, PrState, PrStatus, ReviewState
from flowlens_ingest.events.rules import approval_status, build_status, merge_status, pr_status

# status_pr: `opened` after opened/reopened, `updated` after any later change of the PR.
PR_STATUS = [
    ("opened", PrStatus.OPENED),
    ("reopened", PrStatus.OPENED),
    ("edited", PrStatus.UPDATED),
    ("synchronize", PrStatus.UPDATED),
    ("closed", PrStatus.UPDATED),
    ("labeled", PrStatus.UPDATED),
    ("assigned", PrStatus.UPDATED),
    ("review_requested", PrStatus.UPDATED),
    ("ready_for_review", PrStatus.UPDATED),
    ("converted_to_draft", PrStatus.UPDATED),
    (None, PrStatus.UPDATED),
]

# status_merge: `pending` while open, else merged or closed.
MERGE_STATUS = [
    (PrState.OPEN, MergeStatus.PENDING),
    (PrState.MERGED, MergeStatus.MERGED),
    (PrState.CLOSED, MergeStatus.CLOSED),
]

# status_build, for the checks of the PR's head, each (status, conclusion): `pending` with no
# check, `failed` if any check failed (or a commit status failure/error), else `running` if
# any is not completed, else `passed`. A commit status maps to ("pending", None) or
# ("completed", its state).
BUILD_STATUS = [
    pytest.param([], BuildStatus.PENDING, id="no-check"),
    pytest.param([("completed", "success")], BuildStatus.PASSED, id="success"),
    pytest.param(
        [("completed", "success"), ("completed", "neutral"), ("completed", "skipped")],
        BuildStatus.PASSED,
        id="success-neutral-skipped",
    ),
    pytest.param([("queued", None)], BuildStatus.RUNNING, id="queued"),
    pytest.param([("in_progress", None), ("completed", "success")], BuildStatus.RUNNING, id="one-in-progress"),
    pytest.param([("requested", None), ("completed", "skipped")], BuildStatus.RUNNING, id="one-requested"),
    pytest.param([("pending", None)], BuildStatus.RUNNING, id="commit-status-pending"),
    pytest.param([("completed", "failure")], BuildStatus.FAILED, id="failure"),
    pytest.param([("completed", "timed_out")], BuildStatus.FAILED, id="timed_out"),
    pytest.param([("completed", "cancelled")], BuildStatus.FAILED, id="cancelled"),
    pytest.param([("completed", "action_required")], BuildStatus.FAILED, id="action_required"),
    pytest.param([("completed", "startup_failure")], BuildStatus.FAILED, id="startup_failure"),
    pytest.param([("completed", "error")], BuildStatus.FAILED, id="commit-status-error"),
    pytest.param(
        [("completed", "success"), ("in_progress", None), ("completed", "failure")],
        BuildStatus.FAILED,
        id="failed-wins-over-running-and-passed",
    ),
    # GitHub marks checks that never finished as `stale`: they no longer speak for the commit.
    pytest.param([("completed", "stale")], BuildStatus.PENDING, id="only-stale"),
    pytest.param([("completed", "stale"), ("completed", "success")], BuildStatus.PASSED, id="stale-and-success"),
]

A, C, D = ReviewState.APPROVED, ReviewState.CHANGES_REQUESTED, ReviewState.DISMISSED

# status_approval, from each reviewer's latest verdict (a dismissal removes it):
# `changes_requested` if any, else `approved` if any, else `pending`.
APPROVAL_STATUS = [
    pytest.param([], ApprovalStatus.PENDING, id="no-review"),
    pytest.param([A], ApprovalStatus.APPROVED, id="approved"),
    pytest.param([A, A], ApprovalStatus.APPROVED, id="two-approvals"),
    pytest.param([C], ApprovalStatus.CHANGES_REQUESTED, id="changes-requested"),
    pytest.param([A, C, A], ApprovalStatus.CHANGES_REQUESTED, id="changes-requested-wins"),
    pytest.param([D], ApprovalStatus.PENDING, id="dismissed-only"),
    pytest.param([D, A], ApprovalStatus.APPROVED, id="dismissed-and-approved"),
    pytest.param([D, C], ApprovalStatus.CHANGES_REQUESTED, id="dismissed-and-changes-requested"),
]


@pytest.mark.parametrize(("action", "expected"), PR_STATUS)
def test_pr_status(action, expected):
    assert pr_status(action) is expected


@pytest.mark.parametrize(("state", "expected"), MERGE_STATUS)
def test_merge_status(state, expected):
    assert merge_status(state) is expected


@pytest.mark.parametrize(("checks", "expected"), BUILD_STATUS)
def test_build_status(checks, expected):
    assert build_status(checks) is expected
    # An aggregate: the order the checks are listed in (or arrived in) does not matter.
    assert {build_status(order) for order in itertools.permutations(checks)} == {expected}
    # Any iterable will do, a generator included.
    assert build_status(iter(checks)) is expected


@pytest.mark.parametrize(("verdicts", "expected"), APPROVAL_STATUS)
def test_approval_status(verdicts, expected):
    assert approval_status(verdicts) is expected
    assert {approval_status(order) for order in itertools.permutations(verdicts)} == {expected}
    assert approval_status(iter(verdicts)) is expected


def test_the_statuses_are_the_values_pipeline_runs_stores():
    assert {s.value for s in PrStatus} == {"opened", "updated"}
    assert {s.value for s in BuildStatus} == {"pending", "running", "passed", "failed"}
    assert {s.value for s in ApprovalStatus} == {"pending", "approved", "changes_requested"}
    assert {s.value for s in MergeStatus} == {"pending", "merged", "closed"}
