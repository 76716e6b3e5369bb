"""What large deliveries may hold in memory at once, per process: one at a time.

A large delivery costs several times its size while it is read back, parsed and
journaled (the bytes, the text, the objects, the SQL literal that carries it): four
threads of one worker taking 25 MB deliveries together took it past a gigabyte. So a
body over LARGE_BYTES is handled only in its turn, one at a time per process, by the
view (web/webhook.py, which waits a bounded time and else spools it raw) and by the
spool's drainer alike; small bodies never wait. docs/reliability.md, Memory, gives
the bound this makes and how it was measured (bench/memory.py).
"""

from __future__ import annotations

import threading

# Past this a body is large: read_signed has already put it on disk (MEMORY_BYTES there),
# and GitHub's ordinary deliveries (a few to a hundred KB) are far below it.
LARGE_BYTES = 1024 * 1024


class LargeBodies:
    """At most `at_once` large bodies in memory at a time; the others wait their turn, each for a bounded time."""

    def __init__(self, at_once: int = 1) -> None:
        self._turns = threading.BoundedSemaphore(at_once)

    def take(self, size: int, wait_s: float) -> bool | None:
        """None for a small body (it needs no turn); else whether a turn came within `wait_s` seconds.

        A True answer is ended with `give_back`.
        """
        if size <= LARGE_BYTES:
            return None
        return self._turns.acquire(timeout=max(wait_s, 0.0))

    def give_back(self) -> None:
        """End a turn `take` gave."""
        self._turns.release()


# This process's. gunicorn forks its workers before any request (no preload): each has its own.
LARGE = LargeBodies()
