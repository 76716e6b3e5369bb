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

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from typing import Any

# Past this a body is large: read_signed has already put it on disk (MEMORY_BYTES there),
# and GitHub's ordinary deliveries (a few to a hundred KB) are far below it.
LARGE_BYTES = 1024 * 1024


def resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# glibc's mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Blocks from this size up are mapped on their own and unmapped when freed: every large
# delivery's bytes, text and SQL literal go back to the system at once.
MMAP_THRESHOLD_BYTES = 256 * 1024
# Threads share this many malloc arenas: each arena keeps what its threads freed.
ARENA_MAX = 2


def _glibc() -> Any | None:
    """The C library, when it is glibc (mallopt, malloc_trim); else None (musl, macOS): nothing tuned."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _glibc()


def tune_allocator() -> bool:
    """Make glibc give back what large deliveries take; once per process, before its threads start.

    By default glibc raises its mmap threshold to the size of the last large block freed
    (up to 32 MB), so after the first 20 MB delivery every later one is carved from a heap
    that keeps it; and each thread may get an arena of its own that keeps what it freed.
    A fixed threshold (which also stops that adjustment) and two arenas: measured in
    docs/reliability.md, Memory. False where the C library is not glibc.
    """
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and _LIBC.mallopt(_M_ARENA_MAX, ARENA_MAX))


def trim() -> None:
    """Hand the pages malloc holds free back to the system (glibc's malloc_trim)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class LargeBodies:
    """At most `at_once` large bodies in memory at a time; the others wait their turn, each for a bounded time.

    `when_heavy`, when set (gunicorn_conf sets it in each worker, to recycle the worker),
    is called once a turn ends with the process still above `heavy_bytes`
    (FLOWLENS_RECYCLE_ABOVE_MB): what the allocator keeps after a trim, a new process
    gives back. A worker serving ordinary deliveries holds 60-70 MB (docs/benchmark.md).
    """

    def __init__(self, at_once: int = 1) -> None:
        self._turns = threading.BoundedSemaphore(at_once)
        self._lock = threading.Lock()
        self._waiting = 0
        self.when_heavy: Callable[[], None] | None = None
        self.heavy_bytes = 256 * 1024 * 1024

    def take(self, size: int, wait_s: float) -> bool | None:
        """None for a small body (it needs no turn); else whether a turn came within `wait_s` seconds.

        A True answer is ended with `give_back`.
        """
        if size <= LARGE_BYTES:
            return None
        with self._lock:
            self._waiting += 1
        try:
            return self._turns.acquire(timeout=max(wait_s, 0.0))
        finally:
            with self._lock:
                self._waiting -= 1

    def take_if_free(self, size: int) -> bool | None:
        """As `take`, for work that can wait (the spool's drainer): a turn only when free and nobody waits for one.

        A request answers within GitHub's 10 s; a spooled delivery has already been answered.
        """
        if size <= LARGE_BYTES:
            return None
        with self._lock:
            return self._waiting == 0 and self._turns.acquire(blocking=False)

    def give_back(self) -> None:
        """End a turn `take` gave; say when the process stays heavy after it."""
        self._turns.release()
        if self.when_heavy is not None:
            # Only where a worker can be recycled: elsewhere (tests, the development
            # server) the trim's cost buys nothing anyone measures.
            trim()
            if resident_bytes() > self.heavy_bytes:
                self.when_heavy()


# This process's. gunicorn forks its workers before any request (no preload): each has its own.
LARGE = LargeBodies()
