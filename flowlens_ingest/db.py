"""The one place that wires the database to the app: a per-process engine and the retry loop."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import re
import threading
import time
from typing import Any, Callable, NamedTuple, TypeVar

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
        # Names of the statements PREPAREd in this session; None: send SQL text instead.
        self.prepared: set[str] | None = None

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


def make_engine(settings: Settings, url: str | None = None, *, application_name: str = "flowlens-ingest") -> Engine:
    """An engine tuned for short webhook transactions; create it after a fork, never at import.

    `application_name` tells the service's sessions from others in pg_stat_activity.
    """
    url = url or settings.database_url
    if not url:
        raise ValueError("no database URL")
    engine = sa.create_engine(
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
            "application_name": application_name,
            "connection_factory": CountingConnection,
            "options": (
                f"-c statement_timeout={settings.statement_timeout_ms}"
                f" -c lock_timeout={settings.statement_timeout_ms}"
                " -c idle_in_transaction_session_timeout=30000"
            ),
        },
    )
    if settings.prepared_statements:

        @sa.event.listens_for(engine, "connect")
        def _prepare_on_this_session(dbapi_connection: Any, _record: Any) -> None:
            if isinstance(dbapi_connection, CountingConnection):
                dbapi_connection.prepared = set()

    return engine


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


class PreparedForm(NamedTuple):
    """A statement's server-side prepared form: PREPARE once per session, then EXECUTE."""

    name: str
    prepare: bytes
    execute: str


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


@functools.lru_cache(maxsize=256)
def prepared_form(sql: str) -> PreparedForm:
    """`sql` (psycopg2 %(name)s placeholders) as PREPARE text and an EXECUTE to mogrify.

    Parameter types are left to PostgreSQL's inference from context, as they are
    for the literals psycopg2 would otherwise inline; EXECUTE coerces its
    arguments to them as an INSERT coerces its values. The name is the text's
    hash, so one name always means one statement.
    """
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in order:
            order.append(match.group(1))
        return f"${order.index(match.group(1)) + 1}"

    text = _PLACEHOLDER.sub(number, sql).replace("%%", "%")
    name = "flowlens_" + hashlib.sha1(text.encode()).hexdigest()[:16]
    execute = f"EXECUTE {name}({', '.join(f'%({p})s' for p in order)})" if order else f"EXECUTE {name}"
    return PreparedForm(name, f"PREPARE {name} AS {text}".encode(), execute)


def _lost_prepared_statement(exc: psycopg2.Error) -> bool:
    # The session forgot its prepared statements (a pooler or DISCARD ALL), holds one
    # we did not record (PREPARE is not transactional: a failed group of PREPAREs
    # keeps those before the failure), or a migration changed a table under one.
    # A fresh connection prepares them again.
    if exc.pgcode in ("26000", "42P05"):
        return True
    message = getattr(getattr(exc, "diag", None), "message_primary", None) or ""
    return exc.pgcode == "0A000" and message.startswith("cached plan must not change result type")


def run_batch(conn: Connection, statements: list[tuple[str, dict[str, Any]]]) -> tuple[Any, ...] | None:
    """Run `statements` as one transaction in two round trips; return the last one's first row.

    The statements travel as one multi-statement query that opens the transaction,
    and COMMIT follows, or ROLLBACK when the last statement returned no row.
    psycopg2 would otherwise send BEGIN, each statement and COMMIT separately:
    each is a round trip, about a millisecond apiece on a multi-node YugabyteDB.
    Parameters are bound by psycopg2 itself (mogrify), exactly as its execute() does.

    With prepared statements on (the default), each statement is PREPAREd once per
    session, in one extra round trip the first time a session meets it, and the
    batch then carries only EXECUTEs: the server no longer parses and plans the
    same statements on every delivery, which was a third of its CPU per delivery.
    """
    dbapi = conn.connection.dbapi_connection
    prepared: set[str] | None = getattr(dbapi, "prepared", None)
    cursor = dbapi.cursor()
    try:
        parts = [b"BEGIN ISOLATION LEVEL READ COMMITTED"]
        missing: dict[str, bytes] = {}
        if prepared is None:
            parts += [cursor.mogrify(sql, params) for sql, params in statements]
        else:
            forms = [prepared_form(sql) for sql, _ in statements]
            parts += [cursor.mogrify(form.execute, params) for form, (_, params) in zip(forms, statements)]
            missing = {form.name: form.prepare for form in forms if form.name not in prepared}
        dbapi.autocommit = True
        try:
            if prepared is not None and missing:
                # Outside any transaction: a prepared statement outlives a rolled-back batch.
                cursor.execute(b";\n".join(missing.values()))
                prepared.update(missing)
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
        elif prepared is not None and _lost_prepared_statement(exc):
            # Retried by db.transaction on a new session, which prepares afresh.
            conn.invalidate()
            disconnected = True
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
