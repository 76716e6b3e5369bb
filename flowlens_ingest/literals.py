"""SQL literals of a batch's parameters, written without psycopg2's per-value adapters.

Only on a connection where a string literal reads back exactly as written
(`exact_literals`); elsewhere batch.py lets psycopg2's mogrify quote them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2.extensions import adapt
from psycopg2.extras import Json


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
        text = self.text() if conn is not None and exact_literals(conn) else None
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


def exact_literals(conn: Any) -> bool:
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
    """`value` as the SQL literal psycopg2's mogrify writes for it, on a connection where `exact_literals` holds.

    psycopg2 builds an adapter object per value (a QuotedString, its encoding, a
    prepare call): ~1.2 us each, over ~80 values a delivery. The plain types are
    written here the same way in a fraction of that; tests compare both.
    """
    quoter = _QUOTE.get(type(value))
    if quoter is None:
        quoter = _quote_str if isinstance(value, str) else _quote_other
    return quoter(value, conn)
