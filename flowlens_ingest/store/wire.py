"""How statements travel: compiled once, PREPAREd once per session, sent as one batch, counted.

A delivery's statements are compiled once per process (constants written into
the SQL as literals), bound to the delivery's values (psycopg2's own adapters
quote them into the EXECUTEs), and sent as one multi-statement query that opens
the transaction, followed by its COMMIT or ROLLBACK: two round trips (see
run_batch). psycopg2 alone would send BEGIN, each statement and COMMIT
separately: each a round trip, about a millisecond apiece on a multi-node
YugabyteDB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import psycopg2
import psycopg2.extensions
from psycopg2.extensions import adapt
from psycopg2.extras import Json
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.expression import ClauseElement

_DIALECT = postgresql.psycopg2.dialect()  # type: ignore[no-untyped-call]

# One statement of a batch: SQL with %(name)s placeholders, and its parameters.
Statement = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Template:
    """A Core statement compiled once: SQL with %(name)s placeholders and its constant binds."""

    sql: str
    constants: dict[str, Any]

    def bind(self, params: dict[str, Any]) -> Statement:
        """This statement with its parameters, ready for the batch."""
        return self.sql, {**self.constants, **params} if self.constants else params


@functools.cache
def compiled(builder: Callable[..., ClauseElement], *args: Any) -> Template:
    """`builder(*args)` compiled once per process.

    Constants of the statement (the status names of a CASE, `version + 1`, the
    failing conclusions) are written into its SQL as literals, exactly as psycopg2
    would quote them, instead of being quoted again as parameters on every delivery.
    """
    stmt = builder(*args).compile(dialect=_DIALECT)
    sql, constants = str(stmt), {}
    for name, value in stmt.params.items():
        if value is None:
            continue
        literal = _literal(value)
        if literal is None:
            constants[name] = value
        else:
            sql = sql.replace(f"%({name})s", literal.replace("%", "%%"))
    return Template(sql, constants)


def _literal(value: Any) -> str | None:
    """`value` as an SQL literal, for the plain types whose quoting needs no connection."""
    plain = value if isinstance(value, list) else [value]
    if not all(isinstance(v, (bool, int)) or (isinstance(v, str) and v.isascii() and "\\" not in v) for v in plain):
        return None
    return str(adapt(value).getquoted().decode("ascii"))


_PARAMETER_NAMES: dict[type, tuple[tuple[str, str], ...]] = {}


def _parameter_names(row_type: type) -> tuple[tuple[str, str], ...]:
    # (field, parameter) names of a row type: dataclasses.fields() rebuilds its tuple on every call.
    names = _PARAMETER_NAMES.get(row_type)
    if names is None:
        names = _PARAMETER_NAMES[row_type] = tuple((f.name, f"p_{f.name}") for f in dataclasses.fields(row_type))
    return names


def params(row: Any, **extra: Any) -> dict[str, Any]:
    """A row dataclass's fields (and `extra`) as `p_<name>` parameters, adapted for psycopg2."""
    # Shallow on purpose: dataclasses.asdict deep-copies every label and file list.
    bound = {parameter: _adapt(getattr(row, name)) for name, parameter in _parameter_names(type(row))}
    if extra:
        bound.update(values(**extra))
    return bound


def values(**named: Any) -> dict[str, Any]:
    """Named values as `p_<name>` parameters, adapted for psycopg2."""
    return {f"p_{k}": _adapt(v) for k, v in named.items()}


_PLAIN = frozenset({str, int, bool, float, type(None), datetime})


def _adapt(value: Any) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, (dict, list)):
        return Json(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


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


# --- prepared statements ------------------------------------------------------------------------


class PreparedForm(NamedTuple):
    """A statement's server-side prepared form: PREPARE once per session, then EXECUTE."""

    name: str
    prepare: bytes
    # EXECUTE with psycopg2 %(name)s placeholders, for mogrify.
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
    name = "flowlens_" + hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:16]
    execute = f"EXECUTE {name}({', '.join(f'%({p})s' for p in order)})" if order else f"EXECUTE {name}"
    return PreparedForm(name, f"PREPARE {name} AS {text}".encode(), execute)


def lost_prepared_statement(exc: psycopg2.Error) -> bool:
    """The session no longer holds the statements we PREPAREd, or one changed under us."""
    # The session forgot its prepared statements (a pooler or DISCARD ALL), holds one
    # we did not record (PREPARE is not transactional: a failed group of PREPAREs
    # keeps those before the failure), or a migration changed a table under one.
    # A fresh connection prepares them again.
    if exc.pgcode in ("26000", "42P05"):
        return True
    message = getattr(getattr(exc, "diag", None), "message_primary", None) or ""
    return exc.pgcode == "0A000" and message.startswith("cached plan must not change result type")


# --- the batch ----------------------------------------------------------------------------------


def run_batch(dbapi: Any, statements: list[Statement], isolation: str = "READ COMMITTED") -> tuple[Any, ...] | None:
    """Run `statements` as one transaction; return the last one's first row.

    `dbapi` is a psycopg2 connection outside any transaction; only database.py
    calls this, with a pooled connection it checked out for this one batch.

    Two round trips: BEGIN and the statements go as one query, then COMMIT when
    the last statement returned a row, else ROLLBACK. A batch is refused by its
    last statement returning no row (the journal entry of a delivery already
    settled, a job whose lease was lost), never by an error: the server logs a
    failing statement's text, and a batch's text carries payload values.

    With prepared statements on (the default), each statement is PREPAREd once per
    session, in one extra round trip the first time a session meets it, and the
    batch then carries only EXECUTEs: the server no longer parses and plans the
    same statements on every delivery, which was a third of its CPU per delivery.
    Raises psycopg2.Error as it comes; the caller decides about retrying.
    """
    prepared: set[str] | None = getattr(dbapi, "prepared", None)
    cursor = dbapi.cursor()
    try:
        parts = [f"BEGIN ISOLATION LEVEL {isolation}".encode()]
        missing: dict[str, bytes] = {}
        if prepared is None:
            parts += [cursor.mogrify(sql, values) for sql, values in statements]
        else:
            forms = [prepared_form(sql) for sql, _ in statements]
            parts += [cursor.mogrify(form.execute, values) for form, (_, values) in zip(forms, statements, strict=True)]
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
                with contextlib.suppress(psycopg2.Error):
                    cursor.execute(b"ROLLBACK")
            raise
        finally:
            if not dbapi.closed:
                dbapi.autocommit = False
    finally:
        if not cursor.closed:
            cursor.close()
