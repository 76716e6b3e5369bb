"""Rows to database: SQLAlchemy Core upserts, one transaction per delivery.

Concurrency. Every delivery about a repository first upserts that repository's
row, and that upsert always writes it. The row is therefore a per-repository
lock taken first, in one fixed order, by every delivery that can change derived
state (status_build from checks, status_approval from reviews):

* Under PostgreSQL's READ COMMITTED, a second delivery waits for the first to
  commit, and each of its later statements sees the first one's rows.
* Under YugabyteDB's snapshot isolation (read committed off), the second
  delivery's write to the same row conflicts and fails with 40001; the retry
  loop in db.transaction runs it again on a fresh snapshot.

Either way the result equals some serial order, with no deadlock possible (one
lock, always first). Deliveries of different repositories never wait for each other.

Order independence. Every upsert carries GitHub's own timestamps and refuses
to go backwards (the `where=` of each ON CONFLICT), and the derived statuses
are recomputed from the stored checks and reviews, never accumulated.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection

from .mappers import Changes, CheckRow, PipelineRow, PullRequestRow, RepositoryRow, ReviewRow
from .schema import ci_checks, pipeline_runs, pr_reviews, pull_requests, repositories, webhook_deliveries

APPLIED = "applied"
IGNORED = "ignored"
STALE = "stale"
FAILED = "failed"
DUPLICATE = "duplicate"

# DESIGN.md's status_build rule.
FAILING_CONCLUSIONS = (
    "failure",
    "timed_out",
    "cancelled",
    "action_required",
    "startup_failure",
    "error",  # commit statuses
)

_NEVER = sa.literal(datetime.min.isoformat() + "+00:00").cast(sa.TIMESTAMP(timezone=True))


class Duplicate(Exception):
    """This delivery was already journaled with a final outcome; the transaction is undone."""


@dataclass(frozen=True)
class Delivery:
    """A verified delivery: its headers and its parsed body."""

    delivery_id: str
    hook_id: int
    event: str
    payload: dict[str, Any]
    payload_sha256: str

    @property
    def action(self) -> str | None:
        """The payload's `action`, where the event has one."""
        action = self.payload.get("action")
        return action if isinstance(action, str) else None

    @property
    def repository_github_id(self) -> int | None:
        """The repository id the payload names, if any (kept even when mapping fails)."""
        repo = self.payload.get("repository")
        rid = repo.get("id") if isinstance(repo, dict) else None
        if isinstance(rid, int) and not isinstance(rid, bool) and -(2**63) <= rid < 2**63:
            return rid
        return None


def _fields(row: Any, *, skip: Iterable[str] = ()) -> dict[str, Any]:
    skipped = set(skip)
    return {k: v for k, v in dataclasses.asdict(row).items() if k not in skipped}


def _changed(table: sa.Table, excluded: Any, columns: Iterable[str]) -> sa.ColumnElement[bool]:
    return sa.or_(*(table.c[c].is_distinct_from(excluded[c]) for c in columns))


def _flag_changed() -> dict[str, Any]:
    """The processing contract's SET clause for an UPDATE of a polled table."""
    return {"processed": sa.false(), "updated_at": sa.func.now()}


# --- derived statuses (recomputed from stored rows, so arrival order does not matter) ---


def build_status(repo_id: Any, head_sha: Any) -> sa.ScalarSelect[str]:
    """status_build of a commit from its stored checks (DESIGN.md's rule)."""
    c = ci_checks.c
    return (
        sa.select(
            sa.case(
                (sa.func.bool_or(c.conclusion.in_(FAILING_CONCLUSIONS)), "failed"),
                (sa.func.bool_or(c.status != "completed"), "running"),
                (sa.func.count() > 0, "passed"),
                else_="pending",
            )
        )
        # GitHub marks runs that never finished as `stale`: they no longer speak for the commit.
        .where(c.repo_id == repo_id, c.head_sha == head_sha, c.conclusion.is_distinct_from("stale"))
        .scalar_subquery()
    )


def approval_status(repo_id: Any, pr_number: Any) -> sa.ScalarSelect[str]:
    """status_approval of a PR from each reviewer's latest verdict."""
    r = pr_reviews.c
    return (
        sa.select(
            sa.case(
                (sa.func.bool_or(r.state == "changes_requested"), "changes_requested"),
                (sa.func.bool_or(r.state == "approved"), "approved"),
                else_="pending",
            )
        )
        .where(r.repo_id == repo_id, r.pr_number == pr_number)
        .scalar_subquery()
    )


# --- statements ---------------------------------------------------------------------


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


def upsert_repository(conn: Connection, row: RepositoryRow) -> uuid.UUID:
    """Upsert by github_id and return the row's id; also takes the repository lock."""
    t = repositories
    values = _fields(row, skip=("deleted",))
    if row.deleted:
        values["deleted_at"] = sa.func.now()
    stmt = insert(t).values(id=uuid.uuid4(), **values)
    ex = stmt.excluded
    # Descriptive columns only move forward in GitHub's repository.updated_at.
    newer = sa.or_(
        t.c.github_updated_at.is_(None),
        sa.func.coalesce(ex.github_updated_at, _NEVER) >= t.c.github_updated_at,
    )
    set_: dict[str, Any] = {c: sa.case((newer, ex[c]), else_=t.c[c]) for c in _REPO_GUARDED}
    set_["github_updated_at"] = sa.func.greatest(t.c.github_updated_at, ex.github_updated_at)
    set_["last_activity"] = sa.func.greatest(t.c.last_activity, ex.last_activity)
    if row.deleted:
        set_["deleted_at"] = sa.func.coalesce(t.c.deleted_at, sa.func.now())
    # Always written, even when nothing changed: this write is the per-repository
    # lock that serializes deliveries (see the module docstring).
    set_["updated_at"] = sa.func.now()
    stmt = stmt.on_conflict_do_update(index_elements=[t.c.github_id], set_=set_).returning(t.c.id)
    return conn.execute(stmt).scalar_one()


_PR_DATA = tuple(
    c.name
    for c in pull_requests.c
    if c.name
    not in ("id", "repo_id", "pr_number", "processed", "version", "created_at", "updated_at")
)


def upsert_pull_request(conn: Connection, repo_id: uuid.UUID, row: PullRequestRow) -> bool:
    """Upsert the PR snapshot unless the stored one is newer; True when a row was written."""
    t = pull_requests
    stmt = insert(t).values(id=uuid.uuid4(), repo_id=repo_id, **_fields(row))
    ex = stmt.excluded
    new = {c: ex[c] for c in _PR_DATA}
    # GitHub's pull_request payloads carry no file list: keep what a sender once gave.
    new["files_changed"] = sa.func.coalesce(ex.files_changed, t.c.files_changed)
    stmt = stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.pr_number],
        set_={**new, **_flag_changed(), "version": t.c.version + 1},
        where=sa.and_(
            sa.func.coalesce(ex.github_updated_at, _NEVER)
            >= sa.func.coalesce(t.c.github_updated_at, _NEVER),
            sa.or_(*(t.c[c].is_distinct_from(v) for c, v in new.items())),
        ),
    ).returning(t.c.id)
    return conn.execute(stmt).first() is not None


_PIPELINE_PR = ("commit_sha", "author", "avatar_url", "title", "status_pr", "status_merge", "pr_updated_at")


def upsert_pipeline(conn: Connection, repo_id: uuid.UUID, row: PipelineRow) -> bool:
    """Upsert a PR's pipeline row from its PR snapshot, re-deriving the statuses for its head."""
    t = pipeline_runs
    values = _fields(row)
    stmt = insert(t).values(
        id=uuid.uuid4(),
        repo_id=repo_id,
        status_build=build_status(repo_id, row.commit_sha),
        status_approval=approval_status(repo_id, row.pr_number),
        **values,
    )
    ex = stmt.excluded
    new = {c: ex[c] for c in _PIPELINE_PR}
    # A new head sha takes the build status of the checks already seen for it.
    new["status_build"] = build_status(t.c.repo_id, ex.commit_sha)
    stmt = stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.pr_number],
        set_={**new, **_flag_changed(), "version": t.c.version + 1},
        where=sa.and_(
            sa.func.coalesce(ex.pr_updated_at, _NEVER) >= sa.func.coalesce(t.c.pr_updated_at, _NEVER),
            sa.or_(*(t.c[c].is_distinct_from(v) for c, v in new.items())),
        ),
    ).returning(t.c.id)
    return conn.execute(stmt).first() is not None


def ensure_pipelines(conn: Connection, repo_id: uuid.UUID, pr_heads: Sequence[tuple[int, str]]) -> None:
    """Create the pipeline rows of PRs an event names and we have not seen yet."""
    if not pr_heads:
        return
    t = pipeline_runs
    rows = [
        {
            "id": uuid.uuid4(),
            "repo_id": repo_id,
            "pr_number": number,
            "commit_sha": sha,
            "status_build": build_status(repo_id, sha),
            "status_approval": approval_status(repo_id, number),
        }
        for number, sha in sorted(set(pr_heads))
    ]
    for row in rows:
        conn.execute(insert(t).values(**row).on_conflict_do_nothing(index_elements=[t.c.repo_id, t.c.pr_number]))


def refresh_statuses(
    conn: Connection, repo_id: uuid.UUID, *, head_shas: Sequence[str] = (), pr_numbers: Sequence[int] = ()
) -> None:
    """Re-derive status_build/status_approval of the PRs at these heads or numbers."""
    if not head_shas and not pr_numbers:
        return
    t = pipeline_runs
    build = build_status(t.c.repo_id, t.c.commit_sha)
    approval = approval_status(t.c.repo_id, t.c.pr_number)
    which = []
    if head_shas:
        which.append(t.c.commit_sha.in_(sorted(set(head_shas))))
    if pr_numbers:
        which.append(t.c.pr_number.in_(sorted(set(pr_numbers))))
    conn.execute(
        sa.update(t)
        .where(
            t.c.repo_id == repo_id,
            sa.or_(*which),
            sa.or_(t.c.status_build.is_distinct_from(build), t.c.status_approval.is_distinct_from(approval)),
        )
        .values(status_build=build, status_approval=approval, version=t.c.version + 1, **_flag_changed())
    )


def upsert_check(conn: Connection, repo_id: uuid.UUID, row: CheckRow) -> bool:
    """Keep the latest state of one check of a commit; True when a row was written."""
    t = ci_checks
    stmt = insert(t).values(id=uuid.uuid4(), repo_id=repo_id, **_fields(row))
    ex = stmt.excluded
    data = [c for c in _fields(row) if c not in ("head_sha", "source", "name")]
    stmt = stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.head_sha, t.c.source, t.c.name],
        set_={**{c: ex[c] for c in data}, "updated_at": sa.func.now()},
        where=sa.and_(
            sa.tuple_(sa.func.coalesce(ex.event_at, _NEVER), ex.rank)
            >= sa.tuple_(sa.func.coalesce(t.c.event_at, _NEVER), t.c.rank),
            _changed(t, ex, data),
        ),
    ).returning(t.c.id)
    return conn.execute(stmt).first() is not None


def upsert_review(conn: Connection, repo_id: uuid.UUID, row: ReviewRow) -> bool:
    """Keep each reviewer's latest verdict (or its dismissal); True when a row was written."""
    t = pr_reviews
    stmt = insert(t).values(id=uuid.uuid4(), repo_id=repo_id, **_fields(row))
    ex = stmt.excluded
    data = [c for c in _fields(row) if c not in ("pr_number", "reviewer")]
    stmt = stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.pr_number, t.c.reviewer],
        set_={**{c: ex[c] for c in data}, "updated_at": sa.func.now()},
        where=sa.and_(
            sa.tuple_(sa.func.coalesce(ex.github_submitted_at, _NEVER), ex.review_id, ex.rank)
            > sa.tuple_(sa.func.coalesce(t.c.github_submitted_at, _NEVER), t.c.review_id, t.c.rank),
        ),
    ).returning(t.c.id)
    return conn.execute(stmt).first() is not None


def journal(conn: Connection, delivery: Delivery, outcome: str, *, error: str | None = None, store_payload: bool = True) -> None:
    """Record the delivery's outcome; raise Duplicate if it already had a final one."""
    t = webhook_deliveries
    keep_payload = store_payload or outcome == FAILED
    stmt = insert(t).values(
        delivery_id=delivery.delivery_id,
        hook_id=delivery.hook_id,
        event=delivery.event,
        action=delivery.action,
        repository_github_id=delivery.repository_github_id,
        payload=delivery.payload if keep_payload else None,
        payload_sha256=delivery.payload_sha256,
        outcome=outcome,
        error=error,
        applied_at=None if outcome == FAILED else sa.func.now(),
    )
    ex = stmt.excluded
    # Only a failed delivery may be taken again: everything else is final.
    stmt = stmt.on_conflict_do_update(
        index_elements=[t.c.delivery_id, t.c.hook_id],
        set_={
            "outcome": ex.outcome,
            "error": ex.error,
            "applied_at": ex.applied_at,
            "payload": sa.func.coalesce(ex.payload, t.c.payload),
            "payload_sha256": ex.payload_sha256,
            "attempts": t.c.attempts + 1,
        },
        where=t.c.outcome == FAILED,
    ).returning(t.c.outcome)
    if conn.execute(stmt).first() is None:
        raise Duplicate(delivery.delivery_id)


# --- one delivery -----------------------------------------------------------------


def apply_changes(conn: Connection, changes: Changes) -> str:
    """Apply a mapped delivery inside the caller's transaction; return applied or stale."""
    if changes.repository is None:
        return IGNORED
    repo_id = upsert_repository(conn, changes.repository)
    wrote: list[bool] = []
    stale = False

    if changes.pull_request is not None:
        written = upsert_pull_request(conn, repo_id, changes.pull_request)
        wrote.append(written)
        stale |= not written and _newer_pr_stored(conn, repo_id, changes.pull_request)
    if changes.pipeline is not None:
        upsert_pipeline(conn, repo_id, changes.pipeline)

    heads = []
    for check in changes.checks:
        written = upsert_check(conn, repo_id, check)
        wrote.append(written)
        heads.append(check.head_sha)
    if changes.checks and not any(wrote):
        stale |= any(_newer_check_stored(conn, repo_id, c) for c in changes.checks)

    numbers = []
    if changes.review is not None:
        written = upsert_review(conn, repo_id, changes.review)
        wrote.append(written)
        numbers.append(changes.review.pr_number)
        stale |= not written and _newer_review_stored(conn, repo_id, changes.review)

    # Checks and reviews first, then missing pipeline rows (born with the right
    # statuses), then the existing rows they touch.
    ensure_pipelines(conn, repo_id, changes.pr_heads)
    refresh_statuses(conn, repo_id, head_shas=heads, pr_numbers=numbers)
    return STALE if stale and not any(wrote) else APPLIED


def _newer_pr_stored(conn: Connection, repo_id: uuid.UUID, row: PullRequestRow) -> bool:
    t = pull_requests
    stored = conn.execute(
        sa.select(t.c.github_updated_at).where(t.c.repo_id == repo_id, t.c.pr_number == row.pr_number)
    ).scalar()
    return stored is not None and row.github_updated_at is not None and stored > row.github_updated_at


def _newer_check_stored(conn: Connection, repo_id: uuid.UUID, row: CheckRow) -> bool:
    t = ci_checks
    stored = conn.execute(
        sa.select(t.c.event_at, t.c.rank).where(
            t.c.repo_id == repo_id, t.c.head_sha == row.head_sha, t.c.source == row.source, t.c.name == row.name
        )
    ).first()
    if stored is None or stored.event_at is None or row.event_at is None:
        return False
    return (stored.event_at, stored.rank) > (row.event_at, row.rank)


def _newer_review_stored(conn: Connection, repo_id: uuid.UUID, row: ReviewRow) -> bool:
    t = pr_reviews
    stored = conn.execute(
        sa.select(t.c.github_submitted_at, t.c.review_id, t.c.rank).where(
            t.c.repo_id == repo_id, t.c.pr_number == row.pr_number, t.c.reviewer == row.reviewer
        )
    ).first()
    if stored is None or stored.github_submitted_at is None or row.github_submitted_at is None:
        return False
    return tuple(stored) > (row.github_submitted_at, row.review_id, row.rank)
