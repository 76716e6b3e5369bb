"""Every value list of the service, once: code compares with these, and schema.py turns them into CHECKs.

Pure: imports nothing of the service's I/O layers, so mappers and rules can use it.
A test compares the live database's check constraints with these enums, because
`alembic check` does not see a constraint edited by hand.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """What became of a signed delivery (the journal keeps the first four)."""

    APPLIED = "applied"
    IGNORED = "ignored"
    STALE = "stale"
    FAILED = "failed"
    # Answered, never journaled under these names.
    DUPLICATE = "duplicate"
    SPOOLED = "spooled"
    REJECTED = "rejected"
    UNAVAILABLE = "unavailable"


# The outcomes a journal row can hold.
JOURNALED_OUTCOMES = (Outcome.APPLIED, Outcome.IGNORED, Outcome.STALE, Outcome.FAILED)


class CheckSource(StrEnum):
    """Which GitHub event a ci_checks row came from."""

    CHECK_RUN = "check_run"
    CHECK_SUITE = "check_suite"
    WORKFLOW_RUN = "workflow_run"
    WORKFLOW_JOB = "workflow_job"
    STATUS = "status"


class PrState(StrEnum):
    """pull_requests.state."""

    OPEN = "open"
    CLOSED = "closed"
    MERGED = "merged"


class PrStatus(StrEnum):
    """pipeline_runs.status_pr."""

    OPENED = "opened"
    UPDATED = "updated"


class BuildStatus(StrEnum):
    """pipeline_runs.status_build."""

    PENDING = "pending"
    RUNNING = "running"
    PASSED = "passed"
    FAILED = "failed"


class ApprovalStatus(StrEnum):
    """pipeline_runs.status_approval."""

    PENDING = "pending"
    APPROVED = "approved"
    CHANGES_REQUESTED = "changes_requested"


class MergeStatus(StrEnum):
    """pipeline_runs.status_merge."""

    PENDING = "pending"
    MERGED = "merged"
    CLOSED = "closed"


class ReviewState(StrEnum):
    """pr_reviews.state: a verdict, or the tombstone of a dismissed one."""

    APPROVED = "approved"
    CHANGES_REQUESTED = "changes_requested"
    DISMISSED = "dismissed"


class RiskLevel(StrEnum):
    """insights.risk_level (written by the API service)."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class FilesStatus(StrEnum):
    """pull_requests.files_status: where the file list of the PR's current head stands."""

    PENDING = "pending"
    FETCHED = "fetched"
    TRUNCATED = "truncated"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    FAILED = "failed"


class JobState(StrEnum):
    """files_jobs.state: waiting (or leased by a worker), or settled for its head."""

    PENDING = "pending"
    DONE = "done"


class BodyEncoding(StrEnum):
    """webhook_deliveries.body_encoding: how the journaled bytes are stored."""

    IDENTITY = "identity"
    GZIP = "gzip"
