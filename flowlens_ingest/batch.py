"""How statements travel: compiled once, PREPAREd once per session, sent as one batch, counted.

A delivery's statements are compiled once per process (constants written into
the SQL as literals), bound to the delivery's values with psycopg2's own quoting,
and sent as one multi-statement query that opens the transaction; the COMMIT (or
ROLLBACK) is the second round trip. psycopg2 alone would send BEGIN, each
statement and COMMIT separately: each a round trip, about a millisecond apiece on
a multi-node YugabyteDB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import psycopg2
import psycopg2.errors
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


class Bytea:
    """Bytes for a BYTEA parameter, sent as UTF-8 text the server converts back when they are text.

    psycopg2 quotes bytes as hex (`'\\x7b22…'::bytea`): twice the bytes on the wire, and
    the server decodes every pair. A journal body is UTF-8 JSON (parse.py decoded it
    before anything is journaled), so it travels as a string literal with its quotes
    doubled, `convert_to('{"…}', 'UTF8')`, which the server reads as text and converts
    back to exactly the same bytes. That literal is only sent where it reads back
    exactly: client and server encodings UTF8, standard_conforming_strings on, no NUL
    byte, valid UTF-8. Anything else (a gzip body, another server encoding) goes as
    psycopg2's own bytea quoting.
    """

    __slots__ = ("_conn", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._conn: Any = None

    def __conform__(self, protocol: Any) -> Bytea | None:
        return self if protocol is psycopg2.extensions.ISQLQuote else None

    def prepare(self, conn: Any) -> None:
        """psycopg2 hands the connection the value is quoted for."""
        self._conn = conn

    def getquoted(self) -> bytes:
        """The SQL literal of the bytes."""
        conn = self._conn
        text = self.text() if conn is not None and _as_text(conn) else None
        if text is not None:
            return text.encode()
        binary = psycopg2.Binary(self.data)
        if conn is not None:
            binary.prepare(conn)
        quoted: bytes = binary.getquoted()
        return quoted

    def text(self) -> str | None:
        """The bytes as `convert_to('…', 'UTF8')`, or None when they are not NUL-free UTF-8."""
        data = self.data
        if b"\x00" in data:
            return None
        try:
            decoded = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return "convert_to('" + decoded.replace("'", "''") + "', 'UTF8')"


def _as_text(conn: Any) -> bool:
    """String literals of this connection are read exactly as written: UTF-8 both ways, no backslash escapes."""
    return bool(
        conn.encoding == "UTF8"
        and conn.get_parameter_status("server_encoding") == "UTF8"
        and conn.get_parameter_status("standard_conforming_strings") == "on"
    )


# --- quoting parameters without psycopg2's per-value adapters ------------------------------------


def _quote_str(value: str, _conn: Any = None) -> str:
    if "\x00" in value:
        # psycopg2's own refusal, word for word.
        raise ValueError("A string literal cannot contain NUL (0x00) characters.")
    return "'" + value.replace("'", "''") + "'"


def _quote_number(value: float, conn: Any) -> str:
    # Exactly psycopg2's forms: a negative number after a space (never `--`), NaN and the infinities quoted.
    if type(value) is float and not math.isfinite(value):
        return _quote_other(value, conn)
    text = repr(value) if type(value) is float else str(value)
    return " " + text if text[0] == "-" else text


def _quote_datetime(value: datetime, _conn: Any) -> str:
    return "'" + value.isoformat() + ("'::timestamptz" if value.tzinfo is not None else "'::timestamp")


def _quote_json(value: Json, _conn: Any) -> str:
    return _quote_str(value.dumps(value.adapted))


def _quote_bytea(value: Bytea, conn: Any) -> str:
    text = value.text()
    return text if text is not None else _quote_other(psycopg2.Binary(value.data), conn)


def _quote_other(value: Any, conn: Any) -> str:
    # Whatever has no fast form is quoted by psycopg2 itself, as mogrify would.
    adapted = adapt(value)
    if hasattr(adapted, "prepare"):
        adapted.prepare(conn)
    return str(adapted.getquoted().decode("utf-8"))


_QUOTE: dict[type, Callable[[Any, Any], str]] = {
    str: _quote_str,
    int: _quote_number,
    float: _quote_number,
    bool: lambda value, _conn: "true" if value else "false",
    type(None): lambda _value, _conn: "NULL",
    datetime: _quote_datetime,
    Json: _quote_json,
    Bytea: _quote_bytea,
}


def quote(value: Any, conn: Any) -> str:
    """`value` as the SQL literal psycopg2's mogrify writes for it, on a connection where `_as_text` holds.

    psycopg2 builds an adapter object per value (a QuotedString, its encoding, a
    prepare call): ~1.2 us each, over ~80 values a delivery. The plain types are
    written here the same way in a fraction of that; tests compare both.
    """
    quoter = _QUOTE.get(type(value))
    if quoter is None:
        quoter = _quote_str if isinstance(value, str) else _quote_other
    return quoter(value, conn)


# --- round trips, counted at the driver -------------------------------------------------------

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


# --- prepared statements ------------------------------------------------------------------------


class PreparedForm(NamedTuple):
    """A statement's server-side prepared form: PREPARE once per session, then EXECUTE."""

    name: str
    prepare: bytes
    execute: str
    # The parameters in EXECUTE's order.
    params: tuple[str, ...] = ()

    def bind(self, values: dict[str, Any], conn: Any) -> str:
        """EXECUTE with `values` written in (quote(): on a connection where `_as_text` holds)."""
        if not self.params:
            return f"EXECUTE {self.name}"
        return f"EXECUTE {self.name}(" + ", ".join([quote(values[p], conn) for p in self.params]) + ")"


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
    return PreparedForm(name, f"PREPARE {name} AS {text}".encode(), execute, tuple(order))


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


# A statement refuses its batch by raising an error whose message holds this (see journal.py).
REFUSAL_MARK = "flowlens: already settled"


def refused(exc: psycopg2.Error) -> bool:
    """Whether `exc` is a statement's refusal of its batch (which the server then rolled back)."""
    return isinstance(exc, psycopg2.errors.InvalidTextRepresentation) and REFUSAL_MARK in (exc.pgerror or "")


def run_batch(
    dbapi: Any, statements: list[Statement], isolation: str = "READ COMMITTED", *, one_trip: bool = False
) -> tuple[Any, ...] | None:
    """Run `statements` as one transaction; return the last one's first row.

    `dbapi` is a psycopg2 connection outside any transaction; only database.py
    calls this, with a pooled connection it checked out for this one batch.

    one_trip=False (two round trips): the batch opens a transaction, which COMMITs
    when the last statement returned a row, else ROLLs BACK.
    one_trip=True (one round trip): the statements go as one query without BEGIN, which
    the server runs as one implicit transaction and commits at its end. For batches
    whose last statement refuses the batch by raising an error naming REFUSAL_MARK
    rather than by returning no row: the server then rolls it all back, and this
    returns None.

    With prepared statements on (the default), each statement is PREPAREd once per
    session, in one extra round trip the first time a session meets it, and the
    batch then carries only EXECUTEs: the server no longer parses and plans the
    same statements on every delivery, which was a third of its CPU per delivery.
    Raises psycopg2.Error as it comes; the caller decides about retrying.
    """
    prepared: set[str] | None = getattr(dbapi, "prepared", None)
    cursor = dbapi.cursor()
    try:
        opening = "SET TRANSACTION" if one_trip else "BEGIN"
        parts = [f"{opening} ISOLATION LEVEL {isolation}".encode()]
        missing: dict[str, bytes] = {}
        if prepared is None:
            parts += [cursor.mogrify(sql, values) for sql, values in statements]
        else:
            forms = [prepared_form(sql) for sql, _ in statements]
            if _as_text(dbapi):
                executes = ";\n".join(
                    [form.bind(values, dbapi) for form, (_, values) in zip(forms, statements, strict=True)]
                )
                parts.append(executes.encode())
            else:
                parts += [
                    cursor.mogrify(form.execute, values) for form, (_, values) in zip(forms, statements, strict=True)
                ]
            missing = {form.name: form.prepare for form in forms if form.name not in prepared}
        dbapi.autocommit = True
        try:
            if prepared is not None and missing:
                # Outside any transaction: a prepared statement outlives a rolled-back batch.
                cursor.execute(b";\n".join(missing.values()))
                prepared.update(missing)
            cursor.execute(b";\n".join(parts))
            row = cursor.fetchone() if cursor.description is not None else None
            if not one_trip:
                cursor.execute(b"COMMIT" if row is not None else b"ROLLBACK")
            return row
        except psycopg2.Error as exc:
            if one_trip:
                # An implicit transaction ends with its error: nothing is left to roll back.
                if refused(exc):
                    return None
            elif not dbapi.closed:
                with contextlib.suppress(psycopg2.Error):
                    cursor.execute(b"ROLLBACK")
            raise
        finally:
            if not dbapi.closed:
                dbapi.autocommit = False
    finally:
        if not cursor.closed:
            cursor.close()
