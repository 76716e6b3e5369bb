"""The repository object every delivery may carry, mapped to its row. Pure."""

from __future__ import annotations

from typing import Any

from flowlens_ingest.events.readers import (
    MappingError,
    boolean,
    count,
    ident,
    key,
    login,
    obj,
    text,
    timestamp,
)
from flowlens_ingest.events.rows import (
    RepositoryRow,
)

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


def require_repository(payload: dict[str, Any], event: str) -> RepositoryRow:
    repo = map_repository(payload)
    if repo is None:
        raise MappingError(f"{event} payload has no repository")
    return repo
