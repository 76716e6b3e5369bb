"""Pure mappers: a GitHub payload in, plain rows out. No Flask, no SQL, no clock, no I/O.

This module dispatches by event; the mapping of each kind lives beside it
(repository.py, pulls.py, checks.py).

Every rule about *what* a payload means lives here (and in rules.py); statements.py
decides only *how* the rows land. A payload shape nobody expected raises
MappingError, which the service journals as a failed, replayable delivery.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowlens_ingest.events.checks import map_check_run, map_check_suite, map_status, map_workflow_job, map_workflow_run
from flowlens_ingest.events.pulls import map_pull_request, map_pull_request_review
from flowlens_ingest.events.readers import MappingError
from flowlens_ingest.events.repository import map_repository, require_repository
from flowlens_ingest.events.rows import Changes

__all__ = ["KNOWN_EVENTS", "MAPPERS", "Changes", "MappingError", "map_delivery"]

# --- repository activity -----------------------------------------------------------------


def map_repository_event(payload: dict[str, Any]) -> Changes:
    """`repository`: renamed, transferred, edited, privatized, archived, deleted..."""
    repo = map_repository(payload, deleted=payload.get("action") == "deleted")
    if repo is None:
        raise MappingError("repository payload has no repository")
    return Changes(repository=repo)


def map_push(payload: dict[str, Any]) -> Changes:
    """`push`: repository activity (pushed_at); commits themselves are not stored."""
    return Changes(repository=require_repository(payload, "push"))


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
