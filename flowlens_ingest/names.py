"""GitHub's names as they may appear in an API path: one rule, for the webhook path and for configuration.

Pure, and below every other module (config reads GITHUB_WEBHOOKS with it, events/hooks.py
builds a hook's API path with it), so the rule is written once.
"""

from __future__ import annotations

import re
from typing import Any

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_HOOK_PATH = re.compile(r"(?:repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)|orgs/(?P<org>[^/]+))/hooks/(?P<id>[0-9]{1,18})")


def url_name(value: Any) -> str | None:
    """An owner or repository name fit for a URL path: GitHub's characters, never `.` or `..` (they walk the path)."""
    fits = isinstance(value, str) and _NAME.fullmatch(value) and value.strip(".")
    return value if fits else None


def repository_name(value: Any) -> tuple[str, str] | None:
    """`OWNER/REPO` as (owner, repo), each a `url_name`; None when it is not one."""
    if not isinstance(value, str):
        return None
    owner, _, repo = value.partition("/")
    return (owner, repo) if url_name(owner) and url_name(repo) else None


def hook_path(path: str) -> tuple[str, int] | None:
    """A hook's API path (`repos/O/R/hooks/ID` or `orgs/O/hooks/ID`) as (path, hook id); None if not one."""
    match = _HOOK_PATH.fullmatch(path.strip().strip("/"))
    if match is None or not all(url_name(match[part]) for part in ("owner", "repo", "org") if match[part] is not None):
        return None
    return match.group(0), int(match["id"])
