"""Configuration from the environment, read once into a plain, typed object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
# A webhook secret shorter than this is refused at start: GitHub's docs ask for "a random
# string with high entropy", and an HMAC key is only as strong as it is long. The
# generated default (embedded mode) is 64 hex characters.
MIN_SECRET_BYTES = 16
# The one driver the service is built and tested with.
DRIVER = "postgresql+psycopg2"


class ConfigError(Exception):
    """The environment does not describe a service that can start."""


def normalize_database_url(url: str) -> str:
    """Accept libpq-style `postgres://` URLs and pin the psycopg2 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


def database_url(raw: str) -> str:
    """DATABASE_URL normalized and checked: a PostgreSQL URL psycopg2 can use, else ConfigError.

    The message never repeats the URL: it may hold a password.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    example = "like postgresql://user:password@host:5432/dbname"
    url = normalize_database_url(raw)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"DATABASE_URL is not a database URL ({example})") from None
    except ValueError:
        raise ConfigError(f"DATABASE_URL has a port that is not a number ({example})") from None
    if parsed.drivername != DRIVER:
        raise ConfigError(
            f"DATABASE_URL must be a postgres:// or postgresql:// URL, not {parsed.drivername}:// ({example})"
        )
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ConfigError(f"DATABASE_URL has a port outside 1-65535 ({example})")
    return url


def _secrets(env: Mapping[str, str]) -> tuple[bytes, ...]:
    """The current webhook secret, then the previous one while it is set (rotation)."""
    current = env.get("GITHUB_WEBHOOK_SECRET", "")
    previous = env.get("GITHUB_WEBHOOK_SECRET_PREVIOUS", "")
    if current and len(current.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"GITHUB_WEBHOOK_SECRET is shorter than {MIN_SECRET_BYTES} bytes: use a long random one"
            " (e.g. `openssl rand -hex 32`), set in GitHub and here"
        )
    # A short previous secret is accepted: it is the one being rotated away from.
    return tuple(value.encode() for value in (current, previous) if value)


ISOLATION_LEVELS = ("READ COMMITTED", "REPEATABLE READ")


def _isolation(env: Mapping[str, str]) -> str:
    raw = " ".join(env.get("FLOWLENS_ISOLATION_LEVEL", "").replace("_", " ").upper().split())
    if not raw:
        return ISOLATION_LEVELS[0]
    if raw not in ISOLATION_LEVELS:
        raise ConfigError(f"FLOWLENS_ISOLATION_LEVEL must be one of {', '.join(ISOLATION_LEVELS)}, got {raw!r}")
    return raw


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


def _private_key(env: Mapping[str, str]) -> str | None:
    """GITHUB_APP_PRIVATE_KEY (PEM text), or the file GITHUB_APP_PRIVATE_KEY_FILE names."""
    text = env.get("GITHUB_APP_PRIVATE_KEY", "").strip()
    path = env.get("GITHUB_APP_PRIVATE_KEY_FILE", "").strip()
    if text:
        return text
    if not path:
        return None
    try:
        return Path(path).expanduser().read_text()
    except OSError as exc:
        raise ConfigError(f"GITHUB_APP_PRIVATE_KEY_FILE cannot be read: {exc.strerror}") from None


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
    # gzip the journaled bytes (PostgreSQL's TOAST and YugabyteDB's SST compression already do).
    journal_compression: bool = False
    # READ COMMITTED in production. REPEATABLE READ is snapshot isolation: what YugabyteDB
    # runs without yb_enable_read_committed_isolation, for testing that case on PostgreSQL.
    isolation_level: str = "READ COMMITTED"
    # Server-side PREPARE/EXECUTE: off behind a pooler that shares server sessions.
    prepared_statements: bool = True
    spool_dir: Path | None = None
    spool_max_bytes: int = 512 * MIB
    log_format: str = "json"
    log_level: str = "INFO"
    # Files enrichment: GitHub's REST API and a credential (an App, a token, or both).
    github_api_url: str = "https://api.github.com"
    github_token: str | None = field(default=None, repr=False)
    github_app_id: str | None = None
    github_app_private_key: str | None = field(default=None, repr=False)
    # The worker keeps this many requests of the primary rate limit for others.
    enrich_rate_reserve: int = 100
    # A claimed job is taken again by another worker once its lease runs out.
    enrich_lease_s: int = 120
    enrich_poll_s: float = 1.0
    enrich_max_attempts: int = 6

    @property
    def github_credentials(self) -> bool:
        """A GitHub credential is configured: the files worker can run."""
        return bool(self.github_token or (self.github_app_id and self.github_app_private_key))

    @property
    def spool_enabled(self) -> bool:
        """A spool size of 0 turns the spool off (503 while the database is down)."""
        return self.spool_dir is not None and self.spool_max_bytes > 0

    def check_service(self) -> None:
        """Raise ConfigError unless the web service can run with these settings (a database, a secret)."""
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set (the `serve` command starts an embedded database)")
        # A URL that cannot work fails at start, not on every delivery.
        database_url(self.database_url)
        if not self.secrets:
            raise ConfigError("GITHUB_WEBHOOK_SECRET is not set: refusing to accept unsigned deliveries")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the FlowLens environment variables (see the README's Configuration)."""
        env = os.environ if env is None else env
        secrets = _secrets(env)
        data_dir = Path(env.get("FLOWLENS_DATA_DIR") or ".flowlens").expanduser().resolve()
        spool = env.get("FLOWLENS_SPOOL_DIR")
        log_format = env.get("FLOWLENS_LOG_FORMAT", "json").strip().lower()
        if log_format not in ("json", "text"):
            raise ConfigError(f"FLOWLENS_LOG_FORMAT must be json or text, got {log_format!r}")
        url = env.get("DATABASE_URL", "").strip()
        app_id = env.get("GITHUB_APP_ID", "").strip() or None
        key = _private_key(env)
        if bool(app_id) != bool(key):
            raise ConfigError("a GitHub App needs both GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY (or _FILE)")
        return cls(
            database_url=database_url(url) if url else None,
            secrets=secrets,
            data_dir=data_dir,
            max_body_bytes=_int(env, "FLOWLENS_MAX_BODY_BYTES", 25 * MIB),
            statement_timeout_ms=_int(env, "FLOWLENS_STATEMENT_TIMEOUT_MS", 5000),
            pool_size=_int(env, "FLOWLENS_POOL_SIZE", 5),
            store_payloads=_bool(env, "FLOWLENS_JOURNAL_PAYLOADS", True),
            journal_compression=_bool(env, "FLOWLENS_JOURNAL_COMPRESSION", False),
            isolation_level=_isolation(env),
            prepared_statements=_bool(env, "FLOWLENS_PREPARED_STATEMENTS", True),
            spool_dir=Path(spool).expanduser().resolve() if spool else data_dir / "spool",
            spool_max_bytes=_int(env, "FLOWLENS_SPOOL_MAX_BYTES", 512 * MIB),
            log_format=log_format,
            log_level=env.get("FLOWLENS_LOG_LEVEL", "INFO").upper(),
            github_api_url=(env.get("GITHUB_API_URL", "").strip() or "https://api.github.com").rstrip("/"),
            github_token=env.get("GITHUB_TOKEN", "").strip() or None,
            github_app_id=app_id,
            github_app_private_key=key,
            enrich_rate_reserve=_int(env, "FLOWLENS_ENRICH_RATE_RESERVE", 100),
            enrich_lease_s=_int(env, "FLOWLENS_ENRICH_LEASE_S", 120),
            enrich_max_attempts=_int(env, "FLOWLENS_ENRICH_MAX_ATTEMPTS", 6),
        )
