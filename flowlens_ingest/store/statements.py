"""What lands where: one SQLAlchemy Core statement per row kind, with its stale guard. No driver here.

Every statement takes its values as named bind parameters (`p_<column>`, expressions.py),
so wire.py compiles it once per process. Later statements find the repository by
`github_id` in a subquery, so no statement needs an earlier one's result in
Python, and the journal's RETURNING (journal.py), last, tells the delivery's
outcome. The pipeline_runs statements, derived from the stored rows, are in derived.py.

Concurrency. Every delivery about a repository first upserts that repository's
row, and that upsert always writes it. The row is therefore a per-repository
lock taken first, in one fixed order, by every delivery that can change derived
state (status_build from checks, status_approval from reviews):

* Under PostgreSQL's READ COMMITTED, a second delivery waits for the first to
  commit, and each of its later statements sees the first one's rows.
* Under YugabyteDB's snapshot isolation (read committed off), the second
  delivery's write to the same row conflicts and fails with 40001; the retry
  loop in database.py runs it again on a fresh snapshot.

Either way the result equals some serial order, with no deadlock possible (one
lock, always first). Deliveries of different repositories never wait for each other.

Order independence. Every upsert carries GitHub's own timestamps and refuses
to go backwards (the `where=` of each ON CONFLICT), and the derived statuses
are recomputed from the stored checks and reviews (rules.py), never accumulated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from flowlens_ingest.events import rules
from flowlens_ingest.events.enums import FilesStatus, JobState
from flowlens_ingest.events.rows import CheckRow, FilesJobRow, PipelineRow, PullRequestRow, ReviewRow, Row
from flowlens_ingest.store.derived import pipeline_upsert, refresh_by_head, refresh_by_number
from flowlens_ingest.store.expressions import (
    NEVER,
    Builder,
    StaleTest,
    differs,
    fields,
    flag_changed,
    order_key,
    param,
    ranked,
    repo_id,
)
from flowlens_ingest.store.schema import ci_checks, files_jobs, pr_reviews, pull_requests, repositories

# --- repositories: the first statement of every delivery -------------------------------------

_REPO_GUARDED = (
    "name",
    "full_name",
    "owner",
    "owner_avatar_url",
    "description",
    "is_private",
    "default_branch",
    "html_url",
    "language",
    "stars",
    "forks",
    "is_archived",
    "github_created_at",
)
_REPO_COLUMNS = (*_REPO_GUARDED, "github_id", "last_activity", "github_updated_at")


def repository_upsert(deleted: bool) -> sa.Executable:
    """Upsert the delivery's repository; always writes it (the per-repository lock)."""
    t = repositories
    values: dict[str, Any] = {c: param(c) for c in (*_REPO_COLUMNS, "digest")}
    if deleted:
        values["deleted_at"] = sa.func.now()
    stmt = insert(t).values(id=param("id"), **values)
    ex = stmt.excluded
    # Descriptive columns come from the greatest snapshot: GitHub's repository.updated_at,
    # then the content digest (sql.order_key).
    newer = order_key(ex.github_updated_at, digest=ex.digest) >= order_key(t.c.github_updated_at, digest=t.c.digest)
    set_: dict[str, Any] = {c: sa.case((newer, ex[c]), else_=t.c[c]) for c in (*_REPO_GUARDED, "digest")}
    set_["github_updated_at"] = sa.func.greatest(t.c.github_updated_at, ex.github_updated_at)
    set_["last_activity"] = sa.func.greatest(t.c.last_activity, ex.last_activity)
    if deleted:
        set_["deleted_at"] = sa.func.coalesce(t.c.deleted_at, sa.func.now())
    # Always written, even when nothing changed: this write is the per-repository
    # lock that serializes deliveries (see the module docstring). The row's own time
    # moves only with its content, so a delivery re-applied (a duplicate, a replay)
    # leaves the row as it was.
    set_["updated_at"] = sa.case((differs(t, set_), sa.func.now()), else_=t.c.updated_at)
    return stmt.on_conflict_do_update(index_elements=[t.c.github_id], set_=set_)


# --- pull_requests ------------------------------------------------------------------------------

_PR_DATA = fields(PullRequestRow, without=("pr_number",))
_PR_FILES = ("files_changed", "files_changed_sha")


def pull_request_upsert(with_files: bool) -> sa.Executable:
    """Upsert a PR snapshot unless the stored one is newer.

    Only a snapshot that carries a file list (`with_files`) writes the list: the
    columns are not even in the other variant's SET, so a large list is not
    rewritten and compared on every delivery. When the head moves, the list of
    the new head is `pending` until the files worker settles it.
    """
    t = pull_requests
    columns = _PR_DATA if with_files else tuple(c for c in _PR_DATA if c not in _PR_FILES)
    values: dict[str, Any] = {c: param(c) for c in (*columns, "digest")}
    values["files_status"] = sa.func.coalesce(param("files_status"), FilesStatus.PENDING.value)
    stmt = insert(t).values(id=param("id"), repo_id=repo_id(), pr_number=param("pr_number"), **values)
    ex = stmt.excluded
    new: dict[str, Any] = {c: ex[c] for c in (*columns, "digest")}
    if with_files:
        # A stored list is never replaced by an empty one.
        keep = sa.and_(sa.func.jsonb_array_length(ex.files_changed) == 0, t.c.files_changed.is_not(None))
        new.update({c: sa.case((keep, t.c[c]), else_=ex[c]) for c in (*_PR_FILES, "files_status")})
    else:
        new["files_status"] = sa.case(
            (t.c.commit_sha.is_distinct_from(ex.commit_sha), FilesStatus.PENDING.value),
            else_=sa.func.coalesce(param("files_status"), t.c.files_status, FilesStatus.PENDING.value),
        )
    return stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.pr_number],
        set_={**new, **flag_changed(t)},
        # The digest covers every column of the snapshot: comparing it is comparing them all.
        where=sa.and_(
            _pr_order(ex) >= _pr_order(t.c), differs(t, {"digest": ex.digest, "files_status": new["files_status"]})
        ),
    )


def _pr_order(t: Any) -> sa.Tuple:
    return order_key(t.github_updated_at, ranked(t.state, rules.STATE_RANK), digest=t.digest)


def pull_request_stale() -> sa.ColumnElement[bool]:
    """The stored snapshot of the PR is greater than the delivery's."""
    t = pull_requests
    incoming = order_key(param("github_updated_at"), ranked(param("state"), rules.STATE_RANK), digest=param("digest"))
    return sa.exists().where(
        t.c.repo_id == repo_id(),
        t.c.pr_number == param("pr_number"),
        _pr_order(t.c) > incoming,
    )


# --- ci_checks ----------------------------------------------------------------------------------

_CHECK_KEY = ("head_sha", "source", "name")
_CHECK_DATA = (*fields(CheckRow, without=_CHECK_KEY), "digest")


def _check_order(t: Any) -> sa.Tuple:
    return order_key(t.event_at, t.rank, digest=t.digest)


def check_upsert() -> sa.Executable:
    """Keep the latest state of one check of a commit."""
    t = ci_checks
    stmt = insert(t).values(id=param("id"), repo_id=repo_id(), **{c: param(c) for c in (*_CHECK_KEY, *_CHECK_DATA)})
    ex = stmt.excluded
    new = {c: ex[c] for c in _CHECK_DATA}
    return stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.head_sha, t.c.source, t.c.name],
        set_={**new, "updated_at": sa.func.now()},
        where=sa.and_(_check_order(ex) >= _check_order(t.c), differs(t, {"digest": ex.digest})),
    )


def check_stale() -> sa.ColumnElement[bool]:
    """The stored state of the check is newer than the delivery's."""
    t = ci_checks
    incoming = order_key(param("event_at"), param("rank"), digest=param("digest"))
    return sa.exists().where(
        t.c.repo_id == repo_id(),
        *(t.c[c] == param(c) for c in _CHECK_KEY),
        _check_order(t.c) > incoming,
    )


# --- pr_reviews ---------------------------------------------------------------------------------

_REVIEW_DATA = (*fields(ReviewRow, without=("pr_number", "reviewer")), "digest")


def _review_order(t: Any) -> sa.Tuple:
    return order_key(t.github_submitted_at, t.review_id, t.rank, digest=t.digest)


def review_upsert() -> sa.Executable:
    """Keep each reviewer's latest verdict (or its dismissal)."""
    t = pr_reviews
    stmt = insert(t).values(
        id=param("id"),
        repo_id=repo_id(),
        pr_number=param("pr_number"),
        reviewer=param("reviewer"),
        **{c: param(c) for c in _REVIEW_DATA},
    )
    ex = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.pr_number, t.c.reviewer],
        set_={**{c: ex[c] for c in _REVIEW_DATA}, "updated_at": sa.func.now()},
        where=_review_order(ex) > _review_order(t.c),
    )


def review_stale() -> sa.ColumnElement[bool]:
    """The reviewer's stored verdict is newer than the delivery's."""
    t = pr_reviews
    incoming = order_key(param("github_submitted_at"), param("review_id"), param("rank"), digest=param("digest"))
    return sa.exists().where(
        t.c.repo_id == repo_id(),
        t.c.pr_number == param("pr_number"),
        t.c.reviewer == param("reviewer"),
        _review_order(t.c) > incoming,
    )


# --- files_jobs: the files worker's queue ---------------------------------------------------------


def files_job_upsert() -> sa.Executable:
    """Ask for a PR head's file list: one job per PR, for the head its pull_requests row holds.

    Runs after the PR's own upsert in the same batch: the job takes the head that upsert left
    (its order decided which snapshot is current, stale ones changing nothing), so the job and
    the row never disagree on the head, however deliveries of one second tie or arrive.
    """
    t = files_jobs
    pr = pull_requests
    current_head = (
        sa.select(pr.c.commit_sha).where(pr.c.repo_id == repo_id(), pr.c.pr_number == param("pr_number"))
    ).scalar_subquery()
    stmt = insert(t).values(
        id=param("id"),
        repo_id=repo_id(),
        head_sha=sa.func.coalesce(current_head, param("head_sha")),
        **{c: param(c) for c in ("pr_number", "installation_id", "pr_updated_at")},
    )
    ex = stmt.excluded
    incoming, stored = sa.func.coalesce(ex.pr_updated_at, NEVER), sa.func.coalesce(t.c.pr_updated_at, NEVER)
    # A burst for one head (opened, labeled, review_requested) is one job; the row's head moving
    # moves the job. A refetch of the same head needs a delivery newer than any seen, so
    # replaying one does not fetch again.
    head_moves = t.c.head_sha != ex.head_sha
    reset = sa.or_(head_moves, sa.and_(param("refetch"), incoming > stored))
    fresh: dict[str, Any] = {
        "state": sa.literal(JobState.PENDING.value),
        "attempts": sa.literal(0),
        "run_after": sa.func.now(),
        "leased_until": sa.null(),
        "lease_token": sa.null(),
        "last_error": sa.null(),
    }
    merged = {
        # The installation of the newest delivery that names one: a repository moved to another
        # installation (transferred between organisations) is read through its new one.
        "installation_id": sa.case(
            (sa.and_(ex.installation_id.is_not(None), incoming >= stored), ex.installation_id),
            else_=t.c.installation_id,
        ),
        "pr_updated_at": sa.func.greatest(t.c.pr_updated_at, ex.pr_updated_at),
    }
    return stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.pr_number],
        set_={
            "head_sha": sa.case((head_moves, ex.head_sha), else_=t.c.head_sha),
            **merged,
            **{c: sa.case((reset, v), else_=t.c[c]) for c, v in fresh.items()},
            "updated_at": sa.func.now(),
        },
        where=sa.or_(reset, differs(t, merged)),
    )


# --- the row kinds: one declaration each, read by plan.py --------------------------------------


@dataclass(frozen=True)
class RowKind:
    """How one row type lands: its upsert, the journal's stale test, and the derived rows it refreshes."""

    upsert: Callable[..., sa.Executable]
    # The upsert builder's arguments for a row, when the statement has variants.
    variant: Callable[[Any], tuple[Any, ...]] = lambda row: ()
    # True when what is stored is newer than the row (the delivery is then `stale`).
    stale: StaleTest | None = None
    # A statement to run once per distinct key after all rows, and that key's parameters.
    refresh: Callable[[Any], tuple[Builder, dict[str, Any]]] | None = None


KINDS: dict[type[Row], RowKind] = {
    PullRequestRow: RowKind(
        pull_request_upsert, stale=pull_request_stale, variant=lambda r: (r.files_changed is not None,)
    ),
    PipelineRow: RowKind(pipeline_upsert),
    CheckRow: RowKind(check_upsert, stale=check_stale, refresh=lambda r: (refresh_by_head, {"head_sha": r.head_sha})),
    ReviewRow: RowKind(
        review_upsert, stale=review_stale, refresh=lambda r: (refresh_by_number, {"pr_number": r.pr_number})
    ),
    FilesJobRow: RowKind(files_job_upsert),
}
