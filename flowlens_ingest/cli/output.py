"""What every command prints the same way: its one-line error, its exit status, counts and times."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

# Exit statuses, the same for every command (docs/operating.md, "Exit status"): 0 done, or nothing
# needs action; NOT_DONE the command ran but something is not done or needs action (a database
# down, missing or not migrated, a delivery that failed, one not recovered); USAGE it was asked
# wrong (an option, a setting out of range, a missing secret or credential).
NOT_DONE = 1
USAGE = 2


def fail(message: str, status: int = USAGE) -> int:
    """Say `message` on stderr as the command's one-line error; the exit status for it (usage, unless told)."""
    print(f"flowlens-ingest: {message}", file=sys.stderr)
    return status


def counted(count: int, singular: str, plural: str) -> str:
    """`1 delivery`, `2 deliveries`, `0 deliveries`: a count with its noun agreeing."""
    return f"{count} {singular if count == 1 else plural}"


def utc(moment: datetime) -> str:
    """UTC, ISO 8601 with its zone: the form `replay --since` takes."""
    return f"{moment.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
