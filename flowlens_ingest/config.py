"""Configuration: the one place the environment is read, each value checked against its range.

`Settings.from_env()` reads every variable the service knows (docs/operating.md, Configuration
lists them, with their ranges) and raises ConfigError, one line naming the variable and
what it accepts, for any value outside its range. Every entry point turns that into exit
status 2 before anything starts: the command line's main(), and gunicorn_conf in
gunicorn's master, before a worker is forked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Raised by every reader; importers keep naming it config.ConfigError (an explicit re-export).
from flowlens_ingest.environment import ConfigError as ConfigError  # noqa: PLC0414
from flowlens_ingest.environment import (
    bool_value,
    choice,
    duration_s,
    http_url,
    int_value,
    path_value,
)

KIB = 1024
MIB = 1024 * KIB
# A webhook secret shorter than this is refused at start: GitHub's docs ask for "a random
# string with high entropy", and an HMAC key is only as strong as it is long. The
# generated default (embedded mode) is 64 hex characters.
MIN_SECRET_BYTES = 16
# Where gunicorn's master leaves what it said about the database at start, for its workers
# (Settings.said_at_start): they do not say it again, once each.
SAID_AT_START = "FLOWLENS_SAID_AT_START"
# The one driver the service is built and tested with.
DRIVER = "postgresql+psycopg2"

# --- ranges ---------------------------------------------------------------------------------------
# Each is chosen so that no value can break an answer within GitHub's 10 s, let a body past
# GitHub's cap, or start a service that fails every delivery. docs/operating.md's Configuration
# repeats them.

# Statement and lock timeout of every delivery. The server must give up before the client
# does (the request's database deadline is 8 s), leaving time to spool the delivery and
# answer inside GitHub's 10 s. PostgreSQL reads 0 as "no timeout" (a delivery then waits
# as long as a lock is held) and refuses a negative one on every connection; under 100 ms
# a lock wait of an ordinary burst would already be cut.
STATEMENT_TIMEOUT_MS = (100, 7000)
# GitHub caps payloads at 25 MB (https://docs.github.com/en/webhooks/webhook-events-and-payloads#payload-cap):
# a larger limit only lets an unsigned sender make a worker hold more before the signature
# is checked. GitHub's smallest delivery (a ping) is ~2.7 KB: under 1 KiB every delivery
# would get 413, a unit slip (25 meant as MiB) rather than a choice. 0 would be "refuse
# everything" here and "unlimited" in nginx's client_max_body_size.
MAX_BODY_BYTES = (KIB, 25 * MIB)
# Connections per worker process. A pool of 0 can serve nothing; PostgreSQL's default
# max_connections is 100, so one process's pool can never usefully be larger.
POOL_SIZE = (1, 100)
# gunicorn processes and threads per process. The upper bounds catch a typo, not a choice:
# every thread holds a pooled connection, so workers x (threads + 1) is what one VM asks of
# the database.
WORKERS = (1, 256)
THREADS = (1, 64)
# A stopping worker finishes what it holds: at least one whole delivery (GitHub's 10 s);
# beyond 5 min a deploy waits on a worker that is stuck, not busy.
GRACEFUL_TIMEOUT_S = (10, 300)
# A worker still above this after a large delivery is recycled (memory.py): 1 recycles after
# every one; a worker serving ordinary deliveries holds 60-70 MB.
RECYCLE_ABOVE_MB = (1, 65536)
PORT = (1, 65535)
# The files worker. A reserve of a token's whole primary limit (5,000 an hour) or more
# would never let it fetch; a lease shorter than a few GitHub requests (10 s timeout each)
# has a second worker take a job the first is still working; an hour is the longest a
# crashed worker's job should wait. With backoff capped at 15 min, 20 attempts retry a head
# for over 3 hours.
ENRICH_RATE_RESERVE = (0, 4999)
ENRICH_LEASE_S = (30, 3600)
ENRICH_MAX_ATTEMPTS = (1, 20)
# A scheduled recovery pass every 0 (off) or 1 minute to 1 day: GitHub keeps delivery logs 3 days,
# so a day still leaves two passes' worth of margin; under a minute is a unit slip (10 meant as 10m).
RECOVER_EVERY_S = (60, 86400)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text")
ISOLATION_LEVELS = ("READ COMMITTED", "REPEATABLE READ")


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


# --- one reader per kind of value -----------------------------------------------------------------


def _spool_max_bytes(env: Mapping[str, str], max_body_bytes: int) -> int:
    """0 (no spool), or room for at least one delivery of the largest size."""
    name = "FLOWLENS_SPOOL_MAX_BYTES"
    raw = env.get(name, "").strip()
    if not raw:
        return 512 * MIB
    try:
        value: int | None = int(raw)
    except ValueError:
        value = None
    # Between 1 and the body limit the spool cannot take the largest deliveries: most
    # likely a unit slip (512 meant as MiB) that would turn the spool off unsaid.
    if value is None or (value != 0 and value < max_body_bytes):
        raise ConfigError(
            f"{name} must be 0 (no spool) or a number of bytes from FLOWLENS_MAX_BODY_BYTES"
            f" ({max_body_bytes}) up, got {raw!r}"
        )
    return value


def writable_directory(path: Path, name: str) -> None:
    """Create the folder `path` if need be; ConfigError naming `name` unless this process can write in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{name} must be a folder this user can write; {path} cannot be made: {exc.strerror}"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} must be a folder this user can write; {path} is not writable")


def child_environment(**overrides: str) -> dict[str, str]:
    """This process's environment with `overrides` set: what a child process (gunicorn, psql, the files worker) gets."""
    return {**os.environ, **overrides}


def instance_name(address: str) -> str:
    """A folder name for one instance: its port (or the whole address, e.g. a unix socket)."""
    port = address.rsplit(":", 1)[-1]
    return port if port.isdigit() else re.sub(r"[^A-Za-z0-9_.-]", "_", address)


_HOOK_PATH = re.compile(r"(?:repos/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+|orgs/[A-Za-z0-9_.-]+)/hooks/(?P<id>[0-9]{1,18})")


def configured_hook(path: str) -> tuple[str, int] | None:
    """A GITHUB_WEBHOOKS entry (`repos/O/R/hooks/ID` or `orgs/O/hooks/ID`) as (path, hook id); None if not one."""
    match = _HOOK_PATH.fullmatch(path.strip().strip("/"))
    if match is None or any(not part.strip(".") for part in match.group(0).split("/")):
        return None  # `.` or `..` as a name would walk the URL path
    return match.group(0), int(match["id"])


def _webhooks(env: Mapping[str, str]) -> tuple[str, ...]:
    """GITHUB_WEBHOOKS: comma-separated hook API paths, `repos/OWNER/REPO/hooks/ID` or `orgs/ORG/hooks/ID`."""
    entries = [entry.strip().strip("/") for entry in env.get("GITHUB_WEBHOOKS", "").split(",") if entry.strip()]
    for entry in entries:
        if configured_hook(entry) is None:
            raise ConfigError(
                "GITHUB_WEBHOOKS must list hook API paths like repos/acme/app/hooks/123,orgs/acme/hooks/456;"
                f" got {entry[:100]!r}"
            )
    return tuple(entries)


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


def _default_workers() -> int:
    return min(WORKERS[1], (os.cpu_count() or 1) + 1)


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment, each value within its range."""

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
    # What gunicorn's master said about the database at start (FLOWLENS_SAID_AT_START, set by
    # gunicorn_conf for its workers): the workers do not say it again, once each.
    said_at_start: str | None = None
    # gunicorn (gunicorn_conf): gthread workers, their threads, the address, the time a
    # stopping worker has to finish its deliveries.
    workers: int = field(default_factory=_default_workers)
    threads: int = 4
    # The Procfile's web process listens on all addresses, on the platform's PORT.
    bind: str = "0.0.0.0:8000"
    graceful_timeout_s: int = 20
    recycle_above_mb: int = 256
    # Where gunicorn's workers sum their metrics (PROMETHEUS_MULTIPROC_DIR); None: not set.
    metrics_dir: Path | None = None
    # Where `send` posts (FLOWLENS_URL).
    send_url: str | None = None
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
    # Recovery: hooks to read besides those the journal has seen, and the scheduled pass's interval (0: off).
    github_webhooks: tuple[str, ...] = ()
    recover_every_s: int = 600

    @property
    def github_credentials(self) -> bool:
        """A GitHub credential is configured: the files worker can run."""
        return bool(self.github_token or (self.github_app_id and self.github_app_private_key))

    @property
    def spool_enabled(self) -> bool:
        """A spool size of 0 turns the spool off (503 while the database is down)."""
        return self.spool_dir is not None and self.spool_max_bytes > 0

    def metrics_folder(self, bind: str) -> Path:
        """Where this instance's workers sum their metrics: PROMETHEUS_MULTIPROC_DIR, else one folder per port."""
        return self.metrics_dir or self.data_dir / "metrics" / instance_name(bind)

    def check_service(self) -> None:
        """Raise ConfigError unless the web service can run with these settings (a database, a secret)."""
        if not self.database_url:
            raise ConfigError("DATABASE_URL is not set (the `serve` command starts an embedded database)")
        # A URL that cannot work fails at start, not on every delivery.
        database_url(self.database_url)
        if not self.secrets:
            raise ConfigError("GITHUB_WEBHOOK_SECRET is not set: refusing to accept unsigned deliveries")

    def check_folders(self, bind: str) -> None:
        """Create the metrics and spool folders of the service on `bind`, or raise ConfigError naming the variable."""
        metrics = "PROMETHEUS_MULTIPROC_DIR" if self.metrics_dir else "FLOWLENS_DATA_DIR"
        writable_directory(self.metrics_folder(bind), metrics)
        if self.spool_dir is not None and self.spool_enabled:
            writable_directory(self.spool_dir, "FLOWLENS_SPOOL_DIR")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check the FlowLens environment variables (see docs/operating.md, Configuration)."""
        env = os.environ if env is None else env
        secrets = _secrets(env)
        data_dir = path_value(env, "FLOWLENS_DATA_DIR") or Path(".flowlens").resolve()
        url = env.get("DATABASE_URL", "").strip()
        app_id = env.get("GITHUB_APP_ID", "").strip() or None
        key = _private_key(env)
        if bool(app_id) != bool(key):
            raise ConfigError("a GitHub App needs both GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY (or _FILE)")
        max_body_bytes = int_value(
            env, "FLOWLENS_MAX_BODY_BYTES", 25 * MIB, MAX_BODY_BYTES, "bytes: 1 KiB to 25 MiB, GitHub's cap"
        )
        threads = int_value(env, "FLOWLENS_THREADS", 4, THREADS, "threads")
        # FLOWLENS_WORKERS, else the platform's WEB_CONCURRENCY (Heroku's convention).
        workers = "FLOWLENS_WORKERS" if env.get("FLOWLENS_WORKERS", "").strip() else "WEB_CONCURRENCY"
        port = int_value(env, "PORT", 8000, PORT, "a TCP port")
        api_url = http_url(env, "GITHUB_API_URL", "https://HOST/api/v3") or "https://api.github.com"
        return cls(
            database_url=database_url(url) if url else None,
            secrets=secrets,
            data_dir=data_dir,
            max_body_bytes=max_body_bytes,
            statement_timeout_ms=int_value(
                env, "FLOWLENS_STATEMENT_TIMEOUT_MS", 5000, STATEMENT_TIMEOUT_MS, "milliseconds"
            ),
            # A connection per thread plus one for the spool drainer: with fewer, a request
            # waits for a connection and, after the pool's timeout, is spooled for nothing.
            pool_size=int_value(env, "FLOWLENS_POOL_SIZE", threads + 1, POOL_SIZE, "connections"),
            store_payloads=bool_value(env, "FLOWLENS_JOURNAL_PAYLOADS", True),
            journal_compression=bool_value(env, "FLOWLENS_JOURNAL_COMPRESSION", False),
            isolation_level=choice(env, "FLOWLENS_ISOLATION_LEVEL", ISOLATION_LEVELS, "READ COMMITTED"),
            prepared_statements=bool_value(env, "FLOWLENS_PREPARED_STATEMENTS", True),
            spool_dir=path_value(env, "FLOWLENS_SPOOL_DIR") or data_dir / "spool",
            spool_max_bytes=_spool_max_bytes(env, max_body_bytes),
            log_format=choice(env, "FLOWLENS_LOG_FORMAT", LOG_FORMATS, "json"),
            log_level=choice(env, "FLOWLENS_LOG_LEVEL", LOG_LEVELS, "INFO"),
            said_at_start=env.get(SAID_AT_START) or None,
            workers=int_value(env, workers, _default_workers(), WORKERS, "worker processes"),
            threads=threads,
            bind=env.get("FLOWLENS_BIND", "").strip() or f"0.0.0.0:{port}",
            graceful_timeout_s=int_value(env, "FLOWLENS_GRACEFUL_TIMEOUT", 20, GRACEFUL_TIMEOUT_S, "seconds"),
            recycle_above_mb=int_value(env, "FLOWLENS_RECYCLE_ABOVE_MB", 256, RECYCLE_ABOVE_MB, "MB"),
            metrics_dir=path_value(env, "PROMETHEUS_MULTIPROC_DIR"),
            send_url=http_url(env, "FLOWLENS_URL", "http://127.0.0.1:8000/webhook"),
            github_api_url=api_url.rstrip("/"),
            github_token=env.get("GITHUB_TOKEN", "").strip() or None,
            github_app_id=app_id,
            github_app_private_key=key,
            enrich_rate_reserve=int_value(env, "FLOWLENS_ENRICH_RATE_RESERVE", 100, ENRICH_RATE_RESERVE, "requests"),
            enrich_lease_s=int_value(env, "FLOWLENS_ENRICH_LEASE_S", 120, ENRICH_LEASE_S, "seconds"),
            enrich_max_attempts=int_value(env, "FLOWLENS_ENRICH_MAX_ATTEMPTS", 6, ENRICH_MAX_ATTEMPTS, "attempts"),
            github_webhooks=_webhooks(env),
            recover_every_s=duration_s(env, "FLOWLENS_RECOVER_EVERY", 600, RECOVER_EVERY_S),
        )
