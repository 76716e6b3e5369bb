"""Configuration: every setting declared once (its variable, default, range and why), read in one place.

Each field of `Settings` carries its declaration (`setting(...)`): the variable(s) it reads, the
reader that checks its range (environment.py), and the row docs/operating.md shows for it (the
Configuration tables are generated from these rows: `python -m flowlens_ingest.config`, and a test
keeps them equal). `Settings.from_env()` reads them all and raises ConfigError, one line naming the
variable and what it accepts, for any value outside its range. Every entry point turns that into
exit status 2 before anything starts. `unknown_variables()` names a FLOWLENS_* variable that is no
setting (a typo would otherwise be ignored in silence), with the nearest known name.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from flowlens_ingest.database_urls import database_url

# Raised by every reader; importers keep naming it config.ConfigError (an explicit re-export).
from flowlens_ingest.environment import ConfigError as ConfigError  # noqa: PLC0414
from flowlens_ingest.environment import (
    Reader,
    app_id,
    boolean,
    duration,
    http_url,
    one_of,
    path,
    token,
    whole,
)
from flowlens_ingest.files import read_regular_file
from flowlens_ingest.names import hook_path

KIB = 1024
MIB = 1024 * KIB
# A webhook secret shorter than this is refused at start: GitHub's docs ask for "a random
# string with high entropy", and an HMAC key is only as strong as it is long. The
# generated default (embedded mode) is 64 hex characters.
MIN_SECRET_BYTES = 16
# gunicorn processes: the bound catches a typo, not a choice (each holds a pool of connections).
WORKERS = (1, 256)
# FLOWLENS_* variables that are not settings of the service: the test suite's and the benchmark's.
NOT_SETTINGS = frozenset({"FLOWLENS_TEST_DATABASE_URL", "FLOWLENS_BENCH_ADMIN_URL"})

# The tables of docs/operating.md, Configuration, in their order.
WEBHOOK = "The webhook and the database"
PROCESSES = "Processes, logs and metrics"
GITHUB = "The files worker (GitHub)"
GROUPS = (WEBHOOK, PROCESSES, GITHUB)


@dataclass(frozen=True)
class Row:
    """A setting as docs/operating.md shows it: the variable(s), the default, what it accepts, what it means.

    Left out, `variable` is the setting's (first) variable and `default` its default value, both
    as code: `setting()` fills them in, so neither is written twice.
    """

    accepts: str
    meaning: str
    variable: str | None = None
    default: str | None = None


def _as_code(value: Any) -> str:
    """A default value as the docs show it: `true`, `20`, `INFO`."""
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


# Reads a setting from the environment and the settings read before it; UNSET keeps the field's default.
Read = Callable[[Mapping[str, str], dict[str, Any]], Any]
UNSET: Any = object()


@dataclass(frozen=True)
class Declared:
    """How one field is read: every variable it reads, the reading, its table and rows in the docs."""

    names: tuple[str, ...]
    read: Read
    group: str
    rows: tuple[Row, ...]


def _raw(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def reads(name: str, reader: Reader) -> Read:
    """Read one variable with `reader`; unset (or blank) keeps the default."""

    def read(env: Mapping[str, str], _: dict[str, Any]) -> Any:
        raw = _raw(env, name)
        return reader(name, raw) if raw else UNSET

    return read


def setting(
    default: Any = None,
    *,
    env: str | tuple[str, ...],
    group: str,
    rows: tuple[Row, ...] | Row | None = None,
    reader: Reader | None = None,
    read: Read | None = None,
    factory: Callable[[], Any] | None = None,
    repr: bool = True,
) -> Any:
    """A field of Settings with its declaration: `reader` for one variable, or `read` for anything more."""
    names = (env,) if isinstance(env, str) else env
    if read is None:
        assert reader is not None, "a setting needs a reader or a read"
        read = reads(names[0], reader)
    row_list = () if rows is None else (rows,) if isinstance(rows, Row) else rows
    row_list = tuple(
        replace(
            row,
            variable=f"`{names[0]}`" if row.variable is None else row.variable,
            default=_as_code(default) if row.default is None else row.default,
        )
        for row in row_list
    )
    metadata = {"declared": Declared(names, read, group, row_list)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=repr)
    return field(default=default, metadata=metadata, repr=repr)


# --- readers that need more than one variable, or the settings before them ----------------------


def _secrets(env: Mapping[str, str], _: dict[str, Any]) -> Any:
    """The current webhook secret, then the previous one while it is set (rotation)."""
    current = env.get("GITHUB_WEBHOOK_SECRET", "")
    previous = env.get("GITHUB_WEBHOOK_SECRET_PREVIOUS", "")
    if current and len(current.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"GITHUB_WEBHOOK_SECRET is shorter than {MIN_SECRET_BYTES} bytes: use a long random one"
            " (e.g. `openssl rand -hex 32`), set in GitHub and here"
        )
    # A short previous secret is accepted: it is the one being rotated away from.
    return tuple(value.encode() for value in (current, previous) if value) or UNSET


def _spool_max_bytes(env: Mapping[str, str], before: dict[str, Any]) -> Any:
    """0 (no spool), or room for at least one delivery of the largest size."""
    name = "FLOWLENS_SPOOL_MAX_BYTES"
    raw = _raw(env, name)
    if not raw:
        return UNSET
    try:
        value: int | None = int(raw)
    except ValueError:
        value = None
    largest = before.get("max_body_bytes", 25 * MIB)
    # Between 1 and the body limit the spool cannot take the largest deliveries: most
    # likely a unit slip (512 meant as MiB) that would turn the spool off unsaid.
    if value is None or (value != 0 and value < largest):
        raise ConfigError(
            f"{name} must be 0 (no spool) or a number of bytes from FLOWLENS_MAX_BODY_BYTES ({largest}) up, got {raw!r}"
        )
    return value


# An RSA key of 4,096 bits is about 3.2 KiB in PEM.
PRIVATE_KEY_MAX_BYTES = 64 * KIB


def _private_key(env: Mapping[str, str], _: dict[str, Any]) -> Any:
    """GITHUB_APP_PRIVATE_KEY (PEM text), or the file GITHUB_APP_PRIVATE_KEY_FILE names."""
    pem = _raw(env, "GITHUB_APP_PRIVATE_KEY")
    file = _raw(env, "GITHUB_APP_PRIVATE_KEY_FILE")
    if pem:
        return pem
    if not file:
        return UNSET
    try:
        # A PEM key is a few KiB; a FIFO or a device is never waited on.
        return read_regular_file(Path(file).expanduser(), PRIVATE_KEY_MAX_BYTES).decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"GITHUB_APP_PRIVATE_KEY_FILE cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("GITHUB_APP_PRIVATE_KEY_FILE is not a text (PEM) file") from None


def _webhooks(env: Mapping[str, str], _: dict[str, Any]) -> Any:
    """GITHUB_WEBHOOKS: comma-separated hook API paths, `repos/OWNER/REPO/hooks/ID` or `orgs/ORG/hooks/ID`."""
    entries = [entry.strip().strip("/") for entry in env.get("GITHUB_WEBHOOKS", "").split(",") if entry.strip()]
    for entry in entries:
        if hook_path(entry) is None:
            raise ConfigError(
                "GITHUB_WEBHOOKS must list hook API paths like repos/acme/app/hooks/123,orgs/acme/hooks/456;"
                f" got {entry[:100]!r}"
            )
    return tuple(entries) or UNSET


def _workers(env: Mapping[str, str], _: dict[str, Any]) -> Any:
    """FLOWLENS_WORKERS, else the platform's WEB_CONCURRENCY (Heroku's convention)."""
    name = "FLOWLENS_WORKERS" if _raw(env, "FLOWLENS_WORKERS") else "WEB_CONCURRENCY"
    raw = _raw(env, name)
    return whole(*WORKERS, "worker processes")(name, raw) if raw else UNSET


def _bind(env: Mapping[str, str], _: dict[str, Any]) -> Any:
    """FLOWLENS_BIND, else all addresses on the platform's PORT."""
    if _raw(env, "FLOWLENS_BIND"):
        return _raw(env, "FLOWLENS_BIND")
    port = _raw(env, "PORT")
    return f"0.0.0.0:{whole(1, 65535, 'a TCP port')('PORT', port)}" if port else UNSET


def _pool_size(env: Mapping[str, str], before: dict[str, Any]) -> Any:
    """FLOWLENS_POOL_SIZE, else a connection per thread plus one for the spool drainer."""
    raw = _raw(env, "FLOWLENS_POOL_SIZE")
    if raw:
        return whole(1, 100, "connections")("FLOWLENS_POOL_SIZE", raw)
    return before.get("threads", 4) + 1


def _spool_dir(env: Mapping[str, str], before: dict[str, Any]) -> Any:
    """FLOWLENS_SPOOL_DIR, else `spool` in the data folder."""
    raw = _raw(env, "FLOWLENS_SPOOL_DIR")
    return path("FLOWLENS_SPOOL_DIR", raw) if raw else before["data_dir"] / "spool"


def _default_workers() -> int:
    return min(WORKERS[1], (os.cpu_count() or 1) + 1)


def _data_dir() -> Path:
    return Path(".flowlens").resolve()


def _api_url(name: str, raw: str) -> str:
    url: str = http_url("https://HOST/api/v3")(name, raw)
    return url.rstrip("/")


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment, each value within its range (see `setting`)."""

    # --- the webhook and the database --------------------------------------------------------
    database_url: str | None = setting(
        env="DATABASE_URL",
        group=WEBHOOK,
        reader=lambda name, raw: database_url(raw),
        rows=Row(
            default="unset: embedded PostgreSQL",
            accepts="a `postgres://`/`postgresql://` URL (psycopg2) with a numeric port, or several hosts:"
            " `postgresql://U:P@/DB?host=h1:5432&host=h2:5432&target_session_attrs=read-write`, or libpq's"
            " `postgresql://U:P@h1:5432,h2:5432/DB?…` (read as the former); query options libpq knows",
            meaning="SQLAlchemy or libpq URL. A bad one is refused naming `DATABASE_URL`, never repeating the URL (a bad"
            " host list: with the query form to write, your hosts in it). Several hosts, PostgreSQL failover,"
            " YugabyteDB tservers: [deploying.md](deploying.md#the-database-url-one-host-or-several-postgresql-failover)",
        ),
    )
    secrets: tuple[bytes, ...] = setting(
        (),
        env=("GITHUB_WEBHOOK_SECRET", "GITHUB_WEBHOOK_SECRET_PREVIOUS"),
        group=WEBHOOK,
        read=_secrets,
        repr=False,
        rows=(
            Row(
                default="generated (64 hex characters) in embedded mode; required otherwise",
                accepts="at least 16 bytes (UTF-8)",
                meaning="the webhook secret",
            ),
            Row(
                variable="`GITHUB_WEBHOOK_SECRET_PREVIOUS`",
                default="unset",
                accepts="any",
                meaning="also accepted while set (rotation); may be shorter than 16 bytes, so a short secret can be"
                " rotated away from",
            ),
        ),
    )
    data_dir: Path = setting(
        env="FLOWLENS_DATA_DIR",
        group=WEBHOOK,
        reader=path,
        factory=_data_dir,
        rows=Row(
            default="`./.flowlens`",
            accepts="a folder this user can create and write (checked by `serve`, and by gunicorn for the folders it defaults)",
            meaning="embedded database, generated secret, default spool, metrics folders, `instances/<port>.json` of each"
            " running `serve`",
        ),
    )
    send_url: str | None = setting(
        env="FLOWLENS_URL",
        group=WEBHOOK,
        reader=http_url("http://127.0.0.1:8000/webhook"),
        rows=Row(
            default="unset",
            accepts="an `http://` or `https://` URL",
            meaning="where `send` posts (beats the instances recorded in `$FLOWLENS_DATA_DIR/instances/`)",
        ),
    )
    # GitHub caps payloads at 25 MB (https://docs.github.com/en/webhooks/webhook-events-and-payloads#payload-cap).
    max_body_bytes: int = setting(
        25 * MIB,
        env="FLOWLENS_MAX_BODY_BYTES",
        group=WEBHOOK,
        reader=whole(KIB, 25 * MIB, "bytes: 1 KiB to 25 MiB, GitHub's cap"),
        rows=Row(
            default="`26214400` (25 MiB)",
            accepts="`1024` (1 KiB) to `26214400` (25 MiB)",
            meaning="larger bodies get 413: from `Content-Length` before reading, a chunked one once it runs past the"
            " limit; `nginx-conf` prints it as `client_max_body_size`. Not above GitHub's own cap (GitHub sends"
            " nothing larger; a larger limit only lets an unsigned sender make a worker hold more). Not below"
            " 1 KiB: GitHub's smallest delivery, a ping, is ~2.7 KB, so such a value is a unit slip that would"
            " answer 413 to everything; `0` would also be *unlimited* to nginx",
        ),
    )
    statement_timeout_ms: int = setting(
        5000,
        env="FLOWLENS_STATEMENT_TIMEOUT_MS",
        group=WEBHOOK,
        reader=whole(100, 7000, "milliseconds"),
        rows=Row(
            accepts="`100` to `7000`",
            meaning="statement and lock timeout of every delivery. At most 7 s: the server gives up before the request's"
            " client-side database deadline (8 s), with time left to spool the delivery and answer inside"
            " GitHub's 10 s. `0` would turn the timeouts off (a delivery waits as long as a lock is held), a"
            " negative one is refused by PostgreSQL on every connection (every delivery spooled, the cause only"
            " in the server's log); under 100 ms ordinary lock waits of a burst would be cut",
        ),
    )
    # gunicorn (gunicorn_conf): threads per worker; read before the pool, whose default follows it.
    threads: int = setting(
        4,
        env="FLOWLENS_THREADS",
        group=PROCESSES,
        reader=whole(1, 64, "threads"),
        rows=Row(
            accepts="`1` to `64`",
            meaning="threads per worker, each with a pooled connection",
        ),
    )
    # gunicorn threads (4) plus the spool drainer: a request never waits for a connection.
    pool_size: int = setting(
        5,
        env="FLOWLENS_POOL_SIZE",
        group=WEBHOOK,
        read=_pool_size,
        rows=Row(
            default="`FLOWLENS_THREADS` + 1 (5)",
            accepts="`1` to `100`",
            meaning="connections per process: one per thread plus one for the spool drainer. At most PostgreSQL's"
            " default `max_connections`",
        ),
    )
    store_payloads: bool = setting(
        True,
        env="FLOWLENS_JOURNAL_PAYLOADS",
        group=WEBHOOK,
        reader=boolean,
        rows=Row(
            accepts="`true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`)",
            meaning="keep each delivery's payload in the journal (failed ones always are)",
        ),
    )
    journal_compression: bool = setting(
        False,
        env="FLOWLENS_JOURNAL_COMPRESSION",
        group=WEBHOOK,
        reader=boolean,
        rows=Row(
            accepts="`true`/`false`",
            meaning="gzip the journaled bytes (TOAST and YugabyteDB's files compress them already: see"
            " [reliability.md](reliability.md#the-journal))",
        ),
    )
    # REPEATABLE READ is snapshot isolation: what YugabyteDB runs without yb_enable_read_committed_isolation.
    isolation_level: str = setting(
        "READ COMMITTED",
        env="FLOWLENS_ISOLATION_LEVEL",
        group=WEBHOOK,
        reader=one_of("READ COMMITTED", "REPEATABLE READ"),
        rows=Row(
            accepts="`READ COMMITTED`, `REPEATABLE READ` (any case, `_` for the space)",
            meaning="`REPEATABLE READ` reproduces YugabyteDB's snapshot isolation on PostgreSQL (tests, capacity checks)",
        ),
    )
    prepared_statements: bool = setting(
        True,
        env="FLOWLENS_PREPARED_STATEMENTS",
        group=WEBHOOK,
        reader=boolean,
        rows=Row(
            accepts="`true`/`false`",
            meaning="PREPARE each statement once per database session; `false` behind a pooler that shares server"
            " sessions between clients (PgBouncer in transaction mode)",
        ),
    )
    # None (no spool) when Settings are made in code without one; from the environment, always a folder.
    spool_dir: Path | None = setting(
        env="FLOWLENS_SPOOL_DIR",
        group=WEBHOOK,
        read=_spool_dir,
        rows=Row(
            default="`$FLOWLENS_DATA_DIR/spool`",
            accepts="a folder this user can create and write (made at start)",
            meaning="where deliveries wait while the database is down",
        ),
    )
    spool_max_bytes: int = setting(
        512 * MIB,
        env="FLOWLENS_SPOOL_MAX_BYTES",
        group=WEBHOOK,
        read=_spool_max_bytes,
        rows=Row(
            default="`536870912` (512 MiB)",
            accepts="`0`, or `FLOWLENS_MAX_BODY_BYTES` and up",
            meaning="spool bound, deliveries set aside (`*.unusable`) included (across workers, may be passed"
            " by about a second of traffic: see [reliability.md](reliability.md#database-outages-and-the-spool)); `0` turns the spool off (503"
            " instead). Between 1 and the body limit the spool could not take the largest deliveries: most"
            " likely a unit slip (`512` meant as MiB), refused",
        ),
    )

    # --- processes, logs and metrics -----------------------------------------------------------
    log_format: str = setting(
        "json",
        env="FLOWLENS_LOG_FORMAT",
        group=PROCESSES,
        reader=one_of("json", "text"),
        rows=Row(
            accepts="`json` (one object per line), `text`",
            meaning="see [Logs](#logs)",
        ),
    )
    log_level: str = setting(
        "INFO",
        env="FLOWLENS_LOG_LEVEL",
        group=PROCESSES,
        reader=one_of("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        rows=Row(
            accepts="`DEBUG`, `INFO`, `WARNING`, `ERROR`, `CRITICAL` (any case)",
            meaning="the service's and gunicorn's; `DEBUG` also shows the traceback of an unexpected error in a command",
        ),
    )
    workers: int = setting(
        env=("FLOWLENS_WORKERS", "WEB_CONCURRENCY"),
        group=PROCESSES,
        read=_workers,
        factory=_default_workers,
        rows=Row(
            variable="`FLOWLENS_WORKERS` (else `WEB_CONCURRENCY`)",
            default="cores + 1 (at most 256)",
            accepts="`1` to `256`",
            meaning="gunicorn gthread workers; `serve --workers` beats both. The bound catches a typo: each worker"
            " holds a pool of connections",
        ),
    )
    # A stopping worker finishes what it holds: at least one whole delivery (GitHub's 10 s).
    graceful_timeout_s: int = setting(
        20,
        env="FLOWLENS_GRACEFUL_TIMEOUT",
        group=PROCESSES,
        reader=whole(10, 300, "seconds"),
        rows=Row(
            accepts="`10` to `300` (seconds)",
            meaning="seconds a stopping worker has to finish its deliveries: at least one whole delivery (GitHub's"
            " 10 s); beyond 5 minutes a deploy waits on a stuck worker",
        ),
    )
    # A worker serving ordinary deliveries holds 60-70 MB; 1 recycles after every large one (memory.py).
    recycle_above_mb: int = setting(
        256,
        env="FLOWLENS_RECYCLE_ABOVE_MB",
        group=PROCESSES,
        reader=whole(1, 65536, "MB"),
        rows=Row(
            accepts="`1` to `65536` (MB)",
            meaning="a worker still this large (resident) once a large delivery (over 1 MiB) is done is recycled"
            " gracefully: it finishes what it holds and gunicorn forks a fresh one (see"
            " [reliability.md](reliability.md#memory)); `1` recycles after every large delivery",
        ),
    )
    # The Procfile's web process listens on all addresses, on the platform's PORT.
    bind: str = setting(
        "0.0.0.0:8000",
        env=("FLOWLENS_BIND", "PORT"),
        group=PROCESSES,
        read=_bind,
        rows=Row(
            variable="`FLOWLENS_BIND` / `PORT`",
            default="`0.0.0.0:$PORT` (8000)",
            accepts="`FLOWLENS_BIND`: gunicorn's bind syntax (checked by gunicorn); `PORT`: `1` to `65535`",
            meaning="gunicorn bind for the Procfile",
        ),
    )
    # Where gunicorn's workers sum their metrics; None: one folder per port in the data folder.
    metrics_dir: Path | None = setting(
        env="PROMETHEUS_MULTIPROC_DIR",
        group=PROCESSES,
        reader=path,
        rows=Row(
            default="`$FLOWLENS_DATA_DIR/metrics/<port>`",
            accepts="a folder this user can create and write (made at start)",
            meaning="where this instance's workers' metric files are summed; emptied at start, locked for the"
            " instance's life (a second instance on the same folder is refused in one line)",
        ),
    )

    # --- the files worker and recovery (GitHub) -----------------------------------------------
    github_api_url: str = setting(
        "https://api.github.com",
        env="GITHUB_API_URL",
        group=GITHUB,
        reader=_api_url,
        rows=Row(
            accepts="an `http://` or `https://` URL",
            meaning="GitHub's REST API; GitHub Enterprise Server: `https://HOST/api/v3`",
        ),
    )
    github_token: str | None = setting(
        env="GITHUB_TOKEN",
        group=GITHUB,
        reader=token,
        repr=False,
        rows=Row(
            default="unset",
            accepts="printable ASCII, no spaces",
            meaning="a token for the files worker (fine-grained: *Pull requests: read*, plus *Contents: read* for"
            " private repositories)",
        ),
    )
    github_app_id: str | None = setting(
        env="GITHUB_APP_ID",
        group=GITHUB,
        reader=app_id,
        rows=Row(
            variable="`GITHUB_APP_ID`, `GITHUB_APP_PRIVATE_KEY` or `GITHUB_APP_PRIVATE_KEY_FILE`",
            default="unset",
            accepts="both or neither; the App's id (digits) or client ID, an unencrypted RSA key in PEM (checked by"
            " `serve` and `enrich`), a file this user can read",
            meaning="a GitHub App for the files worker (PEM text or a file); installation tokens for the"
            " `installation.id` each delivery carries",
        ),
    )
    github_app_private_key: str | None = setting(
        env=("GITHUB_APP_PRIVATE_KEY", "GITHUB_APP_PRIVATE_KEY_FILE"),
        group=GITHUB,
        read=_private_key,
        repr=False,
    )
    # A reserve of a token's whole primary limit (5,000 an hour) or more would never let it fetch.
    enrich_rate_reserve: int = setting(
        100,
        env="FLOWLENS_ENRICH_RATE_RESERVE",
        group=GITHUB,
        reader=whole(0, 4999, "requests"),
        rows=Row(
            accepts="`0` to `4999`",
            meaning="per credential (each App installation, the token): when fewer requests than this remain in its"
            " primary limit, the files worker reschedules that credential's jobs to its reset without a request"
            " (other credentials go on), and `backfill` waits for the reset. Below a token's hourly 5,000, or the"
            " worker would never fetch",
        ),
    )
    enrich_lease_s: int = setting(
        120,
        env="FLOWLENS_ENRICH_LEASE_S",
        group=GITHUB,
        reader=whole(30, 3600, "seconds"),
        rows=Row(
            accepts="`30` to `3600` (seconds)",
            meaning="how long a worker holds a claimed job; a crashed worker's job is taken again after it. At least a"
            " few GitHub requests (10 s timeout each), at most an hour of waiting for a crashed worker's job",
        ),
    )
    enrich_max_attempts: int = setting(
        6,
        env="FLOWLENS_ENRICH_MAX_ATTEMPTS",
        group=GITHUB,
        reader=whole(1, 20, "attempts"),
        rows=Row(
            accepts="`1` to `20`",
            meaning="fetches of one head that fail (5xx, timeouts) before it is settled `failed`; with backoff capped at"
            " 15 minutes, 20 attempts already span over 3 hours",
        ),
    )
    github_webhooks: tuple[str, ...] = setting(
        (),
        env="GITHUB_WEBHOOKS",
        group=GITHUB,
        read=_webhooks,
        rows=Row(
            default="unset",
            accepts="comma-separated hook API paths, `repos/OWNER/REPO/hooks/ID` or `orgs/ORG/hooks/ID`",
            meaning="repository and organization hooks whose delivery logs `recover` and the scheduled pass read,"
            " besides those the journal has seen (needs `GITHUB_TOKEN` with admin of the hook: fine-grained"
            " *Webhooks: read and write*, repository or organization, classic `admin:repo_hook` /"
            " `admin:org_hook`; a fine-grained token reaches one owner's hooks, several owners need the App:"
            " [recovering.md](recovering.md#credentials-and-permissions))",
        ),
    )
    # GitHub keeps delivery logs 3 days: a pass at least daily leaves two passes' worth of margin.
    recover_every_s: int = setting(
        600,
        env="FLOWLENS_RECOVER_EVERY",
        group=GITHUB,
        reader=duration(60, 86400),
        rows=Row(
            default="`10m`",
            accepts="`0` (off) or a duration from `1m` to `24h` (`90s`, `10m`, `1h`)",
            meaning="how often the files worker runs a recovery pass (one worker across all VMs); a day at most, so a"
            " pass never risks GitHub's 3-day log retention",
        ),
    )
    # How often the files worker looks for due jobs (not an environment setting).
    enrich_poll_s: float = 1.0

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
        """Read and check every declared variable, in declaration order (see docs/operating.md, Configuration)."""
        env = os.environ if env is None else env
        for name in sorted(known_variables()):
            # Bytes the environment could not decode come as lone surrogates: refused here, by name,
            # rather than met as an encoding error wherever the value is first used.
            try:
                env.get(name, "").encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"{name} is not valid UTF-8 text") from None
        values: dict[str, Any] = {}
        for item in fields(cls):
            declared = _declared(item)
            if declared is None:
                continue
            value = declared.read(env, values)
            values[item.name] = _default(item) if value is UNSET else value
        if bool(values["github_app_id"]) != bool(values["github_app_private_key"]):
            raise ConfigError("a GitHub App needs both GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY (or _FILE)")
        return cls(**values)


def _declared(item: Field[Any]) -> Declared | None:
    declared = item.metadata.get("declared")
    return declared if isinstance(declared, Declared) else None


def _default(item: Field[Any]) -> Any:
    return item.default if item.default_factory is MISSING else item.default_factory()


def declarations() -> list[Declared]:
    """Every setting's declaration, in order."""
    return [declared for item in fields(Settings) if (declared := _declared(item)) is not None]


def known_variables() -> frozenset[str]:
    """Every environment variable a setting reads."""
    return frozenset(name for declared in declarations() for name in declared.names)


def unknown_names(env: Mapping[str, str] | None = None) -> list[str]:
    """The FLOWLENS_* variables of `env` that are no setting (a typo, or one a newer release reads)."""
    env = os.environ if env is None else env
    known = known_variables() | NOT_SETTINGS
    return sorted(name for name in env if name.startswith("FLOWLENS_") and name not in known)


def unknown_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """A line for each FLOWLENS_* variable that is no setting, naming the nearest known one."""
    # Compared without the prefix every one shares, which would make any two look alike.
    known = sorted(name.removeprefix("FLOWLENS_") for name in known_variables() if name.startswith("FLOWLENS_"))
    lines = []
    for name in unknown_names(env):
        nearest = difflib.get_close_matches(name.removeprefix("FLOWLENS_"), known, n=1, cutoff=0.6)
        hint = f" (did you mean FLOWLENS_{nearest[0]}?)" if nearest else ""
        lines.append(f"{name} is not a setting and is ignored{hint}")
    return lines


def markdown_table(group: str) -> str:
    """docs/operating.md's table of one group of settings, generated from the declarations."""
    lines = ["| variable | default | accepts | meaning |", "| --- | --- | --- | --- |"]
    for declared in declarations():
        if declared.group == group:
            lines += [f"| {r.variable} | {r.default} | {r.accepts} | {r.meaning} |" for r in declared.rows]
    return "\n".join(lines)


# --- folders and instances ---------------------------------------------------------------------


def writable_directory(folder: Path, name: str) -> None:
    """Create `folder` if need be; ConfigError naming `name` unless this process can write in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{name} must be a folder this user can write; {folder} cannot be made: {exc.strerror}"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} must be a folder this user can write; {folder} is not writable")


def child_environment(**overrides: str) -> dict[str, str]:
    """This process's environment with `overrides` set: what a child process (gunicorn, psql, the files worker) gets."""
    return {**os.environ, **overrides}


def instance_name(address: str) -> str:
    """A folder name for one instance: its port (or the whole address, e.g. a unix socket)."""
    port = address.rsplit(":", 1)[-1]
    return port if port.isdigit() else re.sub(r"[^A-Za-z0-9_.-]", "_", address)


if __name__ == "__main__":
    # `python -m flowlens_ingest.config`: the Configuration tables of docs/operating.md.
    for group in GROUPS:
        print(f"### {group}\n\n{markdown_table(group)}\n")
