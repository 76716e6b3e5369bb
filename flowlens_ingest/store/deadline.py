"""A client-side deadline on every wait for the database: psycopg2's wait callback.

Installed process-wide (psycopg2.extensions.set_wait_callback), so every connect
and query of the process waits on the socket here instead of blocking inside
libpq. A block of code sets its deadline with `deadline(seconds)`; past it the
wait raises DeadlinePassed and psycopg2 closes the connection: a connection whose
server went silent (a partition, a hung node, a proxy that holds every byte) is
never used again. Without a deadline a wait lasts as long as libpq's would.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import psycopg2
import psycopg2.extensions

# The time.monotonic() by which this thread's database work must end; None: no limit.
_DEADLINE: ContextVar[float | None] = ContextVar("flowlens_database_deadline", default=None)


class DeadlinePassed(psycopg2.OperationalError):
    """The database did not answer before the deadline; psycopg2 closes the connection."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[float]:
    """Every database wait of this thread inside the block ends within `seconds` (or an outer deadline)."""
    at = time.monotonic() + seconds
    outer = _DEADLINE.get()
    token = _DEADLINE.set(at if outer is None else min(at, outer))
    try:
        yield at if outer is None else min(at, outer)
    finally:
        _DEADLINE.reset(token)


def remaining() -> float | None:
    """Seconds left before this thread's database deadline; None when it has none."""
    at = _DEADLINE.get()
    return None if at is None else at - time.monotonic()


def wait_until_deadline(conn: Any) -> None:
    """psycopg2's wait callback: wait on the socket for the server, up to the thread's deadline.

    Installed process-wide (psycopg2.extensions.set_wait_callback), so every
    connect and query of the process waits here instead of blocking inside libpq.
    Past the deadline it raises DeadlinePassed, and psycopg2 closes the connection:
    a connection whose server went silent (a partition, a hung node, a proxy that
    holds every byte) is never used again. Without a deadline it waits as long as
    libpq would.
    """
    poller = select.poll()
    fd = conn.fileno()
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        if state == psycopg2.extensions.POLL_READ:
            events = select.POLLIN
        elif state == psycopg2.extensions.POLL_WRITE:
            events = select.POLLOUT
        else:
            raise psycopg2.OperationalError(f"unexpected poll state {state}")
        left = remaining()
        if left is not None and left <= 0:
            raise DeadlinePassed("the database did not answer before the deadline")
        poller.register(fd, events)
        poller.poll(None if left is None else max(1, int(left * 1000)))
        poller.unregister(fd)


def install_deadlines() -> None:
    """Make every psycopg2 wait of this process go through wait_until_deadline (idempotent)."""
    if psycopg2.extensions.get_wait_callback() is not wait_until_deadline:
        psycopg2.extensions.set_wait_callback(wait_until_deadline)
