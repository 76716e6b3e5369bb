"""The database schema: one MetaData used by the code and by alembic's autogenerate."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

from flowlens_ingest.events.enums import (
    JOURNALED_OUTCOMES,
    ApprovalStatus,
    BodyEncoding,
    BuildStatus,
    CheckSource,
    FilesStatus,
    JobState,
    MergeStatus,
    Outcome,
    PrState,
    PrStatus,
    ReviewState,
    RiskLevel,
)

# Stable constraint names, so migrations written today match what alembic
# generates tomorrow (and `alembic check` stays quiet).
metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Ids are made by the service (uuid4): YugabyteDB releases on PostgreSQL 11
# have no built-in gen_random_uuid(), so there is no server default.
_Ts = sa.TIMESTAMP(timezone=True)


def one_of(column: str, values: type[StrEnum] | tuple[StrEnum, ...]) -> sa.CheckConstraint:
    """`column IN (...)` over an enum's values, named after the column (`ck_<table>_<column>`)."""
    listed = ", ".join(f"'{v.value}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=column)


def _id() -> sa.Column[Any]:
    return sa.Column("id", UUID(as_uuid=True), primary_key=True)


def _row_times() -> list[sa.Column[Any]]:
    return [
        sa.Column("created_at", _Ts, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", _Ts, nullable=False, server_default=sa.func.now()),
    ]


def _processing() -> list[sa.Column[Any]]:
    """The poller's contract: a new or changed row is unprocessed, and its version moves."""
    return [
        sa.Column("processed", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("version", sa.BigInteger, nullable=False, server_default=sa.text("1")),
    ]


def unprocessed_index_name(table: str) -> str:
    """The poller's index of a polled table."""
    return f"ix_{table}_unprocessed"


def _unprocessed(table: str) -> sa.Index:
    # The poller reads `processed = FALSE ORDER BY updated_at`: a partial index holds only
    # the unprocessed rows, and leads with a column of many values, so on YugabyteDB its
    # writes spread over every tablet instead of piling on the tablet of `false`.
    return sa.Index(unprocessed_index_name(table), "updated_at", postgresql_where=sa.text("processed = false"))


def _digest() -> sa.Column[Any]:
    """A hash of the stored snapshot's content: the last key of the total order that merges snapshots."""
    return sa.Column("digest", sa.BigInteger)


def _repo_fk() -> sa.Column[Any]:
    return sa.Column(
        "repo_id",
        UUID(as_uuid=True),
        sa.ForeignKey("repositories.id", ondelete="CASCADE"),
        nullable=False,
    )


repositories = sa.Table(
    "repositories",
    metadata,
    _id(),
    sa.Column("github_id", sa.BigInteger, nullable=False, unique=True),
    sa.Column("name", sa.Text, nullable=False),
    # Not unique: names move with renames and transfers, and a freed name is reused.
    sa.Column("full_name", sa.Text, nullable=False, index=True),
    sa.Column("owner", sa.Text),
    sa.Column("owner_avatar_url", sa.Text),
    sa.Column("description", sa.Text),
    sa.Column("is_private", sa.Boolean),
    sa.Column("default_branch", sa.Text),
    sa.Column("html_url", sa.Text),
    sa.Column("language", sa.Text),
    sa.Column("stars", sa.Integer),
    sa.Column("forks", sa.Integer),
    sa.Column("is_archived", sa.Boolean),
    sa.Column("last_activity", _Ts),
    sa.Column("github_created_at", _Ts),
    # GitHub's repository.updated_at: the stale guard for the descriptive columns.
    sa.Column("github_updated_at", _Ts),
    sa.Column("deleted_at", _Ts),
    _digest(),
    *_row_times(),
)

pull_requests = sa.Table(
    "pull_requests",
    metadata,
    _id(),
    _repo_fk(),
    sa.Column("pr_number", sa.Integer, nullable=False),
    sa.Column("github_id", sa.BigInteger),
    sa.Column("title", sa.Text),
    sa.Column("description", sa.Text),
    sa.Column("author", sa.Text),
    sa.Column("author_avatar", sa.Text),
    sa.Column("commit_sha", sa.Text),
    sa.Column("branch_name", sa.Text),
    sa.Column("base_branch", sa.Text),
    sa.Column("pr_url", sa.Text),
    sa.Column("files_changed", JSONB),
    # The head sha `files_changed` lists, and where the list of the current head stands.
    sa.Column("files_changed_sha", sa.Text),
    sa.Column("files_status", sa.Text),
    sa.Column("additions", sa.Integer),
    sa.Column("deletions", sa.Integer),
    sa.Column("changed_files", sa.Integer),
    sa.Column("commits_count", sa.Integer),
    sa.Column("labels", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("assignees", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("reviewers", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    sa.Column("is_draft", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("merged", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("merged_at", _Ts),
    sa.Column("closed_at", _Ts),
    sa.Column("github_created_at", _Ts),
    sa.Column("github_updated_at", _Ts),
    _digest(),
    *_processing(),
    *_row_times(),
    sa.UniqueConstraint("repo_id", "pr_number"),
    one_of("state", PrState),
    one_of("files_status", FilesStatus),
    _unprocessed("pull_requests"),
)

pipeline_runs = sa.Table(
    "pipeline_runs",
    metadata,
    _id(),
    _repo_fk(),
    sa.Column("pr_number", sa.Integer, nullable=False),
    sa.Column("commit_sha", sa.Text),
    sa.Column("author", sa.Text),
    sa.Column("avatar_url", sa.Text),
    sa.Column("title", sa.Text),
    sa.Column("status_pr", sa.Text, nullable=False, server_default=PrStatus.OPENED.value),
    sa.Column("status_build", sa.Text, nullable=False, server_default=BuildStatus.PENDING.value),
    sa.Column("status_approval", sa.Text, nullable=False, server_default=ApprovalStatus.PENDING.value),
    sa.Column("status_merge", sa.Text, nullable=False, server_default=MergeStatus.PENDING.value),
    # GitHub's pull_request.updated_at of the snapshot the PR columns came from
    # (NULL while the row is known only from a check event): the stale guard.
    sa.Column("pr_updated_at", _Ts),
    _digest(),
    *_processing(),
    *_row_times(),
    sa.UniqueConstraint("repo_id", "pr_number"),
    one_of("status_pr", PrStatus),
    one_of("status_build", BuildStatus),
    one_of("status_approval", ApprovalStatus),
    one_of("status_merge", MergeStatus),
    # Checks find the PRs of a commit by head sha.
    sa.Index(None, "repo_id", "commit_sha"),
    _unprocessed("pipeline_runs"),
)

ci_checks = sa.Table(
    "ci_checks",
    metadata,
    _id(),
    _repo_fk(),
    sa.Column("head_sha", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("github_id", sa.BigInteger),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("conclusion", sa.Text),
    sa.Column("url", sa.Text),
    sa.Column("github_started_at", _Ts),
    sa.Column("github_completed_at", _Ts),
    sa.Column("github_updated_at", _Ts),
    # Order key of the stored state: (event_at, rank); an older key never overwrites.
    sa.Column("event_at", _Ts),
    sa.Column("rank", sa.SmallInteger, nullable=False),
    _digest(),
    *_row_times(),
    # One row per check of a commit: a re-run replaces the earlier row of the same check.
    sa.UniqueConstraint("repo_id", "head_sha", "source", "name"),
    one_of("source", CheckSource),
)

pr_reviews = sa.Table(
    "pr_reviews",
    metadata,
    _id(),
    _repo_fk(),
    sa.Column("pr_number", sa.Integer, nullable=False),
    sa.Column("reviewer", sa.Text, nullable=False),
    sa.Column("review_id", sa.BigInteger, nullable=False),
    # approved | changes_requested | dismissed (a dismissal is kept as a tombstone
    # so that the dismissed review arriving late cannot come back).
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("commit_sha", sa.Text),
    sa.Column("html_url", sa.Text),
    sa.Column("github_submitted_at", _Ts),
    sa.Column("rank", sa.SmallInteger, nullable=False),
    _digest(),
    *_row_times(),
    sa.UniqueConstraint("repo_id", "pr_number", "reviewer"),
    one_of("state", ReviewState),
)

insights = sa.Table(
    "insights",
    metadata,
    _id(),
    _repo_fk(),
    sa.Column("pr_number", sa.Integer, nullable=False),
    sa.Column("commit_sha", sa.Text),
    sa.Column("author", sa.Text),
    sa.Column("avatar_url", sa.Text),
    sa.Column("risk_level", sa.Text),
    sa.Column("summary", sa.Text),
    sa.Column("recommendation", sa.Text),
    *_processing(),
    *_row_times(),
    one_of("risk_level", RiskLevel),
    sa.Index(None, "repo_id", "pr_number"),
    _unprocessed("insights"),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("delivery_id", sa.Text, primary_key=True),
    # 0 when X-GitHub-Hook-ID is absent.
    sa.Column("hook_id", sa.BigInteger, primary_key=True, server_default=sa.text("0")),
    sa.Column("event", sa.Text, nullable=False),
    sa.Column("action", sa.Text),
    sa.Column("repository_github_id", sa.BigInteger),
    sa.Column("received_at", _Ts, nullable=False, server_default=sa.func.now()),
    # A small hash of the delivery id (0 .. JOURNAL_BUCKETS-1): spreads the time index.
    sa.Column("bucket", sa.SmallInteger, nullable=False, server_default=sa.text("0")),
    # The exact bytes the signature covered (NULL when payloads are not kept and the
    # delivery applied), how they are stored, and their content type.
    sa.Column("body", sa.LargeBinary),
    sa.Column("body_encoding", sa.Text, nullable=False, server_default=BodyEncoding.IDENTITY.value),
    sa.Column("content_type", sa.Text),
    sa.Column("payload_sha256", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("applied_at", _Ts),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("1")),
    # The body is the JSON GitHub's API showed for the delivery (`recover --fetch`), not the signed bytes.
    sa.Column("body_from_api", sa.Boolean, nullable=False, server_default=sa.false()),
    one_of("outcome", JOURNALED_OUTCOMES),
    one_of("body_encoding", BodyEncoding),
    # Time-ordered reads and deletes (deliveries, replay --since, prune) go by bucket,
    # so that on YugabyteDB the index is sharded over JOURNAL_BUCKETS hash values and
    # each bucket is read in received_at order (see docs/deploying.md, YugabyteDB).
    sa.Index("ix_webhook_deliveries_bucket_received_at", "bucket", "received_at"),
    sa.Index(
        "ix_webhook_deliveries_failed", "received_at", postgresql_where=sa.text(f"outcome = '{Outcome.FAILED.value}'")
    ),
)

# The files worker's queue: one job per pull request, for its newest head.
files_jobs = sa.Table(
    "files_jobs",
    metadata,
    _id(),
    _repo_fk(),
    sa.Column("pr_number", sa.Integer, nullable=False),
    sa.Column("head_sha", sa.Text, nullable=False),
    # The GitHub App installation the delivery came through (NULL: use the token).
    sa.Column("installation_id", sa.BigInteger),
    # GitHub's pull_request.updated_at of the delivery that asked: a job never goes back.
    sa.Column("pr_updated_at", _Ts),
    sa.Column("state", sa.Text, nullable=False, server_default=JobState.PENDING.value),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("run_after", _Ts, nullable=False, server_default=sa.func.now()),
    # A worker holds a job until leased_until; a crashed worker's job is taken again after it.
    sa.Column("leased_until", _Ts),
    sa.Column("lease_token", UUID(as_uuid=True)),
    # The files_status the last fetch settled on, and its ETag (for a 304 next time).
    sa.Column("result", sa.Text),
    sa.Column("etag", sa.Text),
    sa.Column("etag_sha", sa.Text),
    sa.Column("last_error", sa.Text),
    *_row_times(),
    sa.UniqueConstraint("repo_id", "pr_number"),
    one_of("state", JobState),
    one_of("result", FilesStatus),
    # The workers' claim: pending jobs in run_after order.
    sa.Index("ix_files_jobs_run_after_pending", "run_after", postgresql_where=sa.text("state = 'pending'")),
)

# The webhooks deliveries came from (X-GitHub-Hook-ID with -Installation-Target-Type and -ID),
# and GITHUB_WEBHOOKS: the delivery logs `recover` reads, and how far the scheduled pass checked each.
webhook_hooks = sa.Table(
    "webhook_hooks",
    metadata,
    sa.Column("hook_id", sa.BigInteger, primary_key=True, autoincrement=False),
    # repository | organization | integration (a GitHub App's webhook) | ...
    sa.Column("target_type", sa.Text, nullable=False),
    sa.Column("target_id", sa.BigInteger),
    # The hook's API path: repos/OWNER/REPO/hooks/ID, orgs/ORG/hooks/ID or app/hook.
    sa.Column("api_path", sa.Text, nullable=False),
    # Every delivery GitHub logged up to this time has been compared with the journal.
    sa.Column("checked_through", _Ts),
    # A pass that stopped reading before `checked_through` (its page bound) leaves where the older,
    # unread part of the log goes on (GitHub's `Link: rel="next"` cursor URL), and the time down to
    # which it read the newer part: the next pass reads the new part down to it, then goes on there.
    sa.Column("resume_url", sa.Text),
    sa.Column("resume_newer_than", _Ts),
    *_row_times(),
)

# Named leases: one holder at a time across every VM (the scheduled recovery pass).
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("holder", UUID(as_uuid=True), nullable=False),
    sa.Column("leased_until", _Ts, nullable=False),
    # Who holds it, for an operator told to wait: "host pid 123 (recover)", and since when.
    sa.Column("holder_name", sa.Text),
    sa.Column("taken_at", _Ts),
)

# GitHub's rate limits, shared by every process using a credential: until when GitHub asked it to
# send nothing. Keyed by a name that holds no secret (`installation:<id>`, `app:<id>`,
# `token:<sha256 prefix>`); a handful of rows, one per credential.
github_waits = sa.Table(
    "github_waits",
    metadata,
    sa.Column("credential", sa.Text, primary_key=True),
    sa.Column("wait_until", _Ts, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("updated_at", _Ts, nullable=False, server_default=sa.func.now()),
)

# Where an interrupted `backfill` resumes: per repository and scope (its --state and --since), the
# highest pull request number landed. Removed once the repository is done.
backfill_progress = sa.Table(
    "backfill_progress",
    metadata,
    sa.Column("full_name", sa.Text, primary_key=True),
    sa.Column("scope", sa.Text, primary_key=True),
    sa.Column("done_through", sa.Integer, nullable=False),
    *_row_times(),
)
