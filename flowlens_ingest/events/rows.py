"""The rows a delivery maps to: plain frozen dataclasses, one per table it writes. Pure.

A row's field names are its table's column names; statements.py declares, per
row type, the statement that lands it, so adding a row kind is one dataclass
here and one declaration there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from flowlens_ingest.events.enums import CheckSource, FilesStatus, MergeStatus, PrState, PrStatus, ReviewState


@dataclass(frozen=True)
class RepositoryRow:
    """The `repository` object of a delivery: the repositories row."""

    github_id: int
    name: str
    full_name: str
    owner: str | None
    owner_avatar_url: str | None
    description: str | None
    is_private: bool | None
    default_branch: str | None
    html_url: str | None
    language: str | None
    stars: int | None
    forks: int | None
    is_archived: bool | None
    last_activity: datetime | None
    github_created_at: datetime | None
    github_updated_at: datetime | None
    deleted: bool = False


@dataclass(frozen=True)
class PullRequestRow:
    """One pull request snapshot: the pull_requests row."""

    pr_number: int
    github_id: int | None
    title: str | None
    description: str | None
    author: str | None
    author_avatar: str | None
    commit_sha: str | None
    branch_name: str | None
    base_branch: str | None
    pr_url: str | None
    # None when the sender did not include it (GitHub never does): the stored list is kept.
    files_changed: list[Any] | None
    # The head the list above describes (None with it).
    files_changed_sha: str | None
    # `fetched` with a list; None: `pending` for a new head, else as stored.
    files_status: FilesStatus | None
    additions: int | None
    deletions: int | None
    changed_files: int | None
    commits_count: int | None
    labels: list[dict[str, Any]]
    assignees: list[dict[str, Any]]
    reviewers: list[dict[str, Any]]
    is_draft: bool
    state: PrState
    merged: bool
    merged_at: datetime | None
    closed_at: datetime | None
    github_created_at: datetime | None
    github_updated_at: datetime | None


@dataclass(frozen=True)
class PipelineRow:
    """The pull request's own columns of its pipeline_runs row."""

    pr_number: int
    commit_sha: str | None
    author: str | None
    avatar_url: str | None
    title: str | None
    status_pr: PrStatus
    status_merge: MergeStatus
    pr_updated_at: datetime | None


@dataclass(frozen=True)
class CheckRow:
    """The latest state of one check of a commit: a ci_checks row."""

    head_sha: str
    source: CheckSource
    name: str
    github_id: int | None
    status: str
    conclusion: str | None
    url: str | None
    github_started_at: datetime | None
    github_completed_at: datetime | None
    github_updated_at: datetime | None
    event_at: datetime | None
    rank: int


@dataclass(frozen=True)
class ReviewRow:
    """A reviewer's latest verdict on a PR: a pr_reviews row."""

    pr_number: int
    reviewer: str
    review_id: int
    state: ReviewState
    commit_sha: str | None
    html_url: str | None
    github_submitted_at: datetime | None
    rank: int


@dataclass(frozen=True)
class FilesJobRow:
    """A request to fetch a PR head's file list from GitHub: a files_jobs row."""

    pr_number: int
    head_sha: str
    installation_id: int | None
    pr_updated_at: datetime | None
    # Fetch again even for the same head (the base moved, or the PR reopened).
    refetch: bool


Row = PullRequestRow | PipelineRow | CheckRow | ReviewRow | FilesJobRow
R = TypeVar("R", PullRequestRow, PipelineRow, CheckRow, ReviewRow, FilesJobRow)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def field_names(row_type: type) -> tuple[str, ...]:
    """A row dataclass's field names, in order."""
    # dataclasses.fields() rebuilds its tuple on every call: every row of every delivery pays it.
    names = _FIELD_NAMES.get(row_type)
    if names is None:
        names = _FIELD_NAMES[row_type] = tuple(f.name for f in dataclasses.fields(row_type))
    return names


# json.dumps with these options builds this very encoder on every call.
_DIGEST_TEXT = json.JSONEncoder(sort_keys=True, default=str, ensure_ascii=False, separators=(",", ":")).encode


def digest(row: Any) -> int:
    """A 64-bit hash of a row's content: the last key of the order snapshots merge by."""
    text = _DIGEST_TEXT([getattr(row, name) for name in field_names(type(row))])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


@dataclass(frozen=True)
class Changes:
    """Everything one delivery asks the database to change, in the order it is applied."""

    repository: RepositoryRow | None = None
    rows: tuple[Row, ...] = ()
    # PRs the event names (check events, reviews): their pipeline_runs row is
    # created if missing, seeded with this head sha.
    pr_heads: tuple[tuple[int, str], ...] = ()

    def of(self, kind: type[R]) -> list[R]:
        """The rows of one kind."""
        return [row for row in self.rows if isinstance(row, kind)]

    @property
    def pull_request(self) -> PullRequestRow | None:
        """The PR snapshot, if the delivery carries one."""
        return next(iter(self.of(PullRequestRow)), None)

    @property
    def pipeline(self) -> PipelineRow | None:
        """The PR's own pipeline columns, if the delivery carries a PR snapshot."""
        return next(iter(self.of(PipelineRow)), None)

    @property
    def checks(self) -> tuple[CheckRow, ...]:
        """The checks the delivery reports."""
        return tuple(self.of(CheckRow))

    @property
    def review(self) -> ReviewRow | None:
        """The review verdict the delivery reports."""
        return next(iter(self.of(ReviewRow)), None)
