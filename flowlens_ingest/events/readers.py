"""Typed readers for payload fields: each returns the value or raises MappingError. Pure."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

# Values the database indexes must stay well under btree's ~2700-byte row limit, in
# UTF-8 bytes (a character may take four): checked here, not left to the database,
# whose error would log the failing statement's text, payload included.
MAX_KEY_BYTES = 1000


class MappingError(Exception):
    """The payload does not have the shape its event promises."""


def obj(value: Any, what: str) -> dict[str, Any]:
    """An object (dict)."""
    if not isinstance(value, dict):
        raise MappingError(f"{what} is not an object")
    return value


def opt_obj(value: Any, what: str) -> dict[str, Any]:
    """An object, or {} when absent."""
    return {} if value is None else obj(value, what)


def array(value: Any, what: str) -> list[Any]:
    """An array, or [] when absent."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise MappingError(f"{what} is not an array")
    return value


def text(value: Any, what: str) -> str | None:
    """A string or None."""
    if value is None or isinstance(value, str):
        return value
    raise MappingError(f"{what} is not a string")


def key(value: Any, what: str) -> str:
    """A non-empty string short enough to index (a key column)."""
    found = indexed(value, what)
    if not found:
        raise MappingError(f"{what} is missing")
    return found


def indexed(value: Any, what: str) -> str | None:
    """A string or None, short enough for an indexed column."""
    found = text(value, what)
    # Past MAX_KEY_BYTES characters it is past MAX_KEY_BYTES bytes: no need to encode it.
    if found is not None and (len(found) > MAX_KEY_BYTES or len(found.encode()) > MAX_KEY_BYTES):
        raise MappingError(f"{what} is longer than {MAX_KEY_BYTES} bytes")
    return found


def integer(value: Any, what: str) -> int | None:
    """An integer (not a boolean) or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise MappingError(f"{what} is not an integer")
    return value


def count(value: Any, what: str) -> int | None:
    """A non-negative integer that fits an INTEGER column; None when absent or out of range."""
    number = integer(value, what)
    # A count no INTEGER column holds says nothing worth refusing the delivery for.
    return number if number is not None and 0 <= number < 2**31 else None


def ident(value: Any, what: str) -> int:
    """A required integer id."""
    number = integer(value, what)
    if number is None:
        raise MappingError(f"{what} is missing")
    return number


def number_key(value: Any, what: str) -> int:
    """A required pull request number: a positive integer an INTEGER key column holds.

    Checked here, not left to the database: an out-of-range key would fail the
    statement, and the server logs a failing statement's text, payload included.
    """
    number = ident(value, what)
    if not 0 < number < 2**31:
        raise MappingError(f"{what} is out of range")
    return number


def boolean(value: Any, what: str) -> bool | None:
    """A boolean or None."""
    if value is None or isinstance(value, bool):
        return value
    raise MappingError(f"{what} is not a boolean")


def timestamp(value: Any, what: str) -> datetime | None:
    """GitHub's timestamps: ISO 8601 strings, or Unix seconds in push payloads."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise MappingError(f"{what} is not a timestamp")
    if isinstance(value, (int, float)):
        try:
            return datetime.fromtimestamp(value, tz=UTC)
        except (OverflowError, OSError, ValueError):
            return None  # no timestamp column holds it: NULL, like any unstorable number
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise MappingError(f"{what} is not an ISO 8601 timestamp") from None
        parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        try:
            # PostgreSQL would store a time outside years 1-9999 UTC (`0001-01-01T00:00:00+14:00`),
            # but no Python reader, the poller included, could load that row back.
            return parsed.astimezone(UTC)
        except OverflowError:
            raise MappingError(f"{what} is out of range") from None
    raise MappingError(f"{what} is not a timestamp")


def latest(*times: datetime | None) -> datetime | None:
    """The latest of the given times, None if none."""
    present = [t for t in times if t is not None]
    return max(present) if present else None


def login(user: Any, what: str) -> tuple[str | None, str | None]:
    """A user object's (login, avatar_url)."""
    user = opt_obj(user, what)
    return text(user.get("login"), f"{what}.login"), text(user.get("avatar_url"), f"{what}.avatar_url")


def people(items: Any, what: str) -> list[dict[str, Any]]:
    """Users as [{login, avatar_url}]."""
    found = []
    for item in array(items, what):
        name, avatar = login(item, what)
        found.append({"login": name, "avatar_url": avatar})
    return found
