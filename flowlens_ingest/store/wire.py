"""How a batch travels: each statement compiled once per process, PREPAREd once per session, sent as one query.

`send` is the one way in (database.py calls it with a connection it checked out
for one batch). A statement is compiled by SQLAlchemy, once per process, into its
final SQL: its constants (the status names of a CASE, `version + 1`, the failing
conclusions) written in as literals by SQLAlchemy's own literal rendering, its
parameters numbered `$1, $2...` by the `numeric_dollar` paramstyle for PREPARE
(or `%s` by the `format` paramstyle when prepared statements are off), with the
parameters' order in `positiontup`. Nothing here edits SQL text.

Compiling once pays: SQLAlchemy 2.0 cannot cache an ON CONFLICT statement
(sqlalchemy#10445) and would compile every upsert on every delivery (measured
+3.2 ms of worker CPU per delivery), and PREPARE spares the server parsing and
planning them every time (-0.6 ms of its CPU per delivery).

The values are quoted by psycopg2's own adapters (mogrify) into the EXECUTEs, and
the statements and the journal's RETURNING go as one query: a delivery's batch in
one round trip, a batch that must roll back when refused followed by its COMMIT
or ROLLBACK in a second. psycopg2 alone would send BEGIN, each statement and
COMMIT separately: each a round trip, about a millisecond apiece on a multi-node
YugabyteDB.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, NamedTuple, cast

import psycopg2
import psycopg2.extensions
import sqlalchemy as sa
from psycopg2.extras import Json
from sqlalchemy.dialects.postgresql.base import PGCompiler
from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
from sqlalchemy.sql.compiler import SQLCompiler

from flowlens_ingest.store.batch import Batch, Statement
from flowlens_ingest.store.bytea import Bytea

# --- compiled once ------------------------------------------------------------------------------

# A constant is written into the SQL when its literal reads the same under every server
# setting: SQLAlchemy's dialect, never connected, assumes standard_conforming_strings
# off and would double a backslash, which the server (on, the default) would keep.
_LITERAL_TYPES: dict[type, sa.types.TypeEngine[Any]] = {bool: sa.Boolean(), int: sa.Integer(), str: sa.String()}


def _inlinable(value: Any) -> bool:
    return all(
        isinstance(v, (bool, int)) or (isinstance(v, str) and "\\" not in v and "\x00" not in v)
        for v in (value if isinstance(value, list) else [value])
    )


class _Compiler(PGCompiler):
    """PostgreSQL's compiler, rendering the constants of a statement as literals and leaving its parameters."""

    # The one hook SQLAlchemy gives for how a bind renders; its own signature is untyped.
    def visit_bindparam(self, bindparam: sa.BindParameter[Any], **kw: Any) -> str:  # type: ignore[override]
        value = bindparam.value
        if value is None or bindparam.callable is not None:
            # A parameter: bound per delivery (expressions.param names them p_<name>).
            if not bindparam.key.startswith("p_"):
                raise sa.exc.CompileError(f"parameter {bindparam.key!r} is not named by expressions.param")
            return str(super().visit_bindparam(bindparam, **kw))  # type: ignore[no-untyped-call]
        if not _inlinable(value):
            raise sa.exc.CompileError(f"constant {value!r} has no literal that reads the same on every server")
        if isinstance(bindparam.type, sa.types.NullType) and not isinstance(value, list):
            # Compared with a parameter (a rank table's keys, str enums): typed by its plain value.
            plain = value if isinstance(value, (bool, int)) else str.__str__(value)
            bindparam = sa.literal(plain, _LITERAL_TYPES[type(plain)])
        return str(super().visit_bindparam(bindparam, **{**kw, "literal_binds": True}))  # type: ignore[no-untyped-call]


class _Dialect(PGDialect_psycopg2):
    statement_compiler = _Compiler


_PREPARED_DIALECT = _Dialect(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]
_PLAIN_DIALECT = _Dialect(paramstyle="format")  # type: ignore[no-untyped-call]


class Form(NamedTuple):
    """A statement as sent: the text to mogrify with its values, and its PREPARE when prepared."""

    # The statement's values, in the order of its placeholders.
    names: tuple[str, ...]
    # EXECUTE name(%s, ...) for a prepared statement, else the SQL itself; %s placeholders.
    text: str
    name: str | None = None
    prepare: bytes | None = None


@functools.cache
def form(builder: Callable[..., sa.Executable], args: tuple[Any, ...], prepared: bool) -> Form:
    """`builder(*args)` compiled by SQLAlchemy, once per process: PREPAREd, or plain SQL text.

    Parameter types are left to PostgreSQL's inference from context, as they are
    for the literals psycopg2 would otherwise inline; EXECUTE coerces its
    arguments to them as an INSERT coerces its values. A prepared statement's name
    is its text's hash, so one name always means one statement.
    """
    statement = cast(sa.ClauseElement, builder(*args))
    compiled = cast(SQLCompiler, statement.compile(dialect=_PREPARED_DIALECT if prepared else _PLAIN_DIALECT))
    names = tuple(key.removeprefix("p_") for key in compiled.positiontup or ())
    if not prepared:
        return Form(names, compiled.string)
    name = "flowlens_" + hashlib.sha1(compiled.string.encode(), usedforsecurity=False).hexdigest()[:16]
    execute = f"EXECUTE {name}({', '.join(['%s'] * len(names))})" if names else f"EXECUTE {name}"
    return Form(names, execute, name, f"PREPARE {name} AS {compiled.string}".encode())


# --- values, adapted for psycopg2 ---------------------------------------------------------------

_PLAIN = frozenset({str, int, bool, float, type(None)})


def _adapt(value: Any) -> Any:
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is datetime:
        # As the ISO text psycopg2 would quote, without its `::timestamptz`: the parameter's
        # type comes from where it stands (a column, a CAST, a comparison with a timestamp),
        # and a string quotes in a third of the time (about 6 timestamps a delivery).
        return value.isoformat()
    if isinstance(value, str):
        # A StrEnum member: its plain string, which psycopg2 adapts without a search of its
        # adapters by superclass.
        return str.__str__(value)
    if isinstance(value, (dict, list)):
        return Json(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        # The journal body: as text where it reads back exactly (bytea.py).
        return Bytea(value)
    return value


def plain_sql(statement: Statement) -> tuple[str, tuple[Any, ...]]:
    """A statement as SQL text (%s placeholders) and its values, for a cursor of one's own (tests, EXPLAIN)."""
    sent = form(statement.builder, statement.args, False)
    return sent.text, tuple(_adapt(statement.values[name]) for name in sent.names)


# --- round trips, counted at the driver -------------------------------------------------------

_count_round_trip: Callable[[], None] | None = None


def _round_trip() -> None:
    # Looked up once per process: this runs on every statement sent.
    global _count_round_trip
    if _count_round_trip is None:
        from flowlens_ingest.metrics import instruments

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

    Counted at the driver, not with SQLAlchemy events: send talks to the
    DBAPI cursor directly, and psycopg2 sends BEGIN and skips an idle COMMIT on
    its own, which SQLAlchemy's events cannot see.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursor_factory = CountingCursor
        # Names of the statements PREPAREd in this session; None: send SQL text instead.
        self.prepared: set[str] | None = None
        # A group of PREPAREs failed part-way: the server may hold statements `prepared` does not
        # name (PREPARE is not transactional), so the session is never used again (database.py).
        self.out_of_step = False

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


# --- prepared statements ------------------------------------------------------------------------


def lost_prepared_statement(exc: psycopg2.Error) -> bool:
    """The session no longer holds the statements we PREPAREd, or one changed under us."""
    # The session forgot its prepared statements (a pooler or DISCARD ALL), holds one
    # we did not record (PREPARE is not transactional: a failed group of PREPAREs
    # keeps those before the failure: `out_of_step` retires such a session at once, this is the
    # fallback), or a migration changed a table under one.
    # A fresh connection prepares them again.
    if exc.pgcode in ("26000", "42P05"):
        return True
    message = getattr(getattr(exc, "diag", None), "message_primary", None) or ""
    return exc.pgcode == "0A000" and message.startswith("cached plan must not change result type")


# --- the batch ----------------------------------------------------------------------------------


def send(
    dbapi: Any, batch: Batch, isolation: str = "READ COMMITTED", *, rollback_refused: bool = True
) -> tuple[Any, ...] | None:
    """Run `batch` as one transaction; return the last statement's first row.

    `dbapi` is a psycopg2 connection outside any transaction; only database.py
    calls this, with a pooled connection it checked out for this one batch.

    A batch is refused by its last statement returning no row (the journal entry of
    a delivery already settled, a job whose lease was lost), never by an error: the
    server logs a failing statement's text, and a batch's text carries payload values.

    A refused batch is rolled back (`rollback_refused`, the default: a job whose
    lease was lost must write nothing) in two round trips: `BEGIN ISOLATION LEVEL …`
    and the statements, then COMMIT when the last statement returned a row, else
    ROLLBACK. A batch whose refusal needs no undoing (a delivery's: every upsert is
    ordered by GitHub's time, ranks and digest, so re-applying a delivery compares
    equal or older and writes nothing) takes one: `SET TRANSACTION ISOLATION LEVEL …`
    and the statements go as one query, which the server runs as one implicit
    transaction and commits, refused or not.

    With prepared statements on (the default), each statement is PREPAREd once per
    session, in one extra round trip the first time a session meets it, and the
    batch then carries only EXECUTEs: the server no longer parses and plans the
    same statements on every delivery, which was a third of its CPU per delivery.
    Raises psycopg2.Error as it comes; the caller decides about retrying.
    """
    prepared: set[str] | None = getattr(dbapi, "prepared", None)
    cursor = dbapi.cursor()
    try:
        opening = "BEGIN ISOLATION LEVEL" if rollback_refused else "SET TRANSACTION ISOLATION LEVEL"
        parts = [f"{opening} {isolation}".encode()]
        missing: dict[str, bytes] = {}
        for statement in batch:
            sent = form(statement.builder, statement.args, prepared is not None)
            values = statement.values
            parts.append(cursor.mogrify(sent.text, [_adapt(values[name]) for name in sent.names]))
            if prepared is not None and sent.name not in prepared:
                missing[cast(str, sent.name)] = cast(bytes, sent.prepare)
        dbapi.autocommit = True
        try:
            if prepared is not None and missing:
                # Outside any transaction: a prepared statement outlives a rolled-back batch.
                try:
                    cursor.execute(b";\n".join(missing.values()))
                except psycopg2.Error:
                    # Those before the failing one may be prepared now: the next batch on this
                    # session would meet them again as a refusal (42P05).
                    dbapi.out_of_step = True
                    raise
                prepared.update(missing)
            # Several statements in one query are one transaction: an implicit one, which the
            # server commits at the end of the query, or rolls back at the first error.
            cursor.execute(b";\n".join(parts))
            row = cursor.fetchone() if cursor.description is not None else None
            if rollback_refused:
                cursor.execute(b"COMMIT" if row is not None else b"ROLLBACK")
            return row
        except psycopg2.Error:
            # Only an explicit transaction is left open by a failure; an implicit one is gone.
            if not dbapi.closed and dbapi.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                with contextlib.suppress(psycopg2.Error):
                    cursor.execute(b"ROLLBACK")
            raise
        finally:
            if not dbapi.closed:
                dbapi.autocommit = False
    finally:
        if not cursor.closed:
            cursor.close()
