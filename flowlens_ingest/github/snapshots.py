"""GitHub's REST objects shaped as the webhook deliveries that would carry them. Pure, no I/O.

Backfill reads a repository's current state through the REST API and lands it through the same
mappers and processing contract as webhooks, so each object becomes the payload of the event
that announces it: a full pull request (`GET /pulls/{n}`, not the list's simple one) a
`pull_request`, a review a `pull_request_review` (REST states are upper case: `APPROVED`), a check
run a `check_run`, a commit status a `status`. Each payload carries the App installation it was
read through, so the files job it queues reads with the same installation's token.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# A REST review's state, as the webhook names it; `PENDING` (a draft only its author sees) and
# `COMMENTED` (which changes no verdict) land nothing.
_REVIEW_ACTIONS = {"APPROVED": "submitted", "CHANGES_REQUESTED": "submitted", "DISMISSED": "dismissed"}


def _with_installation(payload: dict[str, Any], installation_id: int | None) -> dict[str, Any]:
    if installation_id is not None:
        payload["installation"] = {"id": installation_id}
    return payload


def pull_request(repo: dict[str, Any], pr: dict[str, Any], installation_id: int | None) -> dict[str, Any]:
    """A `pull_request` payload of a full pull request.

    The action decides `status_pr` only: `opened` for a PR GitHub has not changed since it was
    opened (`updated_at` is `created_at`), else `edited` (status `updated`), as the last webhook
    of such a PR would.
    """
    action = "opened" if pr.get("updated_at") == pr.get("created_at") else "edited"
    payload = {"action": action, "number": pr.get("number"), "pull_request": pr, "repository": repo}
    return _with_installation(payload, installation_id)


def review(
    repo: dict[str, Any], number: int, head_sha: str, rest: dict[str, Any], installation_id: int | None
) -> dict[str, Any] | None:
    """A `pull_request_review` payload of a REST review; None for a pending or commenting one."""
    state = rest.get("state")
    action = _REVIEW_ACTIONS.get(state) if isinstance(state, str) else None
    if action is None:
        return None
    shaped = {**rest, "state": str(state).lower()}
    pr = {"number": number, "head": {"sha": head_sha}, "base": {"repo": {"id": repo.get("id")}}}
    payload = {"action": action, "review": shaped, "pull_request": pr, "repository": repo}
    return _with_installation(payload, installation_id)


def check_run(repo: dict[str, Any], run: dict[str, Any], installation_id: int | None) -> dict[str, Any]:
    """A `check_run` payload (the REST object is the webhook's)."""
    action = "completed" if run.get("status") == "completed" else "created"
    return _with_installation({"action": action, "check_run": run, "repository": repo}, installation_id)


def status(repo: dict[str, Any], sha: str, rest: dict[str, Any], installation_id: int | None) -> dict[str, Any]:
    """A `status` payload of one context of a commit's combined status."""
    payload = {
        "id": rest.get("id"),
        "sha": sha,
        "name": repo.get("full_name"),
        "context": rest.get("context"),
        "state": rest.get("state"),
        "description": rest.get("description"),
        "target_url": rest.get("target_url"),
        "created_at": rest.get("created_at"),
        "updated_at": rest.get("updated_at"),
        "repository": repo,
    }
    return _with_installation(payload, installation_id)


def delivery_id(event: str, body: bytes) -> str:
    """A backfilled snapshot's journal id, from its content: the same snapshot again is a duplicate and changes nothing."""
    return "backfill-" + hashlib.sha256(event.encode() + b"\0" + body).hexdigest()[:40]


def body_of(payload: dict[str, Any]) -> bytes:
    """The bytes a backfilled payload is journaled as (stable for the same content)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()
