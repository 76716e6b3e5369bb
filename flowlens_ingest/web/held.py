"""Repositories whose last delivery timed out: their next deliveries are spooled at once.

A delivery of ordinary size the server cancels at its statement or lock timeout (a session holding
its repository's row; the server too slow for it) costs a request thread that whole timeout, 5 s.
Under steady traffic to that repository every thread soon waits on it, requests queue behind them,
and answers to every repository leave past GitHub's 10 s. So after one is cancelled so, that
repository's deliveries go to the spool for HOLD_S without a statement (the drainer applies them,
passing over what is still held); other repositories are not touched. A large delivery (which may
time out for its own weight) and one cancelled for memory hold nothing. Per process, at most
MAX_HELD entries.

Once WIDE repositories are held at once, the trouble is the database's, not one row's (a lock on a
whole table, as an ALTER TABLE queued behind a long transaction takes; a server too slow for any
statement): every repository's deliveries are spooled until the holds end, or each would cost a
thread its timeout and answers would again queue past GitHub's 10 s.
"""

from __future__ import annotations

import threading
import time

# How long a repository's deliveries are spooled at once after one was cancelled.
HOLD_S = 30.0
# Repositories remembered at once; past it the oldest hold is dropped (it ends soon anyway).
MAX_HELD = 1_000
# Repositories held at once past which every repository's deliveries are held.
WIDE = 3


class HeldRepositories:
    """The repositories of this process whose last delivery timed out, until when."""

    def __init__(self, hold_s: float = HOLD_S) -> None:
        self.hold_s = hold_s
        self._lock = threading.Lock()
        self._until: dict[int, float] = {}

    def cancelled(self, repository_id: int | None) -> None:
        """A delivery of this repository waited out its timeout: hold the next ones."""
        if repository_id is None:
            return
        now = time.monotonic()
        with self._lock:
            self._until.pop(repository_id, None)
            if len(self._until) >= MAX_HELD:
                self._until.pop(next(iter(self._until)))
            self._until[repository_id] = now + self.hold_s

    def held(self, repository_id: int | None) -> bool:
        """Whether this repository's deliveries go to the spool without a statement now (so do all, once WIDE are held)."""
        if not self._until:
            return False
        now = time.monotonic()
        with self._lock:
            ended = [held for held, until in self._until.items() if until <= now]
            for held in ended:
                del self._until[held]
            return len(self._until) >= WIDE or repository_id in self._until
