"""Which webhook a delivery came from, and the API path of that hook's delivery log. Pure.

GitHub names the hook in `X-GitHub-Hook-ID` and what it is installed on in
`X-GitHub-Hook-Installation-Target-Type` (`repository`, `organization`, `integration` for a
GitHub App's webhook, ...) and `-ID`. `recover` reads each hook's delivery log at its API path:
https://docs.github.com/en/rest/repos/webhooks, /orgs/webhooks and /apps/webhooks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flowlens_ingest.names import repository_name, url_name

APP_HOOK_PATH = "app/hook"


@dataclass(frozen=True)
class HookTarget:
    """What a hook is installed on, from the delivery's headers."""

    type: str
    id: int | None


def header_number(raw: str) -> int | None:
    """A header's id (X-GitHub-Hook-ID, -Installation-Target-ID) as a BIGINT; None unless ASCII digits.

    str.isdigit() alone accepts other digits ("²", "٣") that int() refuses or reads.
    """
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 19 else None


def target_of(target_type: str | None, target_id: str | None) -> HookTarget | None:
    """The headers' hook target; None when absent or not GitHub's plain ASCII forms."""
    kind = (target_type or "").strip()
    raw_id = (target_id or "").strip()
    if not kind or len(kind) > 50 or not re.fullmatch(r"[a-z_]+", kind):
        return None
    return HookTarget(kind, header_number(raw_id))


def api_path(hook_id: int, target: HookTarget, payload: dict[str, Any]) -> str | None:
    """The hook's API path (`repos/O/R/hooks/ID`, `orgs/O/hooks/ID`, `app/hook`); None when the payload cannot say."""
    if hook_id <= 0:
        return None
    if target.type == "integration":
        return APP_HOOK_PATH
    if target.type == "repository":
        repo = payload.get("repository")
        named = repository_name(repo.get("full_name") if isinstance(repo, dict) else None)
        return f"repos/{named[0]}/{named[1]}/hooks/{hook_id}" if named is not None else None
    if target.type == "organization":
        org = payload.get("organization")
        login = url_name(org.get("login")) if isinstance(org, dict) else None
        return f"orgs/{login}/hooks/{hook_id}" if login else None
    return None
