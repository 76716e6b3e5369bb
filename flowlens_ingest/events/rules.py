"""The status rules of the contract (docs/design.md), in one place. Pure: no SQL, no I/O.

status_pr and status_merge are decided from one pull request snapshot (mappers
call them). status_build and status_approval are aggregates over stored rows:
statements.py evaluates them in SQL from the constants below, so they never
depend on the order deliveries arrive in; `build_status` and `approval_status`
here are the same rules over Python values, the reference the SQL is tested against.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flowlens_ingest.events.enums import ApprovalStatus, BuildStatus, MergeStatus, PrState, PrStatus, ReviewState

# A check concluding one of these fails the build; `error` is a commit status's failure.
FAILING_CONCLUSIONS = ("failure", "timed_out", "cancelled", "action_required", "startup_failure", "error")
# GitHub marks runs that never finished as `stale`: they no longer speak for the commit.
IGNORED_CONCLUSIONS = ("stale",)
COMPLETED = "completed"

# Lifecycle order of a check: where two states share a timestamp, the later stage wins.
CHECK_RANK = {"requested": 0, "queued": 0, "waiting": 0, "pending": 0, "in_progress": 1, COMPLETED: 2}
# Lifecycle order of a pull request snapshot where timestamps tie.
STATE_RANK = {PrState.OPEN: 0, PrState.CLOSED: 1, PrState.MERGED: 2}
MERGE_RANK = {MergeStatus.PENDING: 0, MergeStatus.CLOSED: 1, MergeStatus.MERGED: 2}
# `opened` is the first event of its second: an `updated` of the same second came after it.
PR_STATUS_RANK = {PrStatus.OPENED: 0, PrStatus.UPDATED: 1}
# A dismissal outranks the review it dismisses (they share the review's submitted_at).
REVIEW_RANK = {ReviewState.APPROVED: 0, ReviewState.CHANGES_REQUESTED: 0, ReviewState.DISMISSED: 1}

# pull_request actions after which the PR counts as (re)opened rather than updated.
OPENING_ACTIONS = ("opened", "reopened")


def refetches_files(payload: dict[str, Any]) -> bool:
    """The PR's file list may have changed for the same head: reopened, or its base branch edited.

    https://docs.github.com/en/webhooks/webhook-events-and-payloads#pull_request
    (`edited` carries `changes.base` when the base branch changed).
    """
    action = payload.get("action")
    changes = payload.get("changes")
    return action == "reopened" or (action == "edited" and isinstance(changes, dict) and "base" in changes)


def pr_status(action: object) -> PrStatus:
    """`opened` after opened/reopened, `updated` after any later change."""
    return PrStatus.OPENED if action in OPENING_ACTIONS else PrStatus.UPDATED


def merge_status(state: PrState) -> MergeStatus:
    """`pending` while open, else merged or closed."""
    return MergeStatus.PENDING if state is PrState.OPEN else MergeStatus(state.value)


def build_status(checks: Iterable[tuple[str, str | None]]) -> BuildStatus:
    """status_build from the (status, conclusion) of every check of the PR's head."""
    counted = [(status, conclusion) for status, conclusion in checks if conclusion not in IGNORED_CONCLUSIONS]
    if any(conclusion in FAILING_CONCLUSIONS for _, conclusion in counted):
        return BuildStatus.FAILED
    if any(status != COMPLETED for status, _ in counted):
        return BuildStatus.RUNNING
    return BuildStatus.PASSED if counted else BuildStatus.PENDING


def approval_status(verdicts: Iterable[ReviewState]) -> ApprovalStatus:
    """status_approval from each reviewer's latest verdict (a dismissal counts as none)."""
    states = set(verdicts)
    if ReviewState.CHANGES_REQUESTED in states:
        return ApprovalStatus.CHANGES_REQUESTED
    if ReviewState.APPROVED in states:
        return ApprovalStatus.APPROVED
    return ApprovalStatus.PENDING
