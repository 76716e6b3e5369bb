"""The one place that wires the database to the app: a per-process engine and the retry loop."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any, Callable, TypeVar

import psycopg2
import sqlalchemy as sa
from flask import Flask, current_app
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from .config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATEs after which the whole transaction is safe to run again: YugabyteDB
# raises them far more often than PostgreSQL (conflicts, leader moves, restarts).
# https://docs.yugabyte.com/preview/architecture/transactions/concurrency-control/
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
# The server is gone, restarting, or too slow to answer inside the statement timeout.
UNAVAILABLE_SQLSTATES = frozenset(
    {"57P01", "57P02", "57P03", "57014", "55P03", "08000", "08003", "08006"}
)
# statement_timeout and lock_timeout: one such wait already spent the answer's time budget.
TIMEOUT_SQLSTATES = frozenset({"57014", "55P03"})
MAX_ATTEMPTS = 6
BASE_DELAY_S = 0.005
MAX_DELAY_S = 0.25


_count_round_trip: Callable[[], None] | None = None


def _round_trip() -> None:
    # Looked up once per process: this runs on every statement sent.
    global _count_round_trip
    if _count_round_trip is None:
        from .metrics import instruments

        _count_round_trip = instruments().round_trips.inc
    _count_round_trip()


class CountingCursor(psycopg2.extensions.cursor):
    """A cursor that counts each statement it sends, and the BEGIN psycopg2 sends first."""

    def execute(self, query: Any, vars: Any = None) -> None:
        """Execute `query`, counting its round trips (flowlens_db_round_trips_total)."""
        connection = self.connection
        # Outside autocommit psycopg2 opens every transaction with a separate BEGIN.
        if not connection.autocommit and connection.status == psycopg2.extensions.STATUS_READY:
            _round_trip()
        _round_trip()
        return super().execute(query, vars)

    def executemany(self, query: Any, vars_list: Any) -> None:
        """Execute `query` once per parameter set, each one a round trip."""
        vars_list = list(vars_list)
        connection = self.connection
        if vars_list and not connection.autocommit and connection.status == psycopg2.extensions.STATUS_READY:
            _round_trip()
        for _ in vars_list:
            _round_trip()
        return super().executemany(query, vars_list)


class CountingConnection(psycopg2.extensions.connection):
    """A psycopg2 connection that counts what it sends, so /metrics shows round trips per delivery.

    Counted at the driver, not with SQLAlchemy events: run_batch talks to the
    DBAPI cursor directly, and psycopg2 sends BEGIN and skips an idle COMMIT on
    its own, which SQLAlchemy's events cannot see.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor_factory = CountingCursor

    def commit(self) -> None:
        """Commit; a round trip only when a transaction is open."""
        if self.status == psycopg2.extensions.STATUS_BEGIN:
            _round_trip()
        super().commit()

    def rollback(self) -> None:
        """Roll back; a round trip only when a transaction is open."""
        if self.status == psycopg2.extensions.STATUS_BEGIN:
            _round_trip()
        super().rollback()


class DatabaseUnavailable(Exception):
    """The database could not be reached, was too slow, or kept conflicting."""


def make_engine(settings: Settings, url: str | None = None) -> Engine:
    """An engine tuned for short webhook transactions; create it after a fork, never at import."""
    url = url or settings.database_url
    if not url:
        raise ValueError("no database URL")
    return sa.create_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=0,
        pool_timeout=5,
        # A dropped connection is caught by the transaction retry loop below, which
        # invalidates the pool; a pre-ping would cost every delivery a round trip.
        pool_pre_ping=False,
        pool_recycle=300,
        # Deliveries rely on READ COMMITTED plus a repository row lock (see store.py);
        # on YugabyteDB without read committed this is snapshot isolation, where the
        # same lock turns a conflict into a 40001 that the retry loop absorbs.
        isolation_level="READ COMMITTED",
        connect_args={
            "connect_timeout": 3,
            "application_name": "flowlens-ingest",
            "connection_factory": CountingConnection,
            "options": (
                f"-c statement_timeout={settings.statement_timeout_ms}"
                f" -c lock_timeout={settings.statement_timeout_ms}"
                " -c idle_in_transaction_session_timeout=30000"
            ),
        },
    )


def is_retryable(exc: DBAPIError) -> bool:
    """A serialization failure, a deadlock, or a connection that went away."""
    code = getattr(exc.orig, "pgcode", None)
    return code in RETRYABLE_SQLSTATES or bool(exc.connection_invalidated)


def is_unreachable(exc: DBAPIError) -> bool:
    """The server did not answer in time or at all: worth spooling, not worth a 5xx."""
    code = getattr(exc.orig, "pgcode", None)
    if code in UNAVAILABLE_SQLSTATES:
        return True
    return isinstance(exc, sa.exc.OperationalError) and code is None


def transaction(
    engine: Engine,
    work: Callable[[Connection], T],
    *,
    on_retry: Callable[[str], None] | None = None,
    attempts: int = MAX_ATTEMPTS,
) -> T:
    """Run `work` in one transaction, retried as a whole on transient failures.

    Raises DatabaseUnavailable when the database is down, too slow, or still
    conflicting after the last attempt; other database errors propagate.
    """
    for attempt in range(1, attempts + 1):
        try:
            with engine.begin() as conn:
                return work(conn)
        except sa.exc.TimeoutError as exc:
            # Every pooled connection stayed busy for pool_timeout: treat as unavailable.
            raise DatabaseUnavailable("pool_timeout") from exc
        except DBAPIError as exc:
            unreachable = is_unreachable(exc)
            if not (unreachable or is_retryable(exc)):
                raise
            reason = getattr(exc.orig, "pgcode", None) or "disconnect"
            # A server that refuses connections gets one more try, not six, and a
            # timeout none: the answer has to reach GitHub well inside its 10 s.
            if attempt == attempts or (unreachable and (attempt >= 2 or reason in TIMEOUT_SQLSTATES)):
                raise DatabaseUnavailable(reason) from exc
            if on_retry is not None:
                on_retry(reason)
            # Full jitter keeps colliding workers from retrying in lockstep.
            time.sleep(random.uniform(0, min(MAX_DELAY_S, BASE_DELAY_S * 2**attempt)))
    raise AssertionError("unreachable")


def run_batch(conn: Connection, statements: list[tuple[str, dict[str, Any]]]) -> tuple[Any, ...] | None:
    """Run `statements` as one transaction in two round trips; return the last one's first row.

    The statements travel as one multi-statement query that opens the transaction,
    and COMMIT follows, or ROLLBACK when the last statement returned no row.
    psycopg2 would otherwise send BEGIN, each statement and COMMIT separately:
    each is a round trip, about a millisecond apiece on a multi-node YugabyteDB.
    Parameters are bound by psycopg2 itself (mogrify), exactly as its execute() does.
    """
    dbapi = conn.connection.dbapi_connection
    cursor = dbapi.cursor()
    try:
        parts = [b"BEGIN ISOLATION LEVEL READ COMMITTED"]
        parts += [cursor.mogrify(sql, params) for sql, params in statements]
        dbapi.autocommit = True
        try:
            cursor.execute(b";\n".join(parts))
            row = cursor.fetchone() if cursor.description is not None else None
            cursor.execute(b"COMMIT" if row is not None else b"ROLLBACK")
            return row
        except psycopg2.Error:
            if not dbapi.closed:
                try:
                    cursor.execute(b"ROLLBACK")
                except psycopg2.Error:
                    pass
            raise
        finally:
            if not dbapi.closed:
                dbapi.autocommit = False
    except psycopg2.Error as exc:
        disconnected = dbapi.closed != 0 or conn.dialect.is_disconnect(exc, dbapi, cursor)
        if disconnected:
            conn.invalidate()
            # The server went away: its other pooled connections are dead too. Drop
            # them now rather than spend the next deliveries' attempts finding out.
            conn.engine.dispose()
        raise sa.exc.DBAPIError.instance(
            None, None, exc, psycopg2.Error, connection_invalidated=disconnected
        ) from exc
    finally:
        if not cursor.closed:
            cursor.close()


class Database:
    """Owns the engine of the current process; a forked child builds its own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: Engine | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        """The engine of this process, created on first use after any fork."""
        pid = os.getpid()
        if self._engine is None or self._pid != pid:
            with self._lock:
                if self._engine is None or self._pid != pid:
                    if self._engine is not None:
                        # Pooled connections belong to the parent: drop them without closing.
                        self._engine.dispose(close=False)
                    self._engine = make_engine(self.settings)
                    self._pid = pid
        return self._engine

    def dispose(self) -> None:
        """Close this process's pooled connections."""
        if self._engine is not None and self._pid == os.getpid():
            self._engine.dispose()
        self._engine = None


def init_app(app: Flask, settings: Settings) -> None:
    """Attach the process-local database to the app."""
    app.extensions["flowlens_db"] = Database(settings)


def get_db() -> Database:
    """The current app's Database."""
    return current_app.extensions["flowlens_db"]
