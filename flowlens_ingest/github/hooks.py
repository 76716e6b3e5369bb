"""Which delivery logs recovery reads, and the journal's side of the comparison.

hooks_to_read: the GitHub App's webhook (App mode), the repository and organization hooks the
journal has seen (`webhook_hooks`) and those GITHUB_WEBHOOKS lists (a token). journaled: which
GUIDs the journal holds for a hook, by its primary key. Reading GitHub's own answers (times,
headers it shows) is done here too, with no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from flowlens_ingest.config import Settings
from flowlens_ingest.events.hooks import APP_HOOK_PATH, header_number
from flowlens_ingest.names import hook_path
from flowlens_ingest.store.database import Database
from flowlens_ingest.store.schema import webhook_deliveries, webhook_hooks

JOURNAL_CHUNK = 500


@dataclass(frozen=True)
class Hook:
    """A webhook whose delivery log is read: its API path, its id (None: the App's, not yet learned)."""

    path: str
    hook_id: int | None
    app: bool = False


# A hook is recorded from a delivery's headers, which the signature does not cover: a signed body
# replayed with invented ones records hooks GitHub never heard of, each a request of every pass that
# reads it. So a run reads every hook GitHub has answered for (its checkpoint is set), up to
# MAX_CHECKED_HOOKS, and at most MAX_NEW_HOOKS of the others: the least recently tried first, a
# refused one going to the back (`tried`), so that a real hook among invented ones has its turn.
MAX_CHECKED_HOOKS = 1_000
MAX_NEW_HOOKS = 20


def hooks_to_read(settings: Settings, database: Database) -> tuple[list[Hook], list[str]]:
    """The App's webhook (App mode), the repository and organization hooks seen or configured (token); and what is skipped."""
    wh = webhook_hooks
    hooks: dict[str, Hook] = {}
    skipped: list[str] = []
    if settings.github_app_id and settings.github_app_private_key:
        app_id = header_number(settings.github_app_id)  # None for a client ID
        # The row the passes check through (the id GitHub gave them) before rows only headers named.
        chosen = database.first(
            sa.select(wh.c.hook_id)
            .where(wh.c.api_path == APP_HOOK_PATH, sa.or_(wh.c.target_id.is_(None), wh.c.target_id == app_id))
            .order_by(wh.c.checked_through.desc().nulls_last(), wh.c.hook_id)
            .limit(1)
        )
        hooks[APP_HOOK_PATH] = Hook(APP_HOOK_PATH, chosen.hook_id if chosen is not None else None, app=True)
    others = wh.c.api_path != APP_HOOK_PATH
    checked = database.read(
        sa.select(wh.c.api_path, wh.c.hook_id)
        .where(others, wh.c.checked_through.is_not(None))
        .order_by(wh.c.hook_id)
        .limit(MAX_CHECKED_HOOKS)
    )
    new = database.read(
        sa.select(wh.c.api_path, wh.c.hook_id)
        .where(others, wh.c.checked_through.is_(None))
        .order_by(wh.c.updated_at, wh.c.hook_id)
        .limit(MAX_NEW_HOOKS + 1)
    )
    if len(new) > MAX_NEW_HOOKS:
        new = new[:MAX_NEW_HOOKS]
        skipped.append(
            f"recorded hooks GitHub has not answered for yet past the first {MAX_NEW_HOOKS}: read by a later run"
        )
    for row in [*checked, *new]:
        if settings.github_token:
            hooks.setdefault(row.api_path, Hook(row.api_path, row.hook_id))
        else:
            skipped.append(f"{row.api_path}: a repository or organization hook needs GITHUB_TOKEN")
    for entry in settings.github_webhooks:
        configured = hook_path(entry)
        if configured is not None and settings.github_token:
            hooks.setdefault(configured[0], Hook(configured[0], configured[1]))
    return list(hooks.values()), skipped


def tried(database: Database, hook_ids: Iterable[int]) -> None:
    """These hooks had their turn: those never checked go to the back of the new ones, a later run reads the others first."""
    ids = sorted(set(hook_ids))
    if ids:
        wh = webhook_hooks
        database.execute(
            sa.update(wh).where(wh.c.hook_id.in_(ids), wh.c.checked_through.is_(None)).values(updated_at=sa.func.now())
        )


# Backfilled snapshots are journaled with hook 0 too: they are not deliveries that lost their hook.
_BACKFILLED = "backfill-%"


def no_hook_reason(database: Database) -> str:
    """Why there is no hook to read, and the fix: nothing delivered yet, or deliveries without GitHub's hook headers."""
    wd, wh = webhook_deliveries, webhook_hooks
    unhooked = (
        sa.select(wd.c.delivery_id)
        .where(~wd.c.delivery_id.like(_BACKFILLED), wd.c.hook_id.not_in(sa.select(wh.c.hook_id)))
        .limit(1)
    )
    fix = (
        "set GITHUB_WEBHOOKS to the hooks to read (repos/OWNER/REPO/hooks/ID or orgs/ORG/hooks/ID, the ID"
        " from the hook's settings page), or let GitHub deliver (a hook is recorded from its first delivery)"
    )
    if database.first(unhooked) is None:
        return f"no hook to read: no delivery from a GitHub hook has arrived yet; {fix}"
    return (
        "no hook to read: deliveries arrived, but without GitHub's hook headers (X-GitHub-Hook-ID,"
        " X-GitHub-Hook-Installation-Target-Type and -ID), as `flowlens-ingest send` or curl post them,"
        f" so no hook was recorded; {fix}"
    )


# GitHub's delivery ids are 64-bit integers (the journal keeps them as BIGINT).
_MAX_ID = 2**63 - 1
_MAX_GUID = 100


@dataclass(frozen=True)
class LogEntry:
    """One attempt of a hook's delivery log, as recovery needs it."""

    log_id: int
    guid: str
    event: str
    delivered_at: datetime


def parse_time(value: Any) -> datetime | None:
    """GitHub's ISO 8601 time with its UTC offset (`Z`); None for anything else, a time without offset included."""
    if not isinstance(value, str):
        return None
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    # A naive time cannot be compared with an aware one; GitHub always says `Z`.
    return at if at.tzinfo is not None and at.utcoffset() is not None else None


def log_entry(item: Any) -> LogEntry | None:
    """A log entry as GitHub lists it (`id`, `guid`, `event`, `delivered_at`); None for one it would not send.

    `id: true`, `id: 1e40`, a non-string GUID or a time without offset are skipped by the
    caller and counted, never taken for a delivery.
    """
    if not isinstance(item, dict):
        return None
    log_id, guid, event = item.get("id"), item.get("guid"), item.get("event")
    # `bool` is an `int` in Python, and JSON's 1e40 is a float: neither is an id.
    if type(log_id) is not int or not 0 < log_id <= _MAX_ID:
        return None
    if not isinstance(guid, str) or not guid or len(guid) > _MAX_GUID:
        return None
    at = parse_time(item.get("delivered_at"))
    if at is None:
        return None
    return LogEntry(log_id, guid, event if isinstance(event, str) else "", at)


def journaled(database: Database, hook_id: int, guids: Iterable[str]) -> set[str]:
    """Which of these GUIDs the journal holds for this hook (by its primary key)."""
    wanted = sorted(set(guids))
    found: set[str] = set()
    wd = webhook_deliveries
    for start in range(0, len(wanted), JOURNAL_CHUNK):
        chunk = wanted[start : start + JOURNAL_CHUNK]
        query = sa.select(wd.c.delivery_id).where(wd.c.hook_id == hook_id, wd.c.delivery_id.in_(chunk))
        found.update(row.delivery_id for row in database.read(query))
    return found
