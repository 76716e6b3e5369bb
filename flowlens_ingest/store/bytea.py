"""The journal body's SQL literal: UTF-8 text the server converts back, where that reads back exactly.

Every other parameter is quoted by psycopg2's own adapters (wire.py mogrifies
the EXECUTEs): no hand-written quoting to keep in step with psycopg2's.
"""

from __future__ import annotations

from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2.extensions import QuotedString


class Bytea:
    """Bytes for a BYTEA parameter, sent as UTF-8 text the server converts back when they are text.

    psycopg2 quotes bytes as hex (`'\\x7b22…'::bytea`): twice the bytes on the wire, and
    the server decodes every pair. A journal body is UTF-8 JSON (parse.py decoded it
    before anything is journaled), so it travels as a string literal quoted by
    psycopg2's own QuotedString, `convert_to('{"…}', 'UTF8')`, which the server reads
    as text and converts back to exactly the same bytes. Only where that holds: client
    and server encodings UTF8, no NUL byte, valid UTF-8. Anything else (a gzip body,
    another server encoding) goes as psycopg2's own bytea quoting.
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
        text = self.text() if conn is not None and utf8_both_ways(conn) else None
        if text is not None:
            quoted = QuotedString(text)
            quoted.prepare(conn)
            return b"convert_to(" + quoted.getquoted() + b", 'UTF8')"
        binary = psycopg2.Binary(self.data)
        if conn is not None:
            binary.prepare(conn)
        literal: bytes = binary.getquoted()
        return literal

    def text(self) -> str | None:
        """The bytes as text, or None when they are not NUL-free UTF-8."""
        if b"\x00" in self.data:
            return None
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            return None


def utf8_both_ways(conn: Any) -> bool:
    """Text sent on this connection is UTF-8, and the server keeps text as UTF-8."""
    return bool(conn.encoding == "UTF8" and conn.get_parameter_status("server_encoding") == "UTF8")
