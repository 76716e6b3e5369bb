"""Whether this process's database has this release's schema, as last found: asked, never tried.

A worker's drainer asks (`check`) as it meets spooled deliveries; the request path reads the
answer (`problem`) without a database call. A worker without a drainer (the spool off) asks from
its request path instead (`current`), at most once every `ask_again_s` while the schema is not
ready. While the schema is known not ready (not migrated yet, a release ahead of its migration),
a delivery is spooled without a statement sent: each would be refused, an error in the server's
log with the statement's text.
"""

from __future__ import annotations

import math
import threading
import time

from flowlens_ingest.store import migrate
from flowlens_ingest.store.database import Database

# How long a schema found ready is trusted before it is asked again.
RECHECK_S = 10.0
# A worker without a drainer (the spool off) asks a schema found not ready again this often,
# from its request path: at most one question a second, where each delivery would be refused.
ASK_AGAIN_S = 1.0


class Readiness:
    """The schema's state as last asked: a problem (naming the command that fixes it), or None."""

    def __init__(self, database: Database, *, recheck_s: float = RECHECK_S) -> None:
        self.database = database
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self._problem: str | None = None
        self._checked_at = -math.inf
        self.ask_again_s = ASK_AGAIN_S
        self._asked_at = -math.inf

    @property
    def problem(self) -> str | None:
        """Why the schema is not ready, as last found; None when it was ready (or never asked)."""
        return self._problem

    def current(self) -> str | None:
        """The problem, asked again first when it was last asked `ask_again_s` ago or more: for a worker
        with no drainer to ask (the spool off), whose request path is then the one to find it fixed."""
        with self._lock:
            due = self._problem is not None and time.monotonic() - self._asked_at >= self.ask_again_s
            if due:
                # Taken by this thread: the worker's other threads answer from what is known meanwhile.
                self._asked_at = time.monotonic()
        if due:
            self.check()
        return self._problem

    def assume(self, problem: str) -> None:
        """Take `problem` as the state until the next `check` (what gunicorn's master found at start)."""
        with self._lock:
            self._problem = problem

    def check(self) -> str | None:
        """Ask the database when due (every call while not ready, every `recheck_s` once ready); the problem.

        A database that does not answer says nothing of its schema: that is returned as a problem
        but not kept, and the next call asks again.
        """
        with self._lock:
            if self._problem is None and time.monotonic() - self._checked_at < self.recheck_s:
                return None
            self._asked_at = time.monotonic()
        try:
            with self.database.bounded():
                problem = migrate.pending(self.database.engine)
        except Exception as exc:  # unreachable, hung: nothing learned about the schema
            return f"database unavailable ({type(exc).__name__})"
        with self._lock:
            self._problem = problem
            self._checked_at = time.monotonic()
        return problem
