"""Shaping a pull request's file list, as GitHub's REST API returns it, into what we store.

Pure functions only: no I/O, no database, no HTTP. The fetching lives in `client.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flowlens_ingest.events.enums import FilesStatus
from flowlens_ingest.events.parse import storable

# The fields of a file entry worth storing; the URLs (`blob_url`, `raw_url`, `contents_url`)
# can be rebuilt from the repository, the head sha and the filename.
KEPT_FIELDS = ("filename", "status", "additions", "deletions", "changes", "previous_filename", "sha", "patch")

# GitHub lists at most 3,000 files of a pull request, whatever its size.
MAX_FILES = 3000
# Patches are the bulk of a file list: cap them so one huge PR cannot bloat a row.
MAX_PATCH_CHARS = 64 * 1024
MAX_TOTAL_PATCH_CHARS = 1024 * 1024


@dataclass(frozen=True)
class FileList:
    """A shaped file list and whether it is complete (`fetched`) or cut somewhere (`truncated`)."""

    files: list[dict[str, Any]]
    status: FilesStatus


def shape(
    entries: Iterable[dict[str, Any]],
    *,
    expected: int | None,
    truncated: bool = False,
    max_patch_chars: int = MAX_PATCH_CHARS,
    max_total_patch_chars: int = MAX_TOTAL_PATCH_CHARS,
) -> FileList:
    """Keep the stored fields of GitHub's file entries, cap patches and the list, and say if anything was cut.

    `truncated`: the entries are already known to be a cut list (the fetch stopped early).
    """
    if max_patch_chars < 0 or max_total_patch_chars < 0:
        raise ValueError("patch caps must not be negative")
    files: list[dict[str, Any]] = []
    received = 0
    cut = truncated
    total_patch = 0
    # Once one patch overflows the per-PR budget, later ones are dropped too, even small ones:
    # which patches survive then depends only on the order, never on their sizes further down.
    budget_spent = False
    for entry in entries:
        # Anything not shaped like a file entry is noise from a misbehaving server: skip it.
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            continue
        received += 1
        if len(files) >= MAX_FILES:
            cut = True
            continue
        # Text kept as a delivery's is: U+0000 and lone surrogates (GitHub sends them in hunks) as U+FFFD.
        kept = {
            field: storable(entry[field]) if isinstance(entry[field], str) else entry[field]
            for field in KEPT_FIELDS
            if field in entry and field != "patch"
        }
        if kept.get("previous_filename", "") is None:
            # Only renames carry a previous name; a null one says nothing.
            del kept["previous_filename"]
        patch = entry.get("patch")
        # GitHub omits `patch` for binary files and very large diffs: nothing to cap then.
        if isinstance(patch, str):
            patch = storable(patch)
            truncated = False
            if len(patch) > max_patch_chars:
                patch = patch[:max_patch_chars]
                truncated = True
            if budget_spent or total_patch + len(patch) > max_total_patch_chars:
                budget_spent = True
                kept["patch_truncated"] = True
                cut = True
            else:
                total_patch += len(patch)
                kept["patch"] = patch
                if truncated:
                    kept["patch_truncated"] = True
                    cut = True
        files.append(kept)
    if expected is not None and expected > received:
        # GitHub stops listing at 3,000 files: fewer entries than the PR's `changed_files` means a capped list.
        cut = True
    return FileList(files=files, status=FilesStatus.TRUNCATED if cut else FilesStatus.FETCHED)
