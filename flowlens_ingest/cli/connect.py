"""What the commands stand on: the settings, the GitHub client, and the database they open (never made, never migrated)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from flowlens_ingest.cli.output import NOT_DONE, fail
from flowlens_ingest.config import ConfigError, Settings

if TYPE_CHECKING:
    from flowlens_ingest.github.client import GitHubClient
    from flowlens_ingest.store.database import Database


# One read of an HTTP answer's body takes at most this much at a time.
_CHUNK = 64 * 1024


def read_answer(response: Any, max_bytes: int, seconds: float) -> tuple[bytes, bool]:
    """An HTTP answer's body, read a chunk at a time: at most `max_bytes` (and whether there was
    more); TimeoutError once `seconds` have passed.

    urllib's timeout bounds each socket wait, not the whole: a server that trickles its answer
    a byte at a time, or never ends it, would hold a command without end. Checked between reads,
    so the whole ends within `seconds` plus one socket wait.
    """
    ends = time.monotonic() + seconds
    read = getattr(response, "read1", response.read)
    chunks: list[bytes] = []
    size = 0
    while size <= max_bytes:
        if time.monotonic() > ends:
            raise TimeoutError(f"the answer did not end within {seconds:g} s")
        chunk = read(min(_CHUNK, max_bytes + 1 - size))
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:max_bytes], True


class NoDatabase(Exception):
    """An operator command found no usable database (none, unreachable, or not migrated): exit NOT_DONE."""


def load_settings() -> Settings:
    """The environment's settings (ConfigError, one line and exit 2, for a value out of range)."""
    return Settings.from_env()


def github_client(settings: Settings, database: Database | None) -> GitHubClient:
    """The GitHub client of a command (rate-limit waits shared through `database`); ConfigError naming the variable when the App's key is unusable.

    `database` is required: a client that sends without it neither sees the waits other
    processes were told nor tells them its own. None only for a client that sends nothing.
    """
    from flowlens_ingest.github.enrich import client_for

    try:
        return client_for(settings, database)
    except ValueError as exc:  # the key: Settings has checked everything else the client takes
        raise ConfigError(f"GITHUB_APP_PRIVATE_KEY (or _FILE): {exc}") from None


# --- operator commands ----------------------------------------------------------------------


def require_embedded(settings: Settings) -> None:
    """NoDatabase, saying what to do, when DATABASE_URL is unset and FLOWLENS_DATA_DIR holds no embedded database."""
    if not (settings.data_dir / "pgdata").is_dir():
        raise NoDatabase(
            f"no database: DATABASE_URL is not set and FLOWLENS_DATA_DIR ({settings.data_dir}) holds no"
            " embedded database: run `flowlens-ingest serve` first (it makes one there), or set"
            " FLOWLENS_DATA_DIR to the folder `serve` ran in, or DATABASE_URL"
        )


def database_label(settings: Settings) -> str:
    """Where the command's database is, for a message: `at HOST:PORT/DB (DATABASE_URL)` or the embedded folder."""
    from flowlens_ingest.store import reachable

    if settings.database_url:
        return reachable.where(settings.database_url)
    return f"embedded in {settings.data_dir / 'pgdata'}"


def unavailable(settings: Settings, exc: BaseException, then: str = "") -> int:
    """Say why the database could not be used (the cause and the next step), and `then`; exit NOT_DONE."""
    from flowlens_ingest.store import reachable

    line = reachable.unavailable(exc).line(database_label(settings))
    return fail(f"{line}{'; ' + then if then else ''}", NOT_DONE)


def connect(settings: Settings, application_name: str) -> tuple[Database, object | None]:
    """The command's database, not yet asked anything; and the embedded server kept running for it, if any.

    DATABASE_URL, or else the embedded database `serve` made in FLOWLENS_DATA_DIR (NoDatabase, saying
    what to do, when there is none: a command never makes one).
    """
    from flowlens_ingest.store.database import Database

    server = None
    url = settings.database_url
    if not url:
        require_embedded(settings)
        from flowlens_ingest.postgres import embedded

        # Its keeper stops it once no command uses it any more (postgres/embedded.py).
        server, url = embedded.start(settings.data_dir, create=False)
    return Database(settings, url, application_name=application_name), server


def open_database(settings: Settings) -> tuple[Database, object | None]:
    """The database of an operator command: DATABASE_URL, or the embedded database `serve` made.

    Never a new embedded database, and never a migration: run from the wrong folder,
    a new database would list an empty journal as if nothing had been received, and
    migrating is `db upgrade`'s job, not a side effect of reading.
    """
    import sqlalchemy as sa

    from flowlens_ingest.store import migrate, reachable
    from flowlens_ingest.store.database import DatabaseUnavailable

    database, server = connect(settings, "flowlens-ingest-admin")
    try:
        with database.bounded():
            problem = migrate.pending(database.engine)
    except (sa.exc.SQLAlchemyError, DatabaseUnavailable) as exc:
        raise NoDatabase(reachable.unavailable(exc).line(database_label(settings))) from None
    if problem:
        raise NoDatabase(problem)
    return database, server
