"""Readers of environment values, one per kind: each takes a variable's name and its (non-empty) text.

config.py declares every setting with one of them; they never read os.environ themselves. Each
returns the value or raises ConfigError, one line naming the variable and what it accepts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

Reader = Callable[[str, str], Any]

_DURATION = re.compile(r"(\d{1,9})([dhms]?)")
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}


class ConfigError(Exception):
    """The environment does not describe a service that can start."""


def duration_seconds(text: str, *, unit_required: bool = False) -> int | None:
    """`30d`, `12h`, `90m`, `3600s` (or bare seconds, unless `unit_required`) as seconds; None if not one.

    The one parser of durations: settings (FLOWLENS_RECOVER_EVERY) and the command line (--older-than, --since).
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None or (unit_required and not match[2]):
        return None
    return int(match[1]) * _UNIT_S[match[2]]


def whole(low: int, high: int, unit: str) -> Reader:
    """An integer from `low` to `high` (inclusive)."""

    def read(name: str, raw: str) -> int:
        try:
            value: int | None = int(raw)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise ConfigError(f"{name} must be a whole number from {low} to {high} ({unit}), got {raw!r}")
        return value

    return read


def boolean(name: str, raw: str) -> bool:
    """true/false, 1/0, yes/no, on/off, in any case."""
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {lowered!r}")


def one_of(*choices: str) -> Reader:
    """One of `choices`, written in any case, `_` read as a space."""

    def read(name: str, raw: str) -> str:
        spoken = " ".join(raw.replace("_", " ").split())
        for choice in choices:
            if spoken.upper() == choice.upper():
                return choice
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {spoken!r}")

    return read


def path(name: str, raw: str) -> Path:
    """A path, absolute (`~` expanded). Whether it can be written is checked at start."""
    return Path(raw).expanduser().resolve()


def token(name: str, raw: str) -> str:
    """A credential sent as a header: printable ASCII without spaces, as GitHub's tokens are. Never repeated."""
    if not (raw.isascii() and raw.isprintable()) or any(c.isspace() for c in raw):
        raise ConfigError(
            f"{name} holds a character no GitHub token has (a space, a control character, or non-ASCII):"
            " check how it was pasted"
        )
    return raw


def app_id(name: str, raw: str) -> str:
    """A GitHub App's id (digits), or its client ID (`Iv23li…`): either signs its JWT."""
    if not re.fullmatch("[A-Za-z0-9._-]+", raw):
        raise ConfigError(f"{name} must be the GitHub App's id (digits) or its client ID (Iv23li…), got {raw!r}")
    return raw


def http_url(example: str) -> Reader:
    """An http:// or https:// URL. Never repeated in a message: it may hold a token."""

    def read(name: str, raw: str) -> str:
        try:
            parts = urlsplit(raw)
            usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:  # e.g. an unclosed [ of an IPv6 address
            usable = False
        if not usable:
            raise ConfigError(f"{name} must be an http:// or https:// URL, like {example}")
        return raw

    return read


def duration(low: int, high: int) -> Reader:
    """A duration (`10m`, `1h`, `90s`, `1d`, or seconds) as seconds: 0 (off) or from `low` to `high`."""

    def read(name: str, raw: str) -> int:
        seconds = duration_seconds(raw)
        if seconds is None or (seconds != 0 and not low <= seconds <= high):
            raise ConfigError(
                f"{name} must be 0 (off) or a duration from {low // 60}m to {high // 3600}h, like 10m;"
                f" got {raw.lower()!r}"
            )
        return seconds

    return read
