"""Pure mappers: a GitHub payload in, plain rows out. No Flask, no SQL, no clock, no I/O.

Every rule about *what* a payload means lives here (and in rules.py); statements.py
decides only *how* the rows land. A payload shape nobody expected raises
MappingError, which the service journals as a failed, replayable delivery.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowlens_ingest.events import rules
from flowlens_ingest.events.enums import CheckSource, FilesStatus, PrState, ReviewState
from flowlens_ingest.events.readers import (
    MappingError,
    array,
    boolean,
    count,
    ident,
    indexed,
    integer,
    key,
    latest,
    login,
    number_key,
    obj,
    opt_obj,
    people,
    text,
    timestamp,
)
from flowlens_ingest.events.rows import (
    Changes,
    CheckRow,
    FilesJobRow,
    PipelineRow,
    PullRequestRow,
    RepositoryRow,
    ReviewRow,
    Row,
)

__all__ = ["KNOWN_EVENTS", "MAPPERS", "Changes", "MappingError", "map_delivery"]


# --- repository ----------------------------------------------------------------


def map_repository(payload: dict[str, Any], *, deleted: bool = False) -> RepositoryRow | None:
    """The `repository` object every repository-scoped delivery carries."""
    repo = payload.get("repository")
    if repo is None:
        return None
    repo = obj(repo, "repository")
    owner, owner_avatar = login(repo.get("owner"), "repository.owner")
    name = key(repo.get("name"), "repository.name")
    return RepositoryRow(
        github_id=ident(repo.get("id"), "repository.id"),
        name=name,
        full_name=key(repo.get("full_name") or f"{owner}/{name}", "repository.full_name"),
        owner=owner,
        owner_avatar_url=owner_avatar,
        description=text(repo.get("description"), "repository.description"),
        is_private=boolean(repo.get("private"), "repository.private"),
        default_branch=text(repo.get("default_branch"), "repository.default_branch"),
        html_url=text(repo.get("html_url"), "repository.html_url"),
        language=text(repo.get("language"), "repository.language"),
        stars=count(repo.get("stargazers_count"), "repository.stargazers_count"),
        forks=count(repo.get("forks_count"), "repository.forks_count"),
        is_archived=boolean(repo.get("archived"), "repository.archived"),
        last_activity=timestamp(repo.get("pushed_at"), "repository.pushed_at"),
        github_created_at=timestamp(repo.get("created_at"), "repository.created_at"),
        github_updated_at=timestamp(repo.get("updated_at"), "repository.updated_at"),
        deleted=deleted,
    )


def _require_repository(payload: dict[str, Any], event: str) -> RepositoryRow:
    repo = map_repository(payload)
    if repo is None:
        raise MappingError(f"{event} payload has no repository")
    return repo


# --- pull_request ----------------------------------------------------------------


def pr_state(pr: dict[str, Any]) -> PrState:
    """open | closed | merged, from the PR object itself rather than the action name."""
    if pr.get("merged") or pr.get("merged_at"):
        return PrState.MERGED
    state = text(pr.get("state"), "pull_request.state")
    if state not in (PrState.OPEN, PrState.CLOSED):
        raise MappingError("pull_request.state is neither open nor closed")
    return PrState(state)


def _files_changed(payload: dict[str, Any], pr: dict[str, Any]) -> list[Any] | None:
    for where, holder in (("files_changed", payload), ("pull_request.files_changed", pr)):
        if "files_changed" in holder and holder["files_changed"] is not None:
            files = holder["files_changed"]
            if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
                raise MappingError(f"{where} is not an array of objects")
            return files
    return None


def map_pull_request(payload: dict[str, Any]) -> Changes:
    """`pull_request`, any action: the payload carries the whole PR snapshot."""
    repo = _require_repository(payload, "pull_request")
    pr = obj(payload.get("pull_request"), "pull_request")
    number = number_key(pr.get("number", payload.get("number")), "pull_request.number")
    head = opt_obj(pr.get("head"), "pull_request.head")
    base = opt_obj(pr.get("base"), "pull_request.base")
    author, avatar = login(pr.get("user"), "pull_request.user")
    state = pr_state(pr)
    updated_at = timestamp(pr.get("updated_at"), "pull_request.updated_at")
    title = text(pr.get("title"), "pull_request.title")
    sha = indexed(head.get("sha"), "pull_request.head.sha")
    labels = [
        {"name": text(obj(label, "label").get("name"), "label.name"), "color": label.get("color")}
        for label in array(pr.get("labels"), "pull_request.labels")
    ]
    reviewers = people(pr.get("requested_reviewers"), "pull_request.requested_reviewers")
    reviewers += [
        {"team": text(obj(team, "team").get("slug") or team.get("name"), "team.slug")}
        for team in array(pr.get("requested_teams"), "pull_request.requested_teams")
    ]
    files = _files_changed(payload, pr)
    row = PullRequestRow(
        pr_number=number,
        github_id=integer(pr.get("id"), "pull_request.id"),
        title=title,
        description=text(pr.get("body"), "pull_request.body"),
        author=author,
        author_avatar=avatar,
        commit_sha=sha,
        branch_name=text(head.get("ref"), "pull_request.head.ref"),
        base_branch=text(base.get("ref"), "pull_request.base.ref"),
        pr_url=text(pr.get("html_url"), "pull_request.html_url"),
        files_changed=files,
        files_changed_sha=sha if files is not None else None,
        # The list of a new head is `pending` until the files worker settles it (statements.py).
        files_status=FilesStatus.FETCHED if files is not None else None,
        additions=count(pr.get("additions"), "pull_request.additions"),
        deletions=count(pr.get("deletions"), "pull_request.deletions"),
        changed_files=count(pr.get("changed_files"), "pull_request.changed_files"),
        commits_count=count(pr.get("commits"), "pull_request.commits"),
        labels=labels,
        assignees=people(pr.get("assignees"), "pull_request.assignees"),
        reviewers=reviewers,
        is_draft=bool(boolean(pr.get("draft"), "pull_request.draft")),
        state=state,
        merged=state is PrState.MERGED,
        merged_at=timestamp(pr.get("merged_at"), "pull_request.merged_at"),
        closed_at=timestamp(pr.get("closed_at"), "pull_request.closed_at"),
        github_created_at=timestamp(pr.get("created_at"), "pull_request.created_at"),
        github_updated_at=updated_at,
    )
    action = payload.get("action")
    pipeline = PipelineRow(
        pr_number=number,
        commit_sha=sha,
        author=author,
        avatar_url=avatar,
        title=title,
        status_pr=rules.pr_status(action),
        status_merge=rules.merge_status(state),
        pr_updated_at=updated_at,
    )
    rows: tuple[Row, ...] = (row, pipeline)
    if files is None and sha:
        job = FilesJobRow(
            pr_number=number,
            head_sha=key(sha, "pull_request.head.sha"),
            installation_id=_installation_id(payload),
            pr_updated_at=updated_at,
            refetch=rules.refetches_files(payload),
        )
        rows = (*rows, job)
    return Changes(repository=repo, rows=rows)


def _installation_id(payload: dict[str, Any]) -> int | None:
    """The GitHub App installation a delivery came through (an App's installation token reads the files)."""
    installation = opt_obj(payload.get("installation"), "installation")
    number = integer(installation.get("id"), "installation.id")
    return number if number is not None and 0 < number < 2**63 else None


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
    repo = _require_repository(payload, "check_run")
    run = obj(payload.get("check_run"), "check_run")
    check = _check(CheckSource.CHECK_RUN, key(run.get("name"), "check_run.name"), run, "check_run", updated=None)
    heads = _pr_heads(run.get("pull_requests"), "check_run.pull_requests", repo.github_id, check.head_sha)
    return Changes(repository=repo, rows=(check,), pr_heads=heads)


def map_check_suite(payload: dict[str, Any]) -> Changes:
    """`check_suite`: the suite of one app for a commit, named after the app."""
    repo = _require_repository(payload, "check_suite")
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
    repo = _require_repository(payload, "workflow_run")
    run = obj(payload.get("workflow_run"), "workflow_run")
    workflow = opt_obj(payload.get("workflow"), "workflow")
    name = run.get("name") or workflow.get("name") or run.get("path") or "workflow"
    check = _check(CheckSource.WORKFLOW_RUN, name, run, "workflow_run", started="run_started_at", completed=None)
    heads = _pr_heads(run.get("pull_requests"), "workflow_run.pull_requests", repo.github_id, check.head_sha)
    return Changes(repository=repo, rows=(check,), pr_heads=heads)


def map_workflow_job(payload: dict[str, Any]) -> Changes:
    """`workflow_job`: one job of a workflow run, named `workflow / job`."""
    repo = _require_repository(payload, "workflow_job")
    job = obj(payload.get("workflow_job"), "workflow_job")
    job_name = key(job.get("name"), "workflow_job.name")
    workflow = text(job.get("workflow_name"), "workflow_job.workflow_name")
    name = f"{workflow} / {job_name}" if workflow else job_name
    check = _check(CheckSource.WORKFLOW_JOB, name, job, "workflow_job", updated=None)
    return Changes(repository=repo, rows=(check,))


def map_status(payload: dict[str, Any]) -> Changes:
    """`status`: a commit status from an external CI, one row per context."""
    repo = _require_repository(payload, "status")
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


# --- reviews -----------------------------------------------------------------------------


def map_pull_request_review(payload: dict[str, Any]) -> Changes:
    """`pull_request_review`: a reviewer's verdict; a comment changes no verdict."""
    repo = _require_repository(payload, "pull_request_review")
    review = obj(payload.get("review"), "review")
    pr = obj(payload.get("pull_request"), "pull_request")
    number = number_key(pr.get("number"), "pull_request.number")
    head_sha = indexed(opt_obj(pr.get("head"), "pull_request.head").get("sha"), "pull_request.head.sha")
    heads = ((number, head_sha),) if head_sha else ()
    action = payload.get("action")
    state = "dismissed" if action == "dismissed" else key(review.get("state"), "review.state").lower()
    if state not in rules.REVIEW_RANK:
        # `commented` (or a pending draft) leaves every verdict as it was.
        return Changes(repository=repo, pr_heads=heads)
    verdict = ReviewState(state)
    reviewer, _avatar = login(review.get("user"), "review.user")
    row = ReviewRow(
        pr_number=number,
        reviewer=key(reviewer, "review.user.login"),
        review_id=ident(review.get("id"), "review.id"),
        state=verdict,
        commit_sha=text(review.get("commit_id"), "review.commit_id"),
        html_url=text(review.get("html_url"), "review.html_url"),
        github_submitted_at=timestamp(review.get("submitted_at"), "review.submitted_at"),
        rank=rules.REVIEW_RANK[verdict],
    )
    return Changes(repository=repo, rows=(row,), pr_heads=heads)


# --- repository activity -----------------------------------------------------------------


def map_repository_event(payload: dict[str, Any]) -> Changes:
    """`repository`: renamed, transferred, edited, privatized, archived, deleted..."""
    repo = map_repository(payload, deleted=payload.get("action") == "deleted")
    if repo is None:
        raise MappingError("repository payload has no repository")
    return Changes(repository=repo)


def map_push(payload: dict[str, Any]) -> Changes:
    """`push`: repository activity (pushed_at); commits themselves are not stored."""
    return Changes(repository=_require_repository(payload, "push"))


# --- dispatch ---------------------------------------------------------------------

Mapper = Callable[[dict[str, Any]], Changes]

MAPPERS: dict[str, Mapper] = {
    "pull_request": map_pull_request,
    "pull_request_review": map_pull_request_review,
    "check_run": map_check_run,
    "check_suite": map_check_suite,
    "workflow_run": map_workflow_run,
    "workflow_job": map_workflow_job,
    "status": map_status,
    "repository": map_repository_event,
    "push": map_push,
}


# Events journaled with nothing to apply, named in metrics rather than counted as `other`.
IGNORED_EVENTS = frozenset({"ping", "installation", "installation_repositories"})
KNOWN_EVENTS = frozenset(MAPPERS) | IGNORED_EVENTS


def map_delivery(event: str, payload: dict[str, Any]) -> Changes:
    """Map one delivery; events with nothing to apply give empty Changes."""
    mapper = MAPPERS.get(event)
    if mapper is None:
        return Changes()
    return mapper(payload)
