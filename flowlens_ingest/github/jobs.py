"""The files queue: claim a job, settle it (writing the list back), reschedule it, report on it.

Each is one short transaction through Database; none is ever open while the
worker talks to GitHub. Jobs are claimed with FOR UPDATE SKIP LOCKED and a lease,
so workers on several VMs share the queue and a crashed worker's job is taken
again once its lease runs out.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from flowlens_ingest.events.enums import FilesStatus, JobState
from flowlens_ingest.store.batch import Statement
from flowlens_ingest.store.database import Database
from flowlens_ingest.store.expressions import flag_changed, param, seconds_from_now
from flowlens_ingest.store.schema import files_jobs, pull_requests, repositories


@dataclass(frozen=True)
class Job:
    """A claimed files job, with what the fetch needs to know about its PR."""

    id: uuid.UUID
    repo_id: uuid.UUID
    pr_number: int
    head_sha: str
    installation_id: int | None
    attempts: int
    lease_token: uuid.UUID
    full_name: str
    # The PR's changed_files (how many files to expect), and the head its stored list is for.
    changed_files: int | None
    stored_sha: str | None
    etag: str | None
    etag_sha: str | None
    result: str | None


def claim(database: Database, lease: timedelta) -> Job | None:
    """Lease the job that has waited longest and is due; None when none is."""
    j, pr = files_jobs, pull_requests
    due = (
        sa.select(j.c.id)
        .where(
            j.c.state == JobState.PENDING.value,
            j.c.run_after <= sa.func.now(),
            sa.or_(j.c.leased_until.is_(None), j.c.leased_until < sa.func.now()),
        )
        .order_by(j.c.run_after)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )

    def of_pr(column: sa.Column[Any]) -> sa.ScalarSelect[Any]:
        return sa.select(column).where(pr.c.repo_id == j.c.repo_id, pr.c.pr_number == j.c.pr_number).scalar_subquery()

    statement = (
        sa.update(j)
        .where(j.c.id == due)
        .values(
            leased_until=sa.func.now() + lease,
            lease_token=uuid.uuid4(),
            attempts=j.c.attempts + 1,
            updated_at=sa.func.now(),
        )
        .returning(
            j.c.id,
            j.c.repo_id,
            j.c.pr_number,
            j.c.head_sha,
            j.c.installation_id,
            j.c.attempts,
            j.c.lease_token,
            sa.select(repositories.c.full_name).where(repositories.c.id == j.c.repo_id).scalar_subquery(),
            of_pr(pr.c.changed_files),
            of_pr(pr.c.files_changed_sha),
            j.c.etag,
            j.c.etag_sha,
            j.c.result,
        )
    )
    row = database.first(statement)
    return None if row is None else Job(*row)


# --- settling: the PR's list (only if its head is still the job's), then the job ----------------


def _pr_of_job() -> list[sa.ColumnElement[bool]]:
    t = pull_requests
    return [t.c.repo_id == param("repo_id"), t.c.pr_number == param("pr_number"), t.c.commit_sha == param("head_sha")]


def write_list() -> sa.Executable:
    """Store a fetched list for the job's head, if the PR's head is still that and anything changed.

    A stored list is not replaced by an empty one that is not the head's whole list (an answer cut
    before its first entry, say): the status is recorded, the stored list and the head it describes
    stay. A whole list that is empty is the head's list, and replaces it.
    """
    t = pull_requests
    # `keep_stored` comes as a parameter of its own: the list, the bulk of the statement, is sent only once.
    keep = sa.and_(param("keep_stored"), t.c.files_changed.is_not(None))
    new: dict[str, Any] = {
        "files_changed": sa.case((keep, t.c.files_changed), else_=sa.cast(param("files"), t.c.files_changed.type)),
        "files_changed_sha": sa.case((keep, t.c.files_changed_sha), else_=param("head_sha")),
        "files_status": param("status"),
    }
    return (
        sa.update(t)
        .where(*_pr_of_job(), sa.or_(*(t.c[c].is_distinct_from(v) for c, v in new.items())))
        .values(**new, **flag_changed(t))
    )


def write_unchanged() -> sa.Executable:
    """GitHub answered 304: the stored list (for `etag_sha`) is also the job head's list."""
    t = pull_requests
    new = {"files_changed_sha": param("head_sha"), "files_status": param("status")}
    return (
        sa.update(t)
        .where(
            *_pr_of_job(),
            t.c.files_changed_sha == param("etag_sha"),
            sa.or_(*(t.c[c].is_distinct_from(v) for c, v in new.items())),
        )
        .values(**new, **flag_changed(t))
    )


def write_status() -> sa.Executable:
    """Record why the job head's list could not be had; the stored list (of an older head) stays."""
    t = pull_requests
    return (
        sa.update(t)
        .where(*_pr_of_job(), t.c.files_status.is_distinct_from(param("status")))
        .values(files_status=param("status"), **flag_changed(t))
    )


def settle_job() -> sa.Executable:
    """Mark the job done for its head, if this worker still holds its lease (else roll back)."""
    j = files_jobs
    return (
        sa.update(j)
        .where(j.c.id == param("job_id"), j.c.lease_token == param("lease_token"))
        .values(
            state=JobState.DONE.value,
            leased_until=sa.null(),
            lease_token=sa.null(),
            result=param("status"),
            etag=param("etag"),
            etag_sha=param("etag_sha_new"),
            last_error=param("error"),
            updated_at=sa.func.now(),
        )
        .returning(j.c.id)
    )


def settle(
    database: Database,
    job: Job,
    status: FilesStatus,
    *,
    files: list[dict[str, Any]] | None = None,
    not_modified: bool = False,
    etag: str | None = None,
    error: str | None = None,
) -> bool:
    """Write the outcome back and mark the job done, in one transaction; False if the lease was lost."""
    if not_modified:
        write = write_unchanged
    elif files is not None:
        write = write_list
    else:
        write = write_status
    params = {
        "repo_id": job.repo_id,
        "pr_number": job.pr_number,
        "head_sha": job.head_sha,
        "status": status.value,
        "files": files,
        # A stored list stays when an answer cut before its first entry gives none; a whole list
        # that is empty (a head changing no file) replaces it.
        "keep_stored": not files and status is not FilesStatus.FETCHED,
        "etag_sha": job.etag_sha,
        "job_id": job.id,
        "lease_token": job.lease_token,
        "etag": etag,
        "etag_sha_new": job.head_sha if etag else None,
        "error": error,
    }
    batch = [Statement(write, params), Statement(settle_job, params)]
    return database.run(batch) is not None


def extend(database: Database, job: Job, lease: timedelta) -> bool:
    """Hold the job `lease` longer from now (a list of many pages); False when another worker holds it now."""
    j = files_jobs
    changed = database.execute(
        sa.update(j)
        .where(j.c.id == job.id, j.c.lease_token == job.lease_token)
        .values(leased_until=sa.func.now() + lease, updated_at=sa.func.now())
    )
    return changed == 1


def reschedule(database: Database, job: Job, after_s: float, error: str, *, refund: bool = False) -> bool:
    """Release the job for `after_s` seconds; `refund` gives back the attempt (a rate limit is not a failure).

    Timed on the database's clock, as claims are: a worker whose clock runs behind would otherwise
    make the job due early, and claim and put it back without end until its own time came.
    False if the lease was lost (another worker holds the job now): nothing changed.
    """
    j = files_jobs
    changed = database.execute(
        sa.update(j)
        .where(j.c.id == job.id, j.c.lease_token == job.lease_token)
        .values(
            run_after=seconds_from_now(after_s),
            leased_until=sa.null(),
            lease_token=sa.null(),
            last_error=error,
            attempts=j.c.attempts - (1 if refund else 0),
            updated_at=sa.func.now(),
        )
    )
    return changed == 1


@dataclass(frozen=True)
class QueueStatus:
    """What the queue holds: jobs by state and result, and how long the oldest pending one has waited."""

    counts: dict[str, int]
    oldest_pending_s: float | None


def status(database: Database) -> QueueStatus:
    """Jobs by `pending`, `leased` and each settled files_status, and the oldest pending job's age."""
    j = files_jobs
    label = sa.case(
        (sa.and_(j.c.state == JobState.PENDING.value, j.c.leased_until > sa.func.now()), "leased"),
        (j.c.state == JobState.PENDING.value, JobState.PENDING.value),
        else_=sa.func.coalesce(j.c.result, JobState.DONE.value),
    ).label("label")
    rows = database.read(sa.select(label, sa.func.count()).group_by(label))
    age = sa.func.extract("epoch", sa.func.now() - sa.func.min(j.c.created_at))
    oldest = database.read(sa.select(age).where(j.c.state == JobState.PENDING.value))[0][0]
    return QueueStatus({str(k): int(n) for k, n in rows}, None if oldest is None else float(oldest))


def recent_errors(database: Database, limit: int = 10) -> list[sa.Row[Any]]:
    """The latest jobs that ended or wait with an error, newest first."""
    j = files_jobs
    query = (
        sa.select(repositories.c.full_name, j.c.pr_number, j.c.head_sha, j.c.state, j.c.result, j.c.last_error)
        .join(repositories, repositories.c.id == j.c.repo_id)
        .where(j.c.last_error.is_not(None))
        .order_by(j.c.updated_at.desc())
        .limit(limit)
    )
    return database.read(query)
