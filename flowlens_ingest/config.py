"""Configuration from the environment, read once into a plain, typed object."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

MIB = 1024 * 1024


class ConfigError(Exception):
    """The environment does not describe a service that can start."""


def normalize_database_url(url: str) -> str:
    """Accept libpq-style `postgres://` URLs and pin the psycopg2 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    database_url: str | None = None
    secrets: tuple[bytes, ...] = ()
    data_dir: Path = Path(".flowlens")
    max_body_bytes: int = 25 * MIB
    statement_timeout_ms: int = 5000
    # gunicorn threads (4) plus the spool drainer: a request never waits for a connection.
    pool_size: int = 5
    store_payloads: bool = True
    # Server-side PREPARE/EXECUTE: off behind a pooler that shares server sessions.
    prepared_statements: bool = True
    spool_dir: Path | None = None
    spool_max_bytes: int = 512 * MIB
    log_format: str = "json"
    log_level: str = "INFO"

    @property
    def spool_enabled(self) -> bool:
        """A spool size of 0 turns the spool off (503 while the database is down)."""
        return self.spool_dir is not None and self.spool_max_bytes > 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Read the FlowLens environment variables (see the README's Configuration)."""
        env = os.environ if env is None else env
        secrets = tuple(
            value.encode()
            for value in (
                env.get("GITHUB_WEBHOOK_SECRET", ""),
                env.get("GITHUB_WEBHOOK_SECRET_PREVIOUS", ""),
            )
            if value
        )
        data_dir = Path(env.get("FLOWLENS_DATA_DIR") or ".flowlens").expanduser().resolve()
        spool = env.get("FLOWLENS_SPOOL_DIR")
        log_format = env.get("FLOWLENS_LOG_FORMAT", "json").strip().lower()
        if log_format not in ("json", "text"):
            raise ConfigError(f"FLOWLENS_LOG_FORMAT must be json or text, got {log_format!r}")
        url = env.get("DATABASE_URL", "").strip()
        return cls(
            database_url=normalize_database_url(url) if url else None,
            secrets=secrets,
            data_dir=data_dir,
            max_body_bytes=_int(env, "FLOWLENS_MAX_BODY_BYTES", 25 * MIB),
            statement_timeout_ms=_int(env, "FLOWLENS_STATEMENT_TIMEOUT_MS", 5000),
            pool_size=_int(env, "FLOWLENS_POOL_SIZE", 5),
            store_payloads=_bool(env, "FLOWLENS_JOURNAL_PAYLOADS", True),
            prepared_statements=_bool(env, "FLOWLENS_PREPARED_STATEMENTS", True),
            spool_dir=Path(spool).expanduser().resolve() if spool else data_dir / "spool",
            spool_max_bytes=_int(env, "FLOWLENS_SPOOL_MAX_BYTES", 512 * MIB),
            log_format=log_format,
            log_level=env.get("FLOWLENS_LOG_LEVEL", "INFO").upper(),
        )
