"""Readers of environment values, one per kind: each returns the value or raises ConfigError.

config.Settings calls them with the environment it reads (the one place that reads it);
they never read os.environ themselves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit


class ConfigError(Exception):
    """The environment does not describe a service that can start."""


def int_value(env: Mapping[str, str], name: str, default: int, bounds: tuple[int, int], unit: str) -> int:
    """An integer within `bounds` (inclusive), else ConfigError saying the range and its `unit`."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    low, high = bounds
    try:
        value: int | None = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high} ({unit}), got {raw!r}")
    return value


def bool_value(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    """One of `choices`, written in any case, `_` read as a space."""
    raw = " ".join(env.get(name, "").replace("_", " ").split())
    if not raw:
        return default
    for choice in choices:
        if raw.upper() == choice.upper():
            return choice
    raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")


def path_value(env: Mapping[str, str], name: str) -> Path | None:
    """A path, absolute (`~` expanded), or None when unset. Whether it can be written is checked at start."""
    raw = env.get(name, "").strip()
    return Path(raw).expanduser().resolve() if raw else None


def http_url(env: Mapping[str, str], name: str, example: str) -> str | None:
    """An http:// or https:// URL, or None when unset. Never repeated in a message: it may hold a token."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        parts = urlsplit(raw)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed [ of an IPv6 address
        usable = False
    if not usable:
        raise ConfigError(f"{name} must be an http:// or https:// URL, like {example}")
    return raw


def duration_s(env: Mapping[str, str], name: str, default: int, bounds: tuple[int, int]) -> int:
    """A duration (`10m`, `1h`, `90s`, `1d`, or seconds) as seconds: 0 (off) or within `bounds`."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    match = re.fullmatch(r"(\d{1,9})([dhms]?)", raw)
    seconds = int(match[1]) * {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}[match[2]] if match else None
    low, high = bounds
    if seconds is None or (seconds != 0 and not low <= seconds <= high):
        raise ConfigError(
            f"{name} must be 0 (off) or a duration from {low // 60}m to {high // 3600}h, like 10m; got {raw!r}"
        )
    return seconds


# A GITHUB_WEBHOOKS entry: a repository or organization hook's API path.
