"""What lands where: one SQLAlchemy Core statement per row kind, with its stale guard. No driver here.

Every statement takes its values as named bind parameters (`p_<column>`), so batch.py
compiles it once per process. Later statements find the repository by `github_id`
in a subquery, so no statement needs an earlier one's result in Python, and the
journal's RETURNING, last, tells the delivery's outcome.

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

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY, insert

from . import rules
from .rows import CheckRow, FilesJobRow, PipelineRow, PullRequestRow, ReviewRow, Row
from .schema import ci_checks, files_jobs, pipeline_runs, pr_reviews, pull_requests, repositories, webhook_deliveries
from .values import ApprovalStatus, BuildStatus, FilesStatus, JobState, Outcome, PrStatus, ReviewState

Builder = Callable[[], sa.Executable]
StaleTest = Callable[[], sa.ColumnElement[bool]]

# Older than any GitHub timestamp: what a missing one compares as.
_NEVER = sa.literal(datetime.min.replace(tzinfo=UTC).isoformat()).cast(sa.TIMESTAMP(timezone=True))


def _p(name: str) -> sa.BindParameter[Any]:
    # Prefixed: insert() reserves bare column names for its own VALUES parameters.
    return sa.bindparam(f"p_{name}")


def _repo_id() -> sa.ScalarSelect[Any]:
    """The id of the delivery's repository (upserted by the batch's first statement)."""
    return sa.select(repositories.c.id).where(repositories.c.github_id == _p("repo_github_id")).scalar_subquery()


def _flag_changed(table: sa.Table) -> dict[str, Any]:
    """The processing contract's SET clause for an UPDATE of a polled table."""
    return {"processed": sa.false(), "version": table.c.version + 1, "updated_at": sa.func.now()}


def _differs(table: sa.Table, new: dict[str, Any]) -> sa.ColumnElement[bool]:
    return sa.or_(*(table.c[c].is_distinct_from(v) for c, v in new.items()))


def _fields(row_type: type, *, without: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(row_type) if f.name not in without)


# --- derived statuses (rules.py's aggregates, over the stored rows) ------------------------


def build_status(repo_id: Any, head_sha: Any) -> sa.ScalarSelect[str]:
    """status_build of a commit from its stored checks (rules.build_status in SQL)."""
    c = ci_checks.c
    failing = sa.bindparam("failing_conclusions", list(rules.FAILING_CONCLUSIONS), type_=ARRAY(sa.Text))
    return (
        sa.select(
            sa.case(
                (sa.func.bool_or(c.conclusion == sa.any_(failing)), BuildStatus.FAILED.value),
                (sa.func.bool_or(c.status != rules.COMPLETED), BuildStatus.RUNNING.value),
                (sa.func.count() > 0, BuildStatus.PASSED.value),
                else_=BuildStatus.PENDING.value,
            )
        )
        .where(
            c.repo_id == repo_id,
            c.head_sha == head_sha,
            *(c.conclusion.is_distinct_from(ignored) for ignored in rules.IGNORED_CONCLUSIONS),
        )
        .scalar_subquery()
    )


def approval_status(repo_id: Any, pr_number: Any) -> sa.ScalarSelect[str]:
    """status_approval of a PR from each reviewer's latest verdict (rules.approval_status in SQL)."""
    r = pr_reviews.c
    return (
        sa.select(
            sa.case(
                (
                    sa.func.bool_or(r.state == ReviewState.CHANGES_REQUESTED.value),
                    ApprovalStatus.CHANGES_REQUESTED.value,
                ),
                (sa.func.bool_or(r.state == ReviewState.APPROVED.value), ApprovalStatus.APPROVED.value),
                else_=ApprovalStatus.PENDING.value,
            )
        )
        .where(r.repo_id == repo_id, r.pr_number == pr_number)
        .scalar_subquery()
    )


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
    values: dict[str, Any] = {c: _p(c) for c in _REPO_COLUMNS}
    if deleted:
        values["deleted_at"] = sa.func.now()
    stmt = insert(t).values(id=_p("id"), **values)
    ex = stmt.excluded
    # Descriptive columns only move forward in GitHub's repository.updated_at.
    newer = sa.or_(
        t.c.github_updated_at.is_(None),
        sa.func.coalesce(ex.github_updated_at, _NEVER) >= t.c.github_updated_at,
    )
    set_: dict[str, Any] = {c: sa.case((newer, ex[c]), else_=t.c[c]) for c in _REPO_GUARDED}
    set_["github_updated_at"] = sa.func.greatest(t.c.github_updated_at, ex.github_updated_at)
    set_["last_activity"] = sa.func.greatest(t.c.last_activity, ex.last_activity)
    if deleted:
        set_["deleted_at"] = sa.func.coalesce(t.c.deleted_at, sa.func.now())
    # Always written, even when nothing changed: this write is the per-repository
    # lock that serializes deliveries (see the module docstring).
    set_["updated_at"] = sa.func.now()
    return stmt.on_conflict_do_update(index_elements=[t.c.github_id], set_=set_)


# --- pull_requests ------------------------------------------------------------------------------

_PR_DATA = _fields(PullRequestRow, without=("pr_number",))
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
    values: dict[str, Any] = {c: _p(c) for c in columns}
    values["files_status"] = sa.func.coalesce(_p("files_status"), FilesStatus.PENDING.value)
    stmt = insert(t).values(id=_p("id"), repo_id=_repo_id(), pr_number=_p("pr_number"), **values)
    ex = stmt.excluded
    new: dict[str, Any] = {c: ex[c] for c in columns}
    if with_files:
        # A stored list is never replaced by an empty one.
        keep = sa.and_(sa.func.jsonb_array_length(ex.files_changed) == 0, t.c.files_changed.is_not(None))
        new.update({c: sa.case((keep, t.c[c]), else_=ex[c]) for c in (*_PR_FILES, "files_status")})
    else:
        new["files_status"] = sa.case(
            (t.c.commit_sha.is_distinct_from(ex.commit_sha), FilesStatus.PENDING.value),
            else_=sa.func.coalesce(_p("files_status"), t.c.files_status, FilesStatus.PENDING.value),
        )
    return stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.pr_number],
        set_={**new, **_flag_changed(t)},
        where=sa.and_(
            sa.func.coalesce(ex.github_updated_at, _NEVER) >= sa.func.coalesce(t.c.github_updated_at, _NEVER),
            _differs(t, new),
        ),
    )


def pull_request_stale() -> sa.ColumnElement[bool]:
    """The stored snapshot of the PR is newer than the delivery's."""
    t = pull_requests
    return sa.exists().where(
        t.c.repo_id == _repo_id(),
        t.c.pr_number == _p("pr_number"),
        t.c.github_updated_at > _p("github_updated_at"),
    )


# --- pipeline_runs ------------------------------------------------------------------------------

_PIPELINE_PR = _fields(PipelineRow, without=("pr_number",))


def pipeline_upsert() -> sa.Executable:
    """Upsert a PR's pipeline row from its snapshot, re-deriving the statuses for its head."""
    t = pipeline_runs
    stmt = insert(t).values(
        id=_p("id"),
        repo_id=_repo_id(),
        pr_number=_p("pr_number"),
        status_build=build_status(_repo_id(), _p("commit_sha")),
        status_approval=approval_status(_repo_id(), _p("pr_number")),
        **{c: _p(c) for c in _PIPELINE_PR},
    )
    ex = stmt.excluded
    new: dict[str, Any] = {c: ex[c] for c in _PIPELINE_PR}
    # A new head sha takes the build status of the checks already seen for it.
    # Built from the bind parameters, not from `excluded`/the target row: Core does
    # not correlate a subquery inside ON CONFLICT DO UPDATE, so it would add
    # `FROM pipeline_runs, pipeline_runs AS excluded` and read every PR's checks.
    new["status_build"] = build_status(_repo_id(), _p("commit_sha"))
    # GitHub sends `opened` and e.g. `review_requested` or `labeled` with the same
    # updated_at; `opened` is the first event of that second, so on a tie an
    # `updated` already stored stays (else the last to arrive would decide).
    tie_after_open = sa.and_(t.c.pr_updated_at == ex.pr_updated_at, t.c.status_pr == PrStatus.UPDATED.value)
    new["status_pr"] = sa.case((tie_after_open, PrStatus.UPDATED.value), else_=ex.status_pr)
    return stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.pr_number],
        set_={**new, **_flag_changed(t)},
        where=sa.and_(
            sa.func.coalesce(ex.pr_updated_at, _NEVER) >= sa.func.coalesce(t.c.pr_updated_at, _NEVER),
            _differs(t, new),
        ),
    )


def pipeline_if_missing() -> sa.Executable:
    """Create the pipeline row of a PR an event names and we have not seen yet."""
    t = pipeline_runs
    return (
        insert(t)
        .values(
            id=_p("id"),
            repo_id=_repo_id(),
            pr_number=_p("pr_number"),
            commit_sha=_p("commit_sha"),
            status_build=build_status(_repo_id(), _p("commit_sha")),
            status_approval=approval_status(_repo_id(), _p("pr_number")),
        )
        .on_conflict_do_nothing(index_elements=[t.c.repo_id, t.c.pr_number])
    )


def _refresh(which: Callable[[sa.Table], sa.ColumnElement[bool]]) -> sa.Executable:
    t = pipeline_runs
    build = build_status(t.c.repo_id, t.c.commit_sha)
    approval = approval_status(t.c.repo_id, t.c.pr_number)
    return (
        sa.update(t)
        .where(
            t.c.repo_id == _repo_id(),
            which(t),
            sa.or_(t.c.status_build.is_distinct_from(build), t.c.status_approval.is_distinct_from(approval)),
        )
        .values(status_build=build, status_approval=approval, **_flag_changed(t))
    )


def refresh_by_head() -> sa.Executable:
    """Re-derive the statuses of the PRs whose head is a commit (`p_head_sha`)."""
    return _refresh(lambda t: t.c.commit_sha == _p("head_sha"))


def refresh_by_number() -> sa.Executable:
    """Re-derive the statuses of one PR (`p_pr_number`)."""
    return _refresh(lambda t: t.c.pr_number == _p("pr_number"))


# --- ci_checks ----------------------------------------------------------------------------------

_CHECK_KEY = ("head_sha", "source", "name")
_CHECK_DATA = _fields(CheckRow, without=_CHECK_KEY)


def _check_order(t: Any) -> sa.Tuple:
    return sa.tuple_(sa.func.coalesce(t.event_at, _NEVER), t.rank)


def check_upsert() -> sa.Executable:
    """Keep the latest state of one check of a commit."""
    t = ci_checks
    stmt = insert(t).values(id=_p("id"), repo_id=_repo_id(), **{c: _p(c) for c in (*_CHECK_KEY, *_CHECK_DATA)})
    ex = stmt.excluded
    new = {c: ex[c] for c in _CHECK_DATA}
    return stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.head_sha, t.c.source, t.c.name],
        set_={**new, "updated_at": sa.func.now()},
        where=sa.and_(_check_order(ex) >= _check_order(t.c), _differs(t, new)),
    )


def check_stale() -> sa.ColumnElement[bool]:
    """The stored state of the check is newer than the delivery's."""
    t = ci_checks
    incoming = sa.tuple_(sa.func.coalesce(_p("event_at"), _NEVER), _p("rank"))
    return sa.exists().where(
        t.c.repo_id == _repo_id(),
        *(t.c[c] == _p(c) for c in _CHECK_KEY),
        _check_order(t.c) > incoming,
    )


# --- pr_reviews ---------------------------------------------------------------------------------

_REVIEW_DATA = _fields(ReviewRow, without=("pr_number", "reviewer"))


def _review_order(t: Any) -> sa.Tuple:
    return sa.tuple_(sa.func.coalesce(t.github_submitted_at, _NEVER), t.review_id, t.rank)


def review_upsert() -> sa.Executable:
    """Keep each reviewer's latest verdict (or its dismissal)."""
    t = pr_reviews
    stmt = insert(t).values(
        id=_p("id"),
        repo_id=_repo_id(),
        pr_number=_p("pr_number"),
        reviewer=_p("reviewer"),
        **{c: _p(c) for c in _REVIEW_DATA},
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
    incoming = sa.tuple_(sa.func.coalesce(_p("github_submitted_at"), _NEVER), _p("review_id"), _p("rank"))
    return sa.exists().where(
        t.c.repo_id == _repo_id(),
        t.c.pr_number == _p("pr_number"),
        t.c.reviewer == _p("reviewer"),
        _review_order(t.c) > incoming,
    )


# --- files_jobs: the files worker's queue ---------------------------------------------------------


def files_job_upsert() -> sa.Executable:
    """Ask for a PR head's file list: one job per PR, moved to a newer head, never to an older one."""
    t = files_jobs
    stmt = insert(t).values(
        id=_p("id"),
        repo_id=_repo_id(),
        **{c: _p(c) for c in ("pr_number", "head_sha", "installation_id", "pr_updated_at")},
    )
    ex = stmt.excluded
    incoming, stored = sa.func.coalesce(ex.pr_updated_at, _NEVER), sa.func.coalesce(t.c.pr_updated_at, _NEVER)
    # A burst for one head (opened, labeled, review_requested) is one job; a later head
    # takes the job over; a refetch of the same head needs a strictly newer delivery, so
    # replaying one does not fetch again.
    return stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.pr_number],
        set_={
            "head_sha": ex.head_sha,
            "installation_id": sa.func.coalesce(ex.installation_id, t.c.installation_id),
            "pr_updated_at": ex.pr_updated_at,
            "state": JobState.PENDING.value,
            "attempts": 0,
            "run_after": sa.func.now(),
            "leased_until": sa.null(),
            "lease_token": sa.null(),
            "last_error": sa.null(),
            "updated_at": sa.func.now(),
        },
        where=sa.or_(
            sa.and_(incoming >= stored, t.c.head_sha != ex.head_sha),
            sa.and_(_p("refetch"), incoming > stored),
        ),
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


# --- the journal, last: its RETURNING is the delivery's outcome ----------------------------------

_JOURNAL_COLUMNS = ("delivery_id", "hook_id", "event", "action", "repository_github_id", "payload_sha256", "error")


def journal(stale: StaleTest | None, replay: bool) -> sa.Executable:
    """Journal a delivery: `stale` decides stale vs applied; without it `p_outcome` does.

    Only a failed entry may be taken again, so a redelivery of a settled one
    returns no row (a duplicate); a replay re-applies anything.
    """
    t = webhook_deliveries
    outcome: Any = (
        _p("outcome") if stale is None else sa.case((stale(), Outcome.STALE.value), else_=Outcome.APPLIED.value)
    )
    stmt = insert(t).values(
        **{c: _p(c) for c in _JOURNAL_COLUMNS},
        payload=sa.cast(_p("payload"), postgresql.JSONB),
        outcome=outcome,
        applied_at=sa.case((_p("applied"), sa.func.now()), else_=sa.null()),
    )
    ex = stmt.excluded
    outcome_set: dict[str, Any] = {"outcome": ex.outcome, "applied_at": ex.applied_at}
    if replay:
        # A replay settles a failed entry but keeps any other's first final outcome: a
        # delivery applied back then reads `stale` today only because later ones followed.
        settled = t.c.outcome != Outcome.FAILED.value
        outcome_set = {c: sa.case((settled, t.c[c]), else_=v) for c, v in outcome_set.items()}
    return stmt.on_conflict_do_update(
        index_elements=[t.c.delivery_id, t.c.hook_id],
        set_={
            **outcome_set,
            "error": ex.error,
            "payload": sa.func.coalesce(ex.payload, t.c.payload),
            "payload_sha256": ex.payload_sha256,
            "attempts": t.c.attempts + 1,
        },
        where=None if replay else t.c.outcome == Outcome.FAILED.value,
    ).returning(t.c.outcome)
