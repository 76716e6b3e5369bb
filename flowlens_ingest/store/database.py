"""The one owner of database transactions: a per-process engine, the batch, the retry loop.

Callers hand `Database` statements (a delivery's batch, one Core statement, a
query) and get results back; none of them ever holds a connection or a
transaction. No Flask here: the app, the CLI and the workers share this.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from flowlens_ingest.config import Settings
from flowlens_ingest.store.batch import Batch
from flowlens_ingest.store.deadline import DeadlinePassed, deadline, install_deadlines, remaining
from flowlens_ingest.store.hang import PROBE_DEADLINE_S, Hang, missed_deadline
from flowlens_ingest.store.wire import CountingConnection, lost_prepared_statement, send

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLSTATEs after which the whole transaction is safe to run again: YugabyteDB
# raises them far more often than PostgreSQL (conflicts, leader moves, restarts).
# https://docs.yugabyte.com/preview/architecture/transactions/concurrency-control/
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
# Writes refused on this session (25006): a read-only default it was opened with, a standby.
READ_ONLY_SQLSTATE = "25006"
# The server is gone, restarting, too slow to answer inside the statement timeout, or out of a
# resource (class 53: disk full, out of memory, too many connections): the database's trouble,
# not the delivery's, so the delivery is kept for later rather than journaled failed or set aside.
UNAVAILABLE_SQLSTATES = frozenset(
    {"57P01", "57P02", "57P03", "57014", "55P03", "08000", "08003", "08006"}
    | {"53000", "53100", "53200", "53300", "53400"}
    # A server that takes no writes now (25006): a primary demoted or a standby reached after a
    # failover, a database set read-only. Nothing a delivery did: kept until writes come back.
    | {READ_ONLY_SQLSTATE}
)
# statement_timeout and lock_timeout: one such wait already spent the answer's time budget.
TIMEOUT_SQLSTATES = frozenset({"57014", "55P03"})
# The server is up and cancelled or refused this work for its wait or its weight: the timeouts, out
# of memory, its temporary-file limit. It may be one delivery's trouble (a held row, a huge body),
# so the spool passes over it rather than stop every delivery behind it.
CANCELLED_SQLSTATES = TIMEOUT_SQLSTATES | {"53200", "53400"}
# Conflicts (40001/40P01) are retried until this many attempts or this much time, with
# full-jitter exponential backoff: under a burst for one repository (every delivery
# writes its repository row) contention calls for more patience than a blip does,
# while the answer still leaves well inside GitHub's 10 s (a statement timeout is 5 s).
MAX_ATTEMPTS = 12
RETRY_BUDGET_S = 4.0
BASE_DELAY_S = 0.005
MAX_DELAY_S = 0.5

# Past the server's own statement timeout, how long a client waits for its answer before
# giving the connection up: the server should have answered (even if only to say it
# cancelled the statement) by then, unless it or the network hangs.
DEADLINE_MARGIN_S = 1.0
# Once the database let a call's own deadline pass, it is known to hang (store/hang.py): every
# call of this process fails at once, without waiting on it, until a probe finds it answering.
# A pooled connection is waited for at most this long (a request holds one at a time,
# and the pool has one per thread: a wait means connections stuck on a hung server).
POOL_TIMEOUT_S = 3.0

OnRetry = Callable[[str], None]


class DatabaseUnavailable(Exception):
    """The database could not be reached, was too slow, or kept conflicting; the message is the reason (a SQLSTATE or a word)."""

    @property
    def work_cancelled(self) -> bool:
        """The server is up and cancelled this work (a timeout, out of memory, its temp-file limit): CANCELLED_SQLSTATES."""
        return str(self) in CANCELLED_SQLSTATES

    @property
    def timed_out(self) -> bool:
        """The server cancelled this work at its statement or lock timeout: TIMEOUT_SQLSTATES."""
        return str(self) in TIMEOUT_SQLSTATES


def make_engine(settings: Settings, url: str | None = None, *, application_name: str = "flowlens-ingest") -> Engine:
    """An engine tuned for short webhook transactions; create it after a fork, never at import.

    `application_name` tells the service's sessions from others in pg_stat_activity.
    """
    url = url or settings.database_url
    if not url:
        raise ValueError("no database URL")
    install_deadlines()
    # As libpq's options read it: a backslash-escaped space belongs to the value.
    isolation = settings.isolation_level.lower().replace(" ", "\\ ")
    engine = sa.create_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT_S,
        # A dropped connection is caught by the transaction retry loop below, which
        # invalidates the pool; a pre-ping would cost every delivery a round trip.
        pool_pre_ping=False,
        pool_recycle=300,
        # No isolation_level here: psycopg2 would then send a SET default_transaction_isolation
        # (a round trip) as a batch turns autocommit on and off (wire.send): a third round trip
        # per delivery, which flowlens_db_round_trips_total never saw. The level is the
        # session's default instead, set at connect time below, and each batch names it too.
        connect_args={
            "connect_timeout": 3,
            # A connection whose peer vanished is noticed by the kernel too: unacknowledged
            # data for tcp_user_timeout, or an idle pooled one without keepalive answers.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 10000,
            "application_name": application_name,
            "connection_factory": CountingConnection,
            "options": (
                f"-c statement_timeout={settings.statement_timeout_ms}"
                f" -c lock_timeout={settings.statement_timeout_ms}"
                " -c idle_in_transaction_session_timeout=30000"
                # Deliveries rely on READ COMMITTED plus a repository row lock (see statements.py);
                # on YugabyteDB without read committed this is snapshot isolation, where the
                # same lock turns a conflict into a 40001 that the retry loop absorbs.
                f" -c default_transaction_isolation={isolation}"
            ),
        },
    )
    if settings.prepared_statements:

        @sa.event.listens_for(engine, "connect")
        def _prepare_on_this_session(dbapi_connection: Any, _record: Any) -> None:
            if isinstance(dbapi_connection, CountingConnection):
                dbapi_connection.prepared = set()

    sa.event.listen(engine, "connect", compress_with_lz4)
    return engine


def compress_with_lz4(dbapi_connection: Any, _record: Any = None) -> None:
    """Have this session TOAST-compress what it writes with lz4 where the server can (PostgreSQL 14+).

    Every delivery writes a ~12 KB journal body, which PostgreSQL compresses before
    storing it; its default, pglz, spent ~0.13 ms of server CPU per delivery on
    that alone, lz4 a small fraction of it, for the same size on disk. The setting
    only changes how this session's new values are compressed: every reader
    decompresses either kind transparently. One round trip per new connection, none
    per delivery. Skipped on servers before 14 and on YugabyteDB (no TOAST there:
    DocDB compresses its files itself); a server built without lz4 keeps pglz.
    """
    version = dbapi_connection.get_parameter_status("server_version") or ""
    server = (dbapi_connection.info.host, dbapi_connection.info.port, version)
    if dbapi_connection.server_version < 140000 or "YB" in version or server in _WITHOUT_LZ4:
        return
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        with dbapi_connection.cursor() as cursor:
            # Asked, not tried: a refused SET would be an error in the server's log.
            cursor.execute(
                "SELECT set_config('default_toast_compression', 'lz4', false) FROM pg_settings"
                " WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)"
            )
            if cursor.fetchone() is None:
                # Said once per process and server, and not asked again on its next connections.
                _WITHOUT_LZ4.add(server)
                log.info("this PostgreSQL was built without lz4: its TOAST compression stays pglz")
    finally:
        dbapi_connection.autocommit = autocommit


_WITHOUT_LZ4: set[tuple[str, int, str]] = set()


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


class Database:
    """The database of this process: its engine (rebuilt after a fork) and its transactions."""

    def __init__(
        self,
        settings: Settings,
        url: str | None = None,
        *,
        application_name: str = "flowlens-ingest",
        engine: Engine | None = None,
    ) -> None:
        """`engine`: use this process's existing engine (tools, tests) instead of making one."""
        self.settings = settings
        self.url = url or settings.database_url
        self.application_name = application_name
        self._engine = engine
        self._pid = os.getpid() if engine is not None else 0
        self._lock = threading.Lock()
        # Each call's deadline, unless the caller set a shorter one (a request's answer time).
        self.budget_s = settings.statement_timeout_ms / 1000 + DEADLINE_MARGIN_S
        # Known hung: calls fail at once until the probe (one thread of this process) finds it back.
        self.hang = Hang(self._probe)

    @property
    def hung(self) -> bool:
        """This process knows the database to hang: a call fails at once (DatabaseUnavailable), waiting on nothing."""
        return self.hang.known

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
                    self._engine = make_engine(self.settings, self.url, application_name=self.application_name)
                    self._pid = pid
        return self._engine

    def dispose(self) -> None:
        """Close this process's pooled connections."""
        if self._engine is not None and self._pid == os.getpid():
            self._engine.dispose()
        self._engine = None
        self.hang.forget()

    @contextlib.contextmanager
    def bounded(self) -> Iterator[float]:
        """A block whose database waits (through `engine`, e.g. alembic's) end within this Database's budget.

        Raises DatabaseUnavailable at once, without waiting, while the database is known
        hung, and a wait under way ends as soon as it is. A wait past SLOW_WAIT_S has the
        probe look into it; one that outlasts this budget (not a shorter one its caller
        set: that says nothing of the server) makes it known hung (store/hang.py).
        """
        if self.hang.known:
            raise DatabaseUnavailable("hung")
        outer = remaining()
        own = outer is None or outer >= self.budget_s
        with deadline(self.budget_s, self.hang) as ends:
            try:
                yield ends
            except Exception as exc:
                if own and missed_deadline(exc):
                    self.hang.missed()
                raise

    def _probe(self) -> None:
        """Return when a new connection (not a pooled one) answers `SELECT 1` within PROBE_DEADLINE_S; raise otherwise."""
        engine = self.engine
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        with deadline(PROBE_DEADLINE_S):
            connection = engine.dialect.connect(*cargs, **cparams, application_name=self.application_name)
            try:
                connection.cursor().execute("SELECT 1")
            finally:
                connection.close()

    # --- what callers hand in -------------------------------------------------------------

    def run(
        self, batch: Batch, *, on_retry: OnRetry | None = None, rollback_refused: bool = True
    ) -> tuple[Any, ...] | None:
        """Run a batch as one transaction; return the last statement's first row, or None.

        A batch is refused when that row is missing. By default it is then rolled back
        (a job whose lease was lost), in two round trips; with `rollback_refused=False`
        (a delivery's batch: re-applied, it writes nothing) it is one round trip that
        commits. See wire.send. Retried as a whole on transient failures.
        """
        return self._retrying(lambda: self._batch(batch, rollback_refused), on_retry)

    def execute(self, statement: sa.Executable, *, on_retry: OnRetry | None = None) -> int:
        """Run one Core statement in a transaction of its own; return its row count."""
        return self._retrying(lambda: self._in_transaction(lambda c: c.execute(statement).rowcount), on_retry)

    def read(self, query: sa.Executable) -> list[sa.Row[Any]]:
        """The rows of a query, read in a transaction of its own (not retried, but within the deadline)."""
        with self.bounded():
            return self._in_transaction(lambda c: list(c.execute(query)))

    def first(self, query: sa.Executable, *, on_retry: OnRetry | None = None) -> sa.Row[Any] | None:
        """The first row of a statement (a query, or DML with RETURNING), committed, retried."""
        return self._retrying(lambda: self._in_transaction(lambda c: c.execute(query).first()), on_retry)

    # --- how -----------------------------------------------------------------------------------

    def _in_transaction(self, work: Callable[[Connection], T]) -> T:
        with self.engine.begin() as conn:
            return work(conn)

    def _batch(self, batch: Batch, rollback_refused: bool) -> tuple[Any, ...] | None:
        # The pool's connection itself, without a Connection around it (a batch needs none of its
        # transaction bookkeeping): a failure to connect is wrapped here, as a Connection would,
        # into the OperationalError the retry loop knows.
        engine = self.engine
        try:
            pooled = engine.raw_connection()
        except psycopg2.Error as exc:
            raise DBAPIError.instance(None, None, exc, psycopg2.Error) from exc
        try:
            dbapi = pooled.dbapi_connection
            try:
                return send(dbapi, batch, self.settings.isolation_level, rollback_refused=rollback_refused)
            except psycopg2.Error as exc:
                disconnected = dbapi is None or dbapi.closed != 0 or engine.dialect.is_disconnect(exc, dbapi, None)  # type: ignore[arg-type]
                if disconnected or exc.pgcode == READ_ONLY_SQLSTATE:
                    pooled.invalidate()
                    # The server went away, or takes no writes on these sessions (a standby reached
                    # after a failover, a read-only default they were opened with): its other pooled
                    # connections are the same. Dropped now, so that the next attempt finds the
                    # server as it is, rather than the deliveries' attempts finding out one by one.
                    engine.dispose()
                elif getattr(dbapi, "prepared", None) is not None and lost_prepared_statement(exc):
                    # Retried on a new session, which prepares afresh.
                    pooled.invalidate()
                    disconnected = True
                elif getattr(dbapi, "out_of_step", False):
                    # Its prepared statements are no longer known: never reused, but the refusal
                    # was the statements' (a missing table), not the session's, so not retried for it.
                    pooled.invalidate()
                raise DBAPIError.instance(None, None, exc, psycopg2.Error, connection_invalidated=disconnected) from exc
        finally:
            pooled.close()

    def _retrying(self, attempt_once: Callable[[], T], on_retry: OnRetry | None) -> T:
        """Run `attempt_once`, again on transient failures, with full-jitter backoff.

        Raises DatabaseUnavailable when the database is down, too slow, or still
        conflicting after the last attempt, or when the deadline (this Database's
        budget, or a shorter one the caller set) leaves no time for another attempt;
        other database errors propagate.
        """
        with self.bounded() as ends:
            return self._attempts(attempt_once, on_retry, min(ends, time.monotonic() + RETRY_BUDGET_S))

    def _attempts(self, attempt_once: Callable[[], T], on_retry: OnRetry | None, retry_until: float) -> T:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                result = attempt_once()
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
                # Full jitter keeps colliding workers from retrying in lockstep.
                delay = random.uniform(0, min(MAX_DELAY_S, BASE_DELAY_S * 2**attempt))
                if isinstance(exc.orig, DeadlinePassed):
                    # The connection is gone and so is the time: no second try (bounded()
                    # marks the database hung when the deadline was its own).
                    raise DatabaseUnavailable("deadline") from exc
                if (
                    attempt == MAX_ATTEMPTS
                    or time.monotonic() + delay > retry_until
                    or (unreachable and (attempt >= 2 or reason in TIMEOUT_SQLSTATES))
                ):
                    raise DatabaseUnavailable(reason) from exc
                if on_retry is not None:
                    on_retry(reason)
                time.sleep(delay)
            else:
                return result
        raise AssertionError("unreachable")
