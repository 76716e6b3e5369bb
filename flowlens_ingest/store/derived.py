"""pipeline_runs: each PR's journey, its build and approval statuses derived from stored rows.

status_build and status_approval are rules.py's aggregates evaluated in SQL over
the stored checks and reviews, inside the delivery's transaction, so they never
depend on the order deliveries arrive in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, insert

from flowlens_ingest.events import rules
from flowlens_ingest.events.enums import ApprovalStatus, BuildStatus, ReviewState
from flowlens_ingest.events.rows import PipelineRow
from flowlens_ingest.store.expressions import differs, fields, flag_changed, order_key, param, ranked, repo_id
from flowlens_ingest.store.schema import ci_checks, pipeline_runs, pr_reviews

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


# --- pipeline_runs ------------------------------------------------------------------------------

_PIPELINE_PR = (*fields(PipelineRow, without=("pr_number",)), "digest")


def pipeline_upsert() -> sa.Executable:
    """Upsert a PR's pipeline row from its snapshot, re-deriving the statuses for its head."""
    t = pipeline_runs
    stmt = insert(t).values(
        id=param("id"),
        repo_id=repo_id(),
        pr_number=param("pr_number"),
        status_build=build_status(repo_id(), param("commit_sha")),
        status_approval=approval_status(repo_id(), param("pr_number")),
        **{c: param(c) for c in _PIPELINE_PR},
    )
    ex = stmt.excluded
    new: dict[str, Any] = {c: ex[c] for c in _PIPELINE_PR}
    # A new head sha takes the build status of the checks already seen for it.
    # Built from the bind parameters, not from `excluded`/the target row: Core does
    # not correlate a subquery inside ON CONFLICT DO UPDATE, so it would add
    # `FROM pipeline_runs, pipeline_runs AS excluded` and read every PR's checks.
    new["status_build"] = build_status(repo_id(), param("commit_sha"))
    return stmt.on_conflict_do_update(
        index_elements=[t.c.repo_id, t.c.pr_number],
        set_={**new, **flag_changed(t)},
        where=sa.and_(
            _snapshot_order(ex) >= _snapshot_order(t.c),
            # The digest covers the snapshot's columns; status_build is derived, compared apart.
            differs(t, {"digest": ex.digest, "status_build": new["status_build"]}),
        ),
    )


def _snapshot_order(t: Any) -> sa.Tuple:
    # GitHub sends `opened` and e.g. `labeled` within one second: `opened` is the first
    # event of its second, so on a tie `updated` wins (rules.PR_STATUS_RANK), whatever
    # arrives last.
    return order_key(
        t.pr_updated_at,
        ranked(t.status_merge, rules.MERGE_RANK),
        ranked(t.status_pr, rules.PR_STATUS_RANK),
        digest=t.digest,
    )


def pipeline_if_missing() -> sa.Executable:
    """Create the pipeline row of a PR an event names and we have not seen yet."""
    t = pipeline_runs
    return (
        insert(t)
        .values(
            id=param("id"),
            repo_id=repo_id(),
            pr_number=param("pr_number"),
            commit_sha=param("commit_sha"),
            status_build=build_status(repo_id(), param("commit_sha")),
            status_approval=approval_status(repo_id(), param("pr_number")),
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
            t.c.repo_id == repo_id(),
            which(t),
            sa.or_(t.c.status_build.is_distinct_from(build), t.c.status_approval.is_distinct_from(approval)),
        )
        .values(status_build=build, status_approval=approval, **flag_changed(t))
    )


def refresh_by_head() -> sa.Executable:
    """Re-derive the statuses of the PRs whose head is a commit (`p_head_sha`)."""
    return _refresh(lambda t: t.c.commit_sha == param("head_sha"))


def refresh_by_number() -> sa.Executable:
    """Re-derive the statuses of one PR (`p_pr_number`)."""
    return _refresh(lambda t: t.c.pr_number == param("pr_number"))
