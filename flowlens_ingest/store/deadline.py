"""A client-side deadline on every wait for the database: psycopg2's wait callback.

Installed process-wide (psycopg2.extensions.set_wait_callback), so every connect
and query of the process waits on the socket here instead of blocking inside
libpq. A block of code sets its deadline with `deadline(seconds)`; past it the
wait raises DeadlinePassed and psycopg2 closes the connection: a connection whose
server went silent (a partition, a hung node, a proxy that holds every byte) is
never used again. Without a deadline a wait lasts as long as libpq's would.

A block may also name a Watch (store/hang.py): a wait longer than SLOW_WAIT_S tells
it once, so that it can find out whether the server hangs, and a wait ends at once
(DeadlinePassed) when it says the server is known to hang.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Protocol

import psycopg2
import psycopg2.extensions

# A wait this long is unusual for a webhook's short transactions (milliseconds when healthy):
# the block's Watch is told, once a wait, and may look into whether the server hangs.
SLOW_WAIT_S = 1.0
# A wait with a Watch looks this often whether the server has become known to hang.
WATCH_EVERY_S = 0.2


class Watch(Protocol):
    """Told of slow waits; says when the server is known to hang, which ends every wait on it."""

    @property
    def known(self) -> bool:
        """The server is known to hang: a wait on it ends now."""

    def slow(self) -> None:
        """A wait outlasted SLOW_WAIT_S (called once a wait, from the waiting thread: return quickly)."""


# The time.monotonic() by which this thread's database work must end; None: no limit.
_DEADLINE: ContextVar[float | None] = ContextVar("flowlens_database_deadline", default=None)
# Who is told of this thread's slow waits (the innermost block's); None: nobody.
_WATCH: ContextVar[Watch | None] = ContextVar("flowlens_database_watch", default=None)


class DeadlinePassed(psycopg2.OperationalError):
    """The database did not answer before the deadline; psycopg2 closes the connection."""


@contextlib.contextmanager
def deadline(seconds: float, watch: Watch | None = None) -> Iterator[float]:
    """Every database wait of this thread inside the block ends within `seconds` (or an outer deadline).

    `watch`: told of the block's slow waits; they end at once when it knows the server hangs.
    """
    at = time.monotonic() + seconds
    outer = _DEADLINE.get()
    token = _DEADLINE.set(at if outer is None else min(at, outer))
    watching = _WATCH.set(watch) if watch is not None else None
    try:
        yield at if outer is None else min(at, outer)
    finally:
        if watching is not None:
            _WATCH.reset(watching)
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
    libpq would. With a Watch, a wait past SLOW_WAIT_S tells it (once), and a wait
    ends the moment it says the server is known to hang.
    """
    poller = select.poll()
    fd = conn.fileno()
    watch = _WATCH.get()
    started = time.monotonic()
    told = False
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
        if watch is not None:
            if watch.known:
                raise DeadlinePassed("the database is known to hang")
            if not told and time.monotonic() - started >= SLOW_WAIT_S:
                told = True
                watch.slow()
            # Woken now and then to look at the watch again; a healthy answer comes well before.
            left = WATCH_EVERY_S if left is None else min(left, WATCH_EVERY_S)
        poller.register(fd, events)
        poller.poll(None if left is None else max(1, int(left * 1000)))
        poller.unregister(fd)


def install_deadlines() -> None:
    """Make every psycopg2 wait of this process go through wait_until_deadline (idempotent)."""
    if psycopg2.extensions.get_wait_callback() is not wait_until_deadline:
        psycopg2.extensions.set_wait_callback(wait_until_deadline)
