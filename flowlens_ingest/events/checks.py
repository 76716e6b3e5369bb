"""CI checks (check runs and suites, workflow runs and jobs, commit statuses): a payload in, rows out. Pure."""

from __future__ import annotations

from typing import Any

from flowlens_ingest.events import rules
from flowlens_ingest.events.enums import CheckSource
from flowlens_ingest.events.readers import (
    MappingError,
    array,
    count,
    integer,
    key,
    latest,
    obj,
    opt_obj,
    text,
    timestamp,
)
from flowlens_ingest.events.repository import require_repository
from flowlens_ingest.events.rows import (
    Changes,
    CheckRow,
)

# --- checks ---------------------------------------------------------------------------


def _pr_heads(items: Any, what: str, repo_id: int, head_sha: str) -> tuple[tuple[int, str], ...]:
    """PR numbers of this repository that an event names (forks' PRs name another base repo)."""
    heads = []
    for entry in array(items, what):
        item = obj(entry, what)
        base_repo = opt_obj(opt_obj(item.get("base"), f"{what}.base").get("repo"), f"{what}.base.repo")
        if base_repo.get("id") not in (None, repo_id):
            continue
        number = count(item.get("number"), f"{what}.number")
        if number is not None:
            heads.append((number, head_sha))
    return tuple(heads)


def _check(
    source: CheckSource,
    name: str,
    obj: dict[str, Any],
    what: str,
    *,
    status: str | None = None,
    conclusion: str | None = None,
    started: str = "started_at",
    completed: str | None = "completed_at",
    updated: str | None = "updated_at",
    url: str = "html_url",
) -> CheckRow:
    status = status if status is not None else key(obj.get("status"), f"{what}.status")
    started_at = timestamp(obj.get(started), f"{what}.{started}")
    completed_at = timestamp(obj.get(completed), f"{what}.{completed}") if completed else None
    updated_at = timestamp(obj.get(updated), f"{what}.{updated}") if updated else None
    created_at = timestamp(obj.get("created_at"), f"{what}.created_at")
    return CheckRow(
        head_sha=key(obj.get("head_sha"), f"{what}.head_sha"),
        source=source,
        name=key(name, f"{what}.name"),
        github_id=integer(obj.get("id"), f"{what}.id"),
        status=status,
        conclusion=conclusion if conclusion is not None else text(obj.get("conclusion"), f"{what}.conclusion"),
        url=text(obj.get(url), f"{what}.{url}"),
        github_started_at=started_at,
        github_completed_at=completed_at,
        github_updated_at=updated_at,
        event_at=latest(started_at, completed_at, updated_at, created_at),
        rank=rules.CHECK_RANK.get(status, 0),
    )


def map_check_run(payload: dict[str, Any]) -> Changes:
    """`check_run`: one check of a commit (the object's status, not the action, decides)."""
    repo = require_repository(payload, "check_run")
    run = obj(payload.get("check_run"), "check_run")
    check = _check(CheckSource.CHECK_RUN, key(run.get("name"), "check_run.name"), run, "check_run", updated=None)
    heads = _pr_heads(run.get("pull_requests"), "check_run.pull_requests", repo.github_id, check.head_sha)
    return Changes(repository=repo, rows=(check,), pr_heads=heads)


def map_check_suite(payload: dict[str, Any]) -> Changes:
    """`check_suite`: the suite of one app for a commit, named after the app."""
    repo = require_repository(payload, "check_suite")
    suite = obj(payload.get("check_suite"), "check_suite")
    app = opt_obj(suite.get("app"), "check_suite.app")
    name = app.get("slug") or app.get("name") or "check_suite"
    # GitHub's schema allows a null status (a suite requested and not yet queued).
    status = text(suite.get("status"), "check_suite.status") or (
        rules.COMPLETED if suite.get("conclusion") else "queued"
    )
    check = _check(
        CheckSource.CHECK_SUITE,
        name,
        suite,
        "check_suite",
        status=status,
        started="created_at",
        completed=None,
        url="url",
    )
    heads = _pr_heads(suite.get("pull_requests"), "check_suite.pull_requests", repo.github_id, check.head_sha)
    return Changes(repository=repo, rows=(check,), pr_heads=heads)


def map_workflow_run(payload: dict[str, Any]) -> Changes:
    """`workflow_run`: one run of a workflow; runs from forks list no PRs and count by head sha."""
    repo = require_repository(payload, "workflow_run")
    run = obj(payload.get("workflow_run"), "workflow_run")
    workflow = opt_obj(payload.get("workflow"), "workflow")
    name = run.get("name") or workflow.get("name") or run.get("path") or "workflow"
    check = _check(CheckSource.WORKFLOW_RUN, name, run, "workflow_run", started="run_started_at", completed=None)
    heads = _pr_heads(run.get("pull_requests"), "workflow_run.pull_requests", repo.github_id, check.head_sha)
    return Changes(repository=repo, rows=(check,), pr_heads=heads)


def map_workflow_job(payload: dict[str, Any]) -> Changes:
    """`workflow_job`: one job of a workflow run, named `workflow / job`."""
    repo = require_repository(payload, "workflow_job")
    job = obj(payload.get("workflow_job"), "workflow_job")
    job_name = key(job.get("name"), "workflow_job.name")
    workflow = text(job.get("workflow_name"), "workflow_job.workflow_name")
    name = f"{workflow} / {job_name}" if workflow else job_name
    check = _check(CheckSource.WORKFLOW_JOB, name, job, "workflow_job", updated=None)
    return Changes(repository=repo, rows=(check,))


def map_status(payload: dict[str, Any]) -> Changes:
    """`status`: a commit status from an external CI, one row per context."""
    repo = require_repository(payload, "status")
    state = key(payload.get("state"), "status.state")
    if state not in ("pending", "success", "failure", "error"):
        raise MappingError("status.state is not pending, success, failure or error")
    status = "pending" if state == "pending" else "completed"
    check = _check(
        CheckSource.STATUS,
        payload.get("context") or "default",
        {**payload, "head_sha": payload.get("sha")},
        "status",
        status=status,
        conclusion=None if state == "pending" else state,
        started="created_at",
        completed=None,
        url="target_url",
    )
    return Changes(repository=repo, rows=(check,))
