"""Pure mappers: a GitHub payload in, plain rows out. No Flask, no SQL, no clock, no I/O.

Every rule about *what* a payload means lives here; `store.py` decides only *how*
the rows land. A payload shape nobody expected raises MappingError, which the
service journals as a failed, replayable delivery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

# Values the database indexes must stay well under btree's ~2700-byte row limit.
MAX_KEY_CHARS = 1000

# Order of a check's lifecycle: where two states share a timestamp, the later stage wins.
CHECK_RANK = {"requested": 0, "queued": 0, "waiting": 0, "pending": 0, "in_progress": 1, "completed": 2}
# A dismissal outranks the review it dismisses (they share the review's submitted_at).
REVIEW_RANK = {"approved": 0, "changes_requested": 0, "dismissed": 1}


class MappingError(Exception):
    """The payload does not have the shape its event promises."""


@dataclass(frozen=True)
class RepositoryRow:
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
    # None when the sender did not include it: the stored list is then kept.
    files_changed: list[Any] | None
    additions: int | None
    deletions: int | None
    changed_files: int | None
    commits_count: int | None
    labels: list[dict[str, Any]]
    assignees: list[dict[str, Any]]
    reviewers: list[dict[str, Any]]
    is_draft: bool
    state: str
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
    status_pr: str
    status_merge: str
    pr_updated_at: datetime | None


@dataclass(frozen=True)
class CheckRow:
    head_sha: str
    source: str
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
    pr_number: int
    reviewer: str
    review_id: int
    state: str
    commit_sha: str | None
    html_url: str | None
    github_submitted_at: datetime | None
    rank: int


@dataclass(frozen=True)
class Changes:
    """Everything one delivery asks the database to change."""

    repository: RepositoryRow | None = None
    pull_request: PullRequestRow | None = None
    pipeline: PipelineRow | None = None
    checks: tuple[CheckRow, ...] = ()
    review: ReviewRow | None = None
    # PRs the event names (check events, reviews): their pipeline_runs row is
    # created if missing, seeded with this head sha.
    pr_heads: tuple[tuple[int, str], ...] = field(default=())

    @property
    def empty(self) -> bool:
        """True when the delivery has nothing to apply (it is only journaled)."""
        return self.repository is None


# --- small readers -----------------------------------------------------------


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MappingError(f"{what} is not an object")
    return value


def _opt_obj(value: Any, what: str) -> dict[str, Any]:
    return {} if value is None else _obj(value, what)


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise MappingError(f"{what} is not an array")
    return value


def _str(value: Any, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise MappingError(f"{what} is not a string")


def _key(value: Any, what: str) -> str:
    text = _str(value, what)
    if not text:
        raise MappingError(f"{what} is missing")
    if len(text) > MAX_KEY_CHARS:
        raise MappingError(f"{what} is longer than {MAX_KEY_CHARS} characters")
    return text


def _int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise MappingError(f"{what} is not an integer")
    return value


def _count(value: Any, what: str) -> int | None:
    number = _int(value, what)
    if number is not None and not 0 <= number < 2**31:
        raise MappingError(f"{what} is out of range")
    return number


def _id(value: Any, what: str) -> int:
    number = _int(value, what)
    if number is None:
        raise MappingError(f"{what} is missing")
    return number


def _bool(value: Any, what: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise MappingError(f"{what} is not a boolean")


def _time(value: Any, what: str) -> datetime | None:
    """GitHub's timestamps: ISO 8601 strings, or Unix seconds in push payloads."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise MappingError(f"{what} is not a timestamp")
    if isinstance(value, (int, float)):
        try:
            return datetime.fromtimestamp(value, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise MappingError(f"{what} is out of range") from None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise MappingError(f"{what} is not an ISO 8601 timestamp") from None
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
        try:
            # PostgreSQL would store a time outside years 1-9999 UTC (`0001-01-01T00:00:00+14:00`),
            # but no Python reader, the poller included, could load that row back.
            return parsed.astimezone(timezone.utc)
        except OverflowError:
            raise MappingError(f"{what} is out of range") from None
    raise MappingError(f"{what} is not a timestamp")


def _latest(*times: datetime | None) -> datetime | None:
    present = [t for t in times if t is not None]
    return max(present) if present else None


def _login(user: Any, what: str) -> tuple[str | None, str | None]:
    user = _opt_obj(user, what)
    return _str(user.get("login"), f"{what}.login"), _str(user.get("avatar_url"), f"{what}.avatar_url")


def _people(items: Any, what: str) -> list[dict[str, Any]]:
    people = []
    for item in _list(items, what):
        login, avatar = _login(item, what)
        people.append({"login": login, "avatar_url": avatar})
    return people


# --- repository ----------------------------------------------------------------


def map_repository(payload: dict[str, Any], *, deleted: bool = False) -> RepositoryRow | None:
    """The `repository` object every repository-scoped delivery carries."""
    repo = payload.get("repository")
    if repo is None:
        return None
    repo = _obj(repo, "repository")
    owner, owner_avatar = _login(repo.get("owner"), "repository.owner")
    name = _key(repo.get("name"), "repository.name")
    return RepositoryRow(
        github_id=_id(repo.get("id"), "repository.id"),
        name=name,
        full_name=_key(repo.get("full_name") or f"{owner}/{name}", "repository.full_name"),
        owner=owner,
        owner_avatar_url=owner_avatar,
        description=_str(repo.get("description"), "repository.description"),
        is_private=_bool(repo.get("private"), "repository.private"),
        default_branch=_str(repo.get("default_branch"), "repository.default_branch"),
        html_url=_str(repo.get("html_url"), "repository.html_url"),
        language=_str(repo.get("language"), "repository.language"),
        stars=_count(repo.get("stargazers_count"), "repository.stargazers_count"),
        forks=_count(repo.get("forks_count"), "repository.forks_count"),
        is_archived=_bool(repo.get("archived"), "repository.archived"),
        last_activity=_time(repo.get("pushed_at"), "repository.pushed_at"),
        github_created_at=_time(repo.get("created_at"), "repository.created_at"),
        github_updated_at=_time(repo.get("updated_at"), "repository.updated_at"),
        deleted=deleted,
    )


def _require_repository(payload: dict[str, Any], event: str) -> RepositoryRow:
    repo = map_repository(payload)
    if repo is None:
        raise MappingError(f"{event} payload has no repository")
    return repo


# --- pull_request ----------------------------------------------------------------


def pr_state(pr: dict[str, Any]) -> str:
    """open | closed | merged, from the PR object itself rather than the action name."""
    if pr.get("merged") or pr.get("merged_at"):
        return "merged"
    state = _str(pr.get("state"), "pull_request.state")
    if state not in ("open", "closed"):
        raise MappingError("pull_request.state is neither open nor closed")
    return state


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
    pr = _obj(payload.get("pull_request"), "pull_request")
    number = _id(pr.get("number", payload.get("number")), "pull_request.number")
    head = _opt_obj(pr.get("head"), "pull_request.head")
    base = _opt_obj(pr.get("base"), "pull_request.base")
    author, avatar = _login(pr.get("user"), "pull_request.user")
    state = pr_state(pr)
    updated_at = _time(pr.get("updated_at"), "pull_request.updated_at")
    title = _str(pr.get("title"), "pull_request.title")
    sha = _str(head.get("sha"), "pull_request.head.sha")
    labels = [
        {"name": _str(_obj(label, "label").get("name"), "label.name"), "color": label.get("color")}
        for label in _list(pr.get("labels"), "pull_request.labels")
    ]
    reviewers = _people(pr.get("requested_reviewers"), "pull_request.requested_reviewers")
    reviewers += [
        {"team": _str(_obj(team, "team").get("slug") or team.get("name"), "team.slug")}
        for team in _list(pr.get("requested_teams"), "pull_request.requested_teams")
    ]
    row = PullRequestRow(
        pr_number=number,
        github_id=_int(pr.get("id"), "pull_request.id"),
        title=title,
        description=_str(pr.get("body"), "pull_request.body"),
        author=author,
        author_avatar=avatar,
        commit_sha=sha,
        branch_name=_str(head.get("ref"), "pull_request.head.ref"),
        base_branch=_str(base.get("ref"), "pull_request.base.ref"),
        pr_url=_str(pr.get("html_url"), "pull_request.html_url"),
        files_changed=_files_changed(payload, pr),
        additions=_count(pr.get("additions"), "pull_request.additions"),
        deletions=_count(pr.get("deletions"), "pull_request.deletions"),
        changed_files=_count(pr.get("changed_files"), "pull_request.changed_files"),
        commits_count=_count(pr.get("commits"), "pull_request.commits"),
        labels=labels,
        assignees=_people(pr.get("assignees"), "pull_request.assignees"),
        reviewers=reviewers,
        is_draft=bool(_bool(pr.get("draft"), "pull_request.draft")),
        state=state,
        merged=state == "merged",
        merged_at=_time(pr.get("merged_at"), "pull_request.merged_at"),
        closed_at=_time(pr.get("closed_at"), "pull_request.closed_at"),
        github_created_at=_time(pr.get("created_at"), "pull_request.created_at"),
        github_updated_at=updated_at,
    )
    action = payload.get("action")
    pipeline = PipelineRow(
        pr_number=number,
        commit_sha=sha,
        author=author,
        avatar_url=avatar,
        title=title,
        status_pr="opened" if action in ("opened", "reopened") else "updated",
        status_merge={"open": "pending"}.get(state, state),
        pr_updated_at=updated_at,
    )
    return Changes(repository=repo, pull_request=row, pipeline=pipeline)


# --- checks ---------------------------------------------------------------------------


def _pr_heads(items: Any, what: str, repo_id: int, head_sha: str) -> tuple[tuple[int, str], ...]:
    """PR numbers of this repository that an event names (forks' PRs name another base repo)."""
    heads = []
    for item in _list(items, what):
        item = _obj(item, what)
        base_repo = _opt_obj(_opt_obj(item.get("base"), f"{what}.base").get("repo"), f"{what}.base.repo")
        if base_repo.get("id") not in (None, repo_id):
            continue
        number = _count(item.get("number"), f"{what}.number")
        if number is not None:
            heads.append((number, head_sha))
    return tuple(heads)


def _check(
    source: str,
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
    status = status if status is not None else _key(obj.get("status"), f"{what}.status")
    started_at = _time(obj.get(started), f"{what}.{started}")
    completed_at = _time(obj.get(completed), f"{what}.{completed}") if completed else None
    updated_at = _time(obj.get(updated), f"{what}.{updated}") if updated else None
    created_at = _time(obj.get("created_at"), f"{what}.created_at")
    return CheckRow(
        head_sha=_key(obj.get("head_sha"), f"{what}.head_sha"),
        source=source,
        name=_key(name, f"{what}.name"),
        github_id=_int(obj.get("id"), f"{what}.id"),
        status=status,
        conclusion=conclusion if conclusion is not None else _str(obj.get("conclusion"), f"{what}.conclusion"),
        url=_str(obj.get(url), f"{what}.{url}"),
        github_started_at=started_at,
        github_completed_at=completed_at,
        github_updated_at=updated_at,
        event_at=_latest(started_at, completed_at, updated_at, created_at),
        rank=CHECK_RANK.get(status, 0),
    )


def map_check_run(payload: dict[str, Any]) -> Changes:
    """`check_run`: one check of a commit (the object's status, not the action, decides)."""
    repo = _require_repository(payload, "check_run")
    run = _obj(payload.get("check_run"), "check_run")
    check = _check("check_run", run.get("name"), run, "check_run", updated=None)
    heads = _pr_heads(run.get("pull_requests"), "check_run.pull_requests", repo.github_id, check.head_sha)
    return Changes(repository=repo, checks=(check,), pr_heads=heads)


def map_check_suite(payload: dict[str, Any]) -> Changes:
    """`check_suite`: the suite of one app for a commit, named after the app."""
    repo = _require_repository(payload, "check_suite")
    suite = _obj(payload.get("check_suite"), "check_suite")
    app = _opt_obj(suite.get("app"), "check_suite.app")
    name = app.get("slug") or app.get("name") or "check_suite"
    check = _check("check_suite", name, suite, "check_suite", started="created_at", completed=None, url="url")
    heads = _pr_heads(suite.get("pull_requests"), "check_suite.pull_requests", repo.github_id, check.head_sha)
    return Changes(repository=repo, checks=(check,), pr_heads=heads)


def map_workflow_run(payload: dict[str, Any]) -> Changes:
    """`workflow_run`: one run of a workflow; runs from forks list no PRs and count by head sha."""
    repo = _require_repository(payload, "workflow_run")
    run = _obj(payload.get("workflow_run"), "workflow_run")
    workflow = _opt_obj(payload.get("workflow"), "workflow")
    name = run.get("name") or workflow.get("name") or run.get("path") or "workflow"
    check = _check("workflow_run", name, run, "workflow_run", started="run_started_at", completed=None)
    heads = _pr_heads(run.get("pull_requests"), "workflow_run.pull_requests", repo.github_id, check.head_sha)
    return Changes(repository=repo, checks=(check,), pr_heads=heads)


def map_workflow_job(payload: dict[str, Any]) -> Changes:
    """`workflow_job`: one job of a workflow run, named `workflow / job`."""
    repo = _require_repository(payload, "workflow_job")
    job = _obj(payload.get("workflow_job"), "workflow_job")
    job_name = _key(job.get("name"), "workflow_job.name")
    workflow = _str(job.get("workflow_name"), "workflow_job.workflow_name")
    name = f"{workflow} / {job_name}" if workflow else job_name
    check = _check("workflow_job", name, job, "workflow_job", updated=None)
    return Changes(repository=repo, checks=(check,))


def map_status(payload: dict[str, Any]) -> Changes:
    """`status`: a commit status from an external CI, one row per context."""
    repo = _require_repository(payload, "status")
    state = _key(payload.get("state"), "status.state")
    if state not in ("pending", "success", "failure", "error"):
        raise MappingError("status.state is not pending, success, failure or error")
    status = "pending" if state == "pending" else "completed"
    check = _check(
        "status",
        payload.get("context") or "default",
        {**payload, "head_sha": payload.get("sha")},
        "status",
        status=status,
        conclusion=None if state == "pending" else state,
        started="created_at",
        completed=None,
        url="target_url",
    )
    return Changes(repository=repo, checks=(check,))


# --- reviews -----------------------------------------------------------------------------


def map_pull_request_review(payload: dict[str, Any]) -> Changes:
    """`pull_request_review`: a reviewer's verdict; a comment changes no verdict."""
    repo = _require_repository(payload, "pull_request_review")
    review = _obj(payload.get("review"), "review")
    pr = _obj(payload.get("pull_request"), "pull_request")
    number = _id(pr.get("number"), "pull_request.number")
    head_sha = _str(_opt_obj(pr.get("head"), "pull_request.head").get("sha"), "pull_request.head.sha")
    heads = ((number, head_sha),) if head_sha else ()
    action = payload.get("action")
    state = _key(review.get("state"), "review.state").lower()
    if action == "dismissed":
        state = "dismissed"
    if state not in REVIEW_RANK:
        # `commented` (or a pending draft) leaves every verdict as it was.
        return Changes(repository=repo, pr_heads=heads)
    reviewer, _avatar = _login(review.get("user"), "review.user")
    row = ReviewRow(
        pr_number=number,
        reviewer=_key(reviewer, "review.user.login"),
        review_id=_id(review.get("id"), "review.id"),
        state=state,
        commit_sha=_str(review.get("commit_id"), "review.commit_id"),
        html_url=_str(review.get("html_url"), "review.html_url"),
        github_submitted_at=_time(review.get("submitted_at"), "review.submitted_at"),
        rank=REVIEW_RANK[state],
    )
    return Changes(repository=repo, review=row, pr_heads=heads)


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


def map_delivery(event: str, payload: dict[str, Any]) -> Changes:
    """Map one delivery; events with nothing to apply give empty Changes."""
    mapper = MAPPERS.get(event)
    if mapper is None:
        return Changes()
    return mapper(payload)
