"""Why a database could not be used, in one line an operator can act on: where it is, what failed, what to do.

Every command that opens the database, `status` and gunicorn's start check say it the same way. The
line names the server (host, port, database: never the user, the password or the URL's query) and
libpq's own words, so nothing secret is printed; it ends with the next step for that cause.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flowlens_ingest.database_urls import database_location

# libpq's words for each cause (its messages are stable across PostgreSQL releases), and what to do.
_CAUSES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    (
        "refused",
        re.compile(r"Connection refused|No such file or directory|server closed the connection", re.I),
        "check that the server runs and listens there",
    ),
    (
        "unknown host",
        re.compile(r"could not translate host name|Name or service not known|nodename nor servname", re.I),
        "check the host name in DATABASE_URL",
    ),
    (
        "database missing",
        re.compile(r'database "[^"]*" does not exist', re.I),
        "create it (CREATE DATABASE), or name an existing one in DATABASE_URL",
    ),
    (
        "authentication",
        re.compile(r"authentication failed|role \"[^\"]*\" does not exist|no password supplied|no pg_hba.conf", re.I),
        "check the user and password in DATABASE_URL, and pg_hba.conf",
    ),
    (
        "no answer",
        re.compile(r"timeout expired|timed out|canceling statement due to statement timeout|deadline|\bhung\b", re.I),
        "the server or the network is stuck; check the server's health",
    ),
)


@dataclass(frozen=True)
class Unavailable:
    """Why a database could not be used: a short `cause`, what the driver said, and the next step."""

    cause: str
    said: str
    next_step: str

    def line(self, where: str) -> str:
        """`the database at H:P/DB (DATABASE_URL) is unavailable (refused: Connection refused): check that …`."""
        return f"the database {where} is unavailable ({self.cause}: {self.said}): {self.next_step}"


def said_by_driver(exc: BaseException) -> str:
    """What the driver said, e.g. `Connection refused`: libpq's first line, past its `… failed: ` preamble."""
    orig = getattr(exc, "orig", None) or exc
    said = " ".join(str(orig).strip().split("\n", 1)[0].split())
    # libpq: 'connection to server at "127.0.0.1", port 5433 failed: Connection refused'
    said = said.rsplit(" failed: ", 1)[-1].removeprefix("FATAL: ").strip()
    return said[:200] or getattr(orig, "pgcode", None) or type(orig).__name__


def unavailable(exc: BaseException) -> Unavailable:
    """The cause of a failed connect or query (refused, unknown host, database missing, authentication, no answer)."""
    said = said_by_driver(exc)
    whole = str(getattr(exc, "orig", None) or exc)
    for cause, pattern, next_step in _CAUSES:
        if pattern.search(whole):
            return Unavailable(cause, said, next_step)
    return Unavailable("no connection", said, "check DATABASE_URL and that the server answers")


def where(url: str) -> str:
    """`at HOST:PORT/DATABASE (DATABASE_URL)`, every host of a list: where it is, never the user or password."""
    return f"at {database_location(url)} (DATABASE_URL)"
