"""Rows to database: SQLAlchemy Core upserts, one transaction per delivery, two round trips.

Shape. A delivery becomes a short list of Core statements (repository upsert,
pull request / check / review upsert, pipeline rows, journal). They are built
once per process with named bind parameters, compiled once, and sent together
with their parameters as one multi-statement query that opens the transaction;
the COMMIT (or ROLLBACK) is the second round trip. Later statements find the
repository by `github_id` in a subquery, so no statement needs an earlier one's
result in Python, and the journal's RETURNING, last, tells the outcome.

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
import functools
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

import sqlalchemy as sa
from psycopg2.extensions import adapt
from psycopg2.extras import Json
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.engine import Connection

from .db import run_batch
from .mappers import Changes, CheckRow, ReviewRow
from .schema import ci_checks, pipeline_runs, pr_reviews, pull_requests, repositories, webhook_deliveries

APPLIED = "applied"
IGNORED = "ignored"
STALE = "stale"
FAILED = "failed"
DUPLICATE = "duplicate"

# DESIGN.md's status_build rule; `error` is a commit status's failure.
FAILING_CONCLUSIONS = ["failure", "timed_out", "cancelled", "action_required", "startup_failure", "error"]

_DIALECT = postgresql.psycopg2.dialect()
_NEVER = sa.literal(datetime.min.isoformat() + "+00:00").cast(sa.TIMESTAMP(timezone=True))


class Duplicate(Exception):
    """This delivery was already journaled with a final outcome; the transaction is undone."""


@dataclass(frozen=True)
class Delivery:
    """A verified delivery: its headers, its parsed body and that body's JSON text."""

    delivery_id: str
    hook_id: int
    event: str
    payload: dict[str, Any]
    payload_sha256: str
    # The JSON text as received (the `payload` field of a form body): the journal
    # stores it as is, instead of serializing the parsed payload again.
    payload_json: str | None = None

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


# --- compiled statements ----------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A Core statement compiled once: SQL with %(name)s placeholders and its constant binds."""

    sql: str
    constants: dict[str, Any]

    def bind(self, **params: Any) -> tuple[str, dict[str, Any]]:
        """This statement with its parameters, ready for the batch."""
        return self.sql, {**self.constants, **params}


def _template(build: Callable[[], sa.Executable]) -> Callable[[], Template]:
    """Compile a statement builder once per process, on first use.

    Constants of the statement (the status names of a CASE, `version + 1`, the
    failing conclusions) are written into its SQL as literals, exactly as psycopg2
    would quote them, instead of being quoted again as parameters on every delivery.
    """

    @functools.cache
    def compiled() -> Template:
        stmt = build().compile(dialect=_DIALECT)
        sql, constants = str(stmt), {}
        for name, value in stmt.params.items():
            if value is None:
                continue
            literal = _literal(value)
            if literal is None:
                constants[name] = value
            else:
                sql = sql.replace(f"%({name})s", literal.replace("%", "%%"))
        return Template(sql, constants)

    return compiled


def _literal(value: Any) -> str | None:
    """`value` as an SQL literal, for the plain types whose quoting needs no connection."""
    plain = value if isinstance(value, list) else [value]
    if not all(isinstance(v, (bool, int)) or (isinstance(v, str) and v.isascii() and "\\" not in v) for v in plain):
        return None
    return adapt(value).getquoted().decode("ascii")


def _p(name: str) -> sa.BindParameter[Any]:
    # Prefixed: insert() reserves bare column names for its own VALUES parameters.
    return sa.bindparam(f"p_{name}")


def _params(row: Any, **extra: Any) -> dict[str, Any]:
    # Shallow on purpose: dataclasses.asdict deep-copies every label and file list.
    values = {f.name: getattr(row, f.name) for f in dataclasses.fields(row)}
    return {f"p_{k}": _adapt(v) for k, v in {**values, **extra}.items()}


def _adapt(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return Json(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _repo_id() -> sa.ScalarSelect[Any]:
    """The id of the delivery's repository (upserted by the batch's first statement)."""
    return (
        sa.select(repositories.c.id).where(repositories.c.github_id == _p("repo_github_id")).scalar_subquery()
    )


def _flag_changed(table: sa.Table) -> dict[str, Any]:
    """The processing contract's SET clause for an UPDATE of a polled table."""
    return {"processed": sa.false(), "version": table.c.version + 1, "updated_at": sa.func.now()}


def _differs(table: sa.Table, new: dict[str, Any]) -> sa.ColumnElement[bool]:
    return sa.or_(*(table.c[c].is_distinct_from(v) for c, v in new.items()))


# --- derived statuses (recomputed from stored rows, so arrival order does not matter) ---


def build_status(repo_id: Any, head_sha: Any) -> sa.ScalarSelect[str]:
    """status_build of a commit from its stored checks (DESIGN.md's rule)."""
    c = ci_checks.c
    failing = sa.bindparam("failing_conclusions", FAILING_CONCLUSIONS, type_=ARRAY(sa.Text))
    return (
        sa.select(
            sa.case(
                (sa.func.bool_or(c.conclusion == sa.any_(failing)), "failed"),
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


# --- statements -------------------------------------------------------------------------

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


def _repository_upsert(deleted: bool) -> sa.Executable:
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


REPOSITORY = _template(lambda: _repository_upsert(deleted=False))
REPOSITORY_DELETED = _template(lambda: _repository_upsert(deleted=True))

_PR_DATA = tuple(
    c.name
    for c in pull_requests.c
    if c.name not in ("id", "repo_id", "pr_number", "processed", "version", "created_at", "updated_at")
)


@_template
def PULL_REQUEST() -> sa.Executable:
    """Upsert a PR snapshot unless the stored one is newer."""
    t = pull_requests
    stmt = insert(t).values(
        id=_p("id"), repo_id=_repo_id(), pr_number=_p("pr_number"), **{c: _p(c) for c in _PR_DATA}
    )
    ex = stmt.excluded
    new = {c: ex[c] for c in _PR_DATA}
    # GitHub's pull_request payloads carry no file list: keep what a sender once gave.
    new["files_changed"] = sa.func.coalesce(ex.files_changed, t.c.files_changed)
    return stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.pr_number],
        set_={**new, **_flag_changed(t)},
        where=sa.and_(
            sa.func.coalesce(ex.github_updated_at, _NEVER) >= sa.func.coalesce(t.c.github_updated_at, _NEVER),
            _differs(t, new),
        ),
    )


_PIPELINE_PR = ("commit_sha", "author", "avatar_url", "title", "status_pr", "status_merge", "pr_updated_at")


@_template
def PIPELINE() -> sa.Executable:
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
    new = {c: ex[c] for c in _PIPELINE_PR}
    # A new head sha takes the build status of the checks already seen for it.
    # Built from the bind parameters, not from `excluded`/the target row: Core does
    # not correlate a subquery inside ON CONFLICT DO UPDATE, so it would add
    # `FROM pipeline_runs, pipeline_runs AS excluded` and read every PR's checks.
    new["status_build"] = build_status(_repo_id(), _p("commit_sha"))
    # GitHub sends `opened` and e.g. `review_requested` or `labeled` with the same
    # updated_at; `opened` is the first event of that second, so on a tie an
    # `updated` already stored stays (else the last to arrive would decide).
    tie_after_open = sa.and_(t.c.pr_updated_at == ex.pr_updated_at, t.c.status_pr == "updated")
    new["status_pr"] = sa.case((tie_after_open, "updated"), else_=ex.status_pr)
    return stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.pr_number],
        set_={**new, **_flag_changed(t)},
        where=sa.and_(
            sa.func.coalesce(ex.pr_updated_at, _NEVER) >= sa.func.coalesce(t.c.pr_updated_at, _NEVER),
            _differs(t, new),
        ),
    )


@_template
def PIPELINE_IF_MISSING() -> sa.Executable:
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


# Re-derive the statuses of the PRs whose head is a commit, or of one PR.
REFRESH_BY_HEAD = _template(lambda: _refresh(lambda t: t.c.commit_sha == _p("head_sha")))
REFRESH_BY_NUMBER = _template(lambda: _refresh(lambda t: t.c.pr_number == _p("pr_number")))

_CHECK_KEY = ("head_sha", "source", "name")
_CHECK_DATA = tuple(f.name for f in dataclasses.fields(CheckRow) if f.name not in _CHECK_KEY)


def _check_order(t: Any) -> sa.Tuple:
    return sa.tuple_(sa.func.coalesce(t.event_at, _NEVER), t.rank)


@_template
def CHECK() -> sa.Executable:
    """Keep the latest state of one check of a commit."""
    t = ci_checks
    stmt = insert(t).values(
        id=_p("id"), repo_id=_repo_id(), **{c: _p(c) for c in (*_CHECK_KEY, *_CHECK_DATA)}
    )
    ex = stmt.excluded
    new = {c: ex[c] for c in _CHECK_DATA}
    return stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.head_sha, t.c.source, t.c.name],
        set_={**new, "updated_at": sa.func.now()},
        where=sa.and_(_check_order(ex) >= _check_order(t.c), _differs(t, new)),
    )


_REVIEW_DATA = tuple(f.name for f in dataclasses.fields(ReviewRow) if f.name not in ("pr_number", "reviewer"))


def _review_order(t: Any) -> sa.Tuple:
    return sa.tuple_(sa.func.coalesce(t.github_submitted_at, _NEVER), t.review_id, t.rank)


@_template
def REVIEW() -> sa.Executable:
    """Keep each reviewer's latest verdict (or its dismissal)."""
    t = pr_reviews
    stmt = insert(t).values(
        id=_p("id"), repo_id=_repo_id(), pr_number=_p("pr_number"), reviewer=_p("reviewer"),
        **{c: _p(c) for c in _REVIEW_DATA},
    )
    ex = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.pr_number, t.c.reviewer],
        set_={**{c: ex[c] for c in _REVIEW_DATA}, "updated_at": sa.func.now()},
        where=_review_order(ex) > _review_order(t.c),
    )


# --- the journal, last: its RETURNING is the delivery's outcome ----------------------------


def _stale_pull_request() -> sa.ColumnElement[bool]:
    t = pull_requests
    return sa.exists().where(
        t.c.repo_id == _repo_id(),
        t.c.pr_number == _p("pr_number"),
        t.c.github_updated_at > _p("github_updated_at"),
    )


def _stale_check() -> sa.ColumnElement[bool]:
    t = ci_checks
    incoming = sa.tuple_(sa.func.coalesce(_p("event_at"), _NEVER), _p("rank"))
    return sa.exists().where(
        t.c.repo_id == _repo_id(),
        *(t.c[c] == _p(c) for c in _CHECK_KEY),
        _check_order(t.c) > incoming,
    )


def _stale_review() -> sa.ColumnElement[bool]:
    t = pr_reviews
    incoming = sa.tuple_(sa.func.coalesce(_p("github_submitted_at"), _NEVER), _p("review_id"), _p("rank"))
    return sa.exists().where(
        t.c.repo_id == _repo_id(),
        t.c.pr_number == _p("pr_number"),
        t.c.reviewer == _p("reviewer"),
        _review_order(t.c) > incoming,
    )


_JOURNAL_COLUMNS = ("delivery_id", "hook_id", "event", "action", "repository_github_id", "payload_sha256", "error")


def _journal(stale: Callable[[], sa.ColumnElement[bool]] | None, *, replay: bool = False) -> sa.Executable:
    t = webhook_deliveries
    # The delivery is stale when what is stored is newer than what it carried.
    outcome: Any = _p("outcome") if stale is None else sa.case((stale(), STALE), else_=APPLIED)
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
        settled = t.c.outcome != FAILED
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
        # Only a failed delivery may be taken again; a replay re-applies anything.
        where=None if replay else t.c.outcome == FAILED,
    ).returning(t.c.outcome)


_STALE_CHECKS = {"plain": None, "pull_request": _stale_pull_request, "check": _stale_check, "review": _stale_review}
JOURNAL = {kind: _template(functools.partial(_journal, check)) for kind, check in _STALE_CHECKS.items()}
JOURNAL_REPLAY = {
    kind: _template(functools.partial(_journal, check, replay=True)) for kind, check in _STALE_CHECKS.items()
}


# --- one delivery -----------------------------------------------------------------------


Statement = tuple[str, dict[str, Any]]


def plan(changes: Changes) -> tuple[list[Statement], str, dict[str, Any]]:
    """The statements that apply `changes`, and the journal kind and parameters for its outcome."""
    repo = changes.repository
    if repo is None:
        return [], "plain", {"p_outcome": IGNORED}
    rid = {"p_repo_github_id": repo.github_id}
    statements = [
        (REPOSITORY_DELETED if repo.deleted else REPOSITORY)().bind(**_params(repo, id=uuid.uuid4()))
    ]
    kind, stale_params = "plain", {"p_outcome": APPLIED}
    if changes.pull_request is not None:
        statements.append(PULL_REQUEST().bind(**_params(changes.pull_request, id=uuid.uuid4()), **rid))
        kind = "pull_request"
        stale_params = {
            "p_pr_number": changes.pull_request.pr_number,
            "p_github_updated_at": changes.pull_request.github_updated_at,
        }
    if changes.pipeline is not None:
        statements.append(PIPELINE().bind(**_params(changes.pipeline, id=uuid.uuid4()), **rid))
    for check in changes.checks:
        statements.append(CHECK().bind(**_params(check, id=uuid.uuid4()), **rid))
    if changes.checks:
        kind, stale_params = "check", _params(changes.checks[0])
    if changes.review is not None:
        statements.append(REVIEW().bind(**_params(changes.review, id=uuid.uuid4()), **rid))
        kind, stale_params = "review", _params(changes.review)
    # Checks and reviews first, then missing pipeline rows (born with the right
    # statuses), then the existing rows they touch.
    for number, sha in sorted(set(changes.pr_heads)):
        statements.append(
            PIPELINE_IF_MISSING().bind(p_id=str(uuid.uuid4()), p_pr_number=number, p_commit_sha=sha, **rid)
        )
    for sha in sorted({c.head_sha for c in changes.checks}):
        statements.append(REFRESH_BY_HEAD().bind(p_head_sha=sha, **rid))
    if changes.review is not None:
        statements.append(REFRESH_BY_NUMBER().bind(p_pr_number=changes.review.pr_number, **rid))
    return statements, kind, {**stale_params, **rid}


def journal_statement(
    delivery: Delivery,
    kind: str,
    params: dict[str, Any],
    *,
    outcome: str = APPLIED,
    error: str | None = None,
    store_payload: bool = True,
    replay: bool = False,
) -> Statement:
    """The journal upsert of one delivery; its RETURNING gives the final outcome."""
    keep_payload = store_payload or outcome == FAILED
    payload = None
    if keep_payload:
        payload = delivery.payload_json if delivery.payload_json is not None else json.dumps(delivery.payload)
    return (JOURNAL_REPLAY if replay else JOURNAL)[kind]().bind(
        **{"p_outcome": outcome, **params},
        p_delivery_id=delivery.delivery_id,
        p_hook_id=delivery.hook_id,
        p_event=delivery.event,
        p_action=delivery.action,
        p_repository_github_id=delivery.repository_github_id,
        p_payload_sha256=delivery.payload_sha256,
        p_payload=payload,
        p_error=error,
        p_applied=outcome != FAILED,
    )


def apply_delivery(
    conn: Connection, delivery: Delivery, changes: Changes, *, store_payload: bool = True, replay: bool = False
) -> str:
    """Apply and journal one delivery in the caller's transaction; return its outcome.

    Raises Duplicate (after rolling back) when the journal already holds a final outcome.
    """
    statements, kind, params = plan(changes)
    statements.append(journal_statement(delivery, kind, params, store_payload=store_payload, replay=replay))
    row = run_batch(conn, statements)
    if row is None:
        raise Duplicate(delivery.delivery_id)
    return row[0]


def record_failure(conn: Connection, delivery: Delivery, error: str) -> str:
    """Journal a delivery that could not be applied, payload kept for a replay."""
    row = run_batch(conn, [journal_statement(delivery, "plain", {}, outcome=FAILED, error=error)])
    if row is None:
        raise Duplicate(delivery.delivery_id)
    return FAILED
