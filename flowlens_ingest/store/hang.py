"""A database known to hang costs a call nothing: the per-process state, and the one probe that ends it.

A server that let a call's own deadline pass (its statement timeout plus a margin:
it did not even answer to say it cancelled the statement) is taken to hang: a
partition, a stopped node. From then on this process's calls fail at once, with
no wait and no connection checked out, so a request goes straight to the spool.
One background thread per process, and only while the database is known hung,
probes it every PROBE_INTERVAL_S with a deadline of its own; the first answer
ends the state, and calls go to the database again.

The state is per process: each gunicorn worker finds out for itself (its first
call past the deadline) and probes for itself. A state set before a fork is not
inherited: the child has not seen the hang, and has no probe thread.
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

# A probe starts this long after the hang was found and after each probe that failed: the
# database is found answering within about PROBE_INTERVAL_S + its deadline of coming back.
PROBE_INTERVAL_S = 1.0
# A new connection and `SELECT 1` take milliseconds on a server that answers, even a busy one.
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
    """Whether this process knows its database to hang, and the probe thread that finds it back."""

    def __init__(self, probe: Callable[[], None], *, interval: float = PROBE_INTERVAL_S) -> None:
        """`probe`: returns when the database answered within its own deadline, raises psycopg2.Error otherwise."""
        self._probe = probe
        self._interval = interval
        self._lock = threading.Lock()
        # The process that knows the database hung (0: none); set while its probe thread runs.
        self._pid = 0
        self._since = 0.0
        # Set to end this hang's probe thread early (dispose); a new one per hang.
        self._stopping = threading.Event()

    @property
    def known(self) -> bool:
        """This process knows the database to hang: its calls fail at once, without waiting on it."""
        return self._pid == os.getpid()

    def missed(self) -> None:
        """A call's own deadline passed: known hung from now on, until the probe finds the database answering."""
        pid = os.getpid()
        with self._lock:
            if self._pid == pid:
                return
            self._pid = pid
            self._since = time.monotonic()
            self._stopping = threading.Event()
            stopping = self._stopping
        log.warning("database hung: deliveries go to the spool until it answers again")
        threading.Thread(
            target=self._probing, args=(pid, stopping), name="flowlens-database-probe", daemon=True
        ).start()

    def forget(self) -> None:
        """End the state and its probe thread (the database is being disposed of)."""
        with self._lock:
            self._pid = 0
            self._stopping.set()

    def _probing(self, pid: int, stopping: threading.Event) -> None:
        """Probe every interval until the database answers (or `stopping`); each probe has its own deadline."""
        probes = 0
        while not stopping.wait(self._interval):
            probes += 1
            try:
                self._probe()
            except psycopg2.Error:  # still silent, or refusing: the next probe asks again
                continue
            except Exception:  # a bug in the probe must not leave the process hung for good
                log.exception("database probe failed")
                continue
            with self._lock:
                if self._pid != pid or self._stopping is not stopping:
                    return
                self._pid = 0
                hung_s = time.monotonic() - self._since
            log.warning("database answering again", extra={"hung_s": round(hung_s, 1), "probes": probes})
            return
