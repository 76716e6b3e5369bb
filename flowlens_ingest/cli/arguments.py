"""The command line's argument types: HOST:PORT, a duration like 30d, an ISO 8601 time."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from flowlens_ingest.environment import duration_seconds

# The epilog of every command that reads the database.
DATABASE_HELP = (
    "Database: DATABASE_URL, or else the embedded database in FLOWLENS_DATA_DIR (default ./.flowlens)"
    " that `serve` made; never a new one, never migrated here."
)


class HostPort(click.ParamType[str]):
    """A HOST:PORT argument."""

    name = "HOST:PORT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from flowlens_ingest.cli.nginx import AddressError, address

        try:
            return address(str(value))
        except AddressError as exc:
            self.fail(str(exc), param, ctx)


# A longer span is a slip (and past the database's range of times: `now() - interval` would fail).
MAX_DURATION = timedelta(days=36500)


class Duration(click.ParamType[timedelta]):
    """`30d`, `12h`, `90m`, `3600s` as a timedelta, at most MAX_DURATION (a century)."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        seconds = duration_seconds(str(value), unit_required=True)
        if seconds is None:
            self.fail(f"{value!r}: use a number and d, h, m or s, like 30d", param, ctx)
        if seconds > MAX_DURATION.total_seconds():
            self.fail(f"{value!r}: at most {MAX_DURATION.days}d", param, ctx)
        return timedelta(seconds=seconds)


def duration_text(span: timedelta) -> str:
    """A timedelta the way --older-than takes it: 12h, 90m, 3600s in the largest unit that fits exactly."""
    seconds = int(span.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class Seconds(click.FloatRange):
    """A number of seconds in a range; never NaN, which every comparison of a range lets through."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return number


class Timestamp(click.ParamType[datetime]):
    """An ISO 8601 time (UTC when no offset is given)."""

    name = "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            self.fail(f"{value!r}: use ISO 8601, like 2026-11-28T10:00:00Z", param, ctx)
        # Read as UTC: PostgreSQL takes zone offsets up to 15:59 only, Python up to 23:59.
        try:
            return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except OverflowError:  # 0001-01-01T00:00+01:00: before the first representable time
            self.fail(f"{value!r}: out of range", param, ctx)
