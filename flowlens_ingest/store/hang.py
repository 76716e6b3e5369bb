"""A database known to hang costs a call nothing: the per-process state, and the one probe that ends it.

Known hung: this process's calls fail at once, with no wait and no connection
checked out, so a request goes straight to the spool; waits already under way end
at once too. One background thread per process probes the database (a new
connection, `SELECT 1`, a deadline of its own); its first answer ends the state.

How it becomes known, whichever comes first:
- a probe misses its deadline. A probe starts when a wait outlasts SLOW_WAIT_S
  (deadline.py: far longer than a healthy delivery's transaction), at most one
  every PROBE_INTERVAL_S. A server that only runs a statement slowly (a lock wait)
  still answers the probe at once: not hung, and the slow call goes on;
- a call misses its own deadline (its statement timeout plus a margin: the server
  did not even answer to say it cancelled the statement).
A refused connection is no hang: it fails in milliseconds on its own.

The state is per process: each gunicorn worker finds out for itself and probes for
itself. A state set before a fork is not inherited: the child has not seen the
hang, and has no probe thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import psycopg2

from flowlens_ingest.store.deadline import DeadlinePassed

log = logging.getLogger(__name__)

# While the database is known hung, a probe every this many seconds: it is found answering
# within about PROBE_INTERVAL_S of coming back. Also the least time between two probes
# started by slow waits.
PROBE_INTERVAL_S = 1.0
# A new connection and `SELECT 1` take milliseconds on a server that answers, even a busy one:
# silent this long, it hangs. A hang is known SLOW_WAIT_S + PROBE_DEADLINE_S after it began.
PROBE_DEADLINE_S = 2.0
# How far along an exception's causes a DeadlinePassed is looked for (SQLAlchemy wraps it once,
# the retry loop once more).
_CAUSES = 4


def missed_deadline(exc: BaseException) -> bool:
    """`exc` is, or was caused by, a wait past its deadline (DeadlinePassed)."""
    found: BaseException | None = exc
    for _ in range(_CAUSES):
        if found is None:
            return False
        if isinstance(found, DeadlinePassed) or isinstance(getattr(found, "orig", None), DeadlinePassed):
            return True
        found = found.__cause__
    return False


class Hang:
    """Whether this process knows its database to hang, and the probe thread that finds out (a deadline.Watch)."""

    def __init__(self, probe: Callable[[], None], *, interval: float = PROBE_INTERVAL_S) -> None:
        """`probe`: returns when the database answered within its own deadline, raises psycopg2.Error otherwise."""
        self._probe = probe
        self._interval = interval
        self._lock = threading.Lock()
        # The process that knows the database hung (0: none), and since when.
        self._pid = 0
        self._since = 0.0
        # The process whose probe thread runs (0: none), and when its last one ended.
        self._prober = 0
        self._probed_at = -interval
        # Set to end the running probe thread early (dispose); a new one per thread.
        self._stopping = threading.Event()

    @property
    def known(self) -> bool:
        """This process knows the database to hang: its calls fail at once, without waiting on it."""
        return self._pid == os.getpid()

    def slow(self) -> None:
        """A wait outlasted SLOW_WAIT_S: probe now, unless a probe runs or ended less than an interval ago."""
        pid = os.getpid()
        with self._lock:
            if self._prober != pid and time.monotonic() - self._probed_at >= self._interval:
                self._start(pid)

    def missed(self) -> None:
        """A call's own deadline passed: known hung from now on, until a probe finds the database answering."""
        pid = os.getpid()
        with self._lock:
            if self._pid == pid:
                return
            self._hung(pid)
            if self._prober != pid:
                self._start(pid)

    def forget(self) -> None:
        """End the state and its probe thread (the database is being disposed of)."""
        with self._lock:
            self._pid = self._prober = 0
            self._stopping.set()

    def _hung(self, pid: int) -> None:
        """Known hung from now on (under the lock)."""
        self._pid = pid
        self._since = time.monotonic()
        log.warning("database hung: deliveries go to the spool until it answers again")

    def _start(self, pid: int) -> None:
        """Start this process's probe thread (under the lock)."""
        self._prober = pid
        self._stopping = stopping = threading.Event()
        thread = threading.Thread(
            target=self._probing, args=(pid, stopping), name="flowlens-database-probe", daemon=True
        )
        thread.start()

    def _probing(self, pid: int, stopping: threading.Event) -> None:
        """Probe until the database answers, or is found not to hang (or `stopping`).

        Each probe has its own deadline, and while the database is known hung they come
        one every interval: the loop ends when the database answers (or on dispose).
        """
        probes = 0
        while not stopping.is_set():
            if self.known and stopping.wait(self._interval):
                return
            probes += 1
            try:
                self._probe()
            except DeadlinePassed:  # silent past the probe's deadline: hung
                with self._lock:
                    if self._pid != pid and self._stopping is stopping:
                        self._hung(pid)
                continue
            except psycopg2.Error:  # refused, or gone: fast failures, no hang unless one is known
                # Asked under the lock as the thread ends: a call that misses its deadline meanwhile
                # starts no probe of its own (this one runs), so this one must go on.
                if self._end(stopping, cleared_by=None, probes=probes, unless_hung=pid):
                    return
                continue
            except Exception:
                # A bug in the probe must not leave the process hung for good: the state ends,
                # and the calls themselves find a hang again (a slow wait, a missed deadline).
                log.exception("database probe failed")
                self._end(stopping, cleared_by="a probe error", probes=probes)
                return
            self._end(stopping, cleared_by="an answer", probes=probes)
            return

    def _end(self, stopping: threading.Event, *, cleared_by: str | None, probes: int, unless_hung: int = 0) -> bool:
        """The probe thread ends (False: it goes on, process `unless_hung` being known hung); `cleared_by`
        (an answer, or a probe error): no longer known hung."""
        with self._lock:
            if self._stopping is not stopping:
                return True
            if unless_hung and self._pid == unless_hung:
                return False
            hung_s = time.monotonic() - self._since if cleared_by and self._pid != 0 else None
            if cleared_by:
                self._pid = 0
            self._prober = 0
            self._probed_at = time.monotonic()
        if hung_s is not None and cleared_by == "an answer":
            log.warning("database answering again", extra={"hung_s": round(hung_s, 1), "probes": probes})
        elif hung_s is not None:
            log.warning("database no longer taken as hung after %s", cleared_by, extra={"hung_s": round(hung_s, 1)})
        return True
