"""Pull requests and their reviews: a payload in, rows out. Pure."""

from __future__ import annotations

from typing import Any

from flowlens_ingest.events import rules
from flowlens_ingest.events.enums import FilesStatus, PrState, ReviewState
from flowlens_ingest.events.readers import (
    MappingError,
    array,
    boolean,
    count,
    ident,
    indexed,
    integer,
    key,
    login,
    number_key,
    obj,
    opt_obj,
    people,
    text,
    timestamp,
)
from flowlens_ingest.events.repository import require_repository
from flowlens_ingest.events.rows import (
    Changes,
    FilesJobRow,
    PipelineRow,
    PullRequestRow,
    ReviewRow,
    Row,
)

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
    repo = require_repository(payload, "pull_request")
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


# --- reviews -----------------------------------------------------------------------------


def map_pull_request_review(payload: dict[str, Any]) -> Changes:
    """`pull_request_review`: a reviewer's verdict; a comment changes no verdict."""
    repo = require_repository(payload, "pull_request_review")
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
