"""A local, durable spool for deliveries that arrive while the database is down.

One file per delivery: written to a temporary name, fsynced, renamed into place
(atomic), and the folder fsynced, so a crash never leaves half a delivery. File
names start with a nanosecond clock, so draining in name order is arrival order (but for a
delivery the database cancelled or our code failed on, passed over: see `Spool.drain`),
and end with the file's size (`{ns:020d}-{pid}-{hex8}-{bytes}.delivery`), so the
folder's total is read from a listing without a stat per file. Names without the
size (`{ns:020d}-{pid}-{hex8}.delivery`, written before it was added) are still
drained; only they are stat'ed.

A file holds the delivery's envelope as one JSON line (every field: ids, event,
content type, hook target, arrival; `Envelope.spool_header` in events/envelope.py),
a newline, then the body exactly as signed. Files of earlier versions, whose line
lacks the later fields, decode with those fields' defaults.

The size bound costs a put nothing that grows with the spool: each process keeps
an estimate, the folder's total at its last scan plus what it has put since, and a
put compares with that under a lock of this process only. The scan is the drainer's
tick (every worker runs one, once a second: `refresh`). So the bound is exact within
a worker, and across the workers of a host it may be passed by what the *other*
workers put since this one's last scan: at most about a second of their traffic.
The next tick sees it, and every worker refuses until the drain makes room.

Workers of one host share the folder; a drain takes the drain lock, so one worker
at a time drains, oldest first. The journal makes applying twice harmless, so two
hosts draining copies of one delivery (or a crash between apply and unlink) still
apply it once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from flowlens_ingest.events.envelope import Envelope
from flowlens_ingest.files import read_regular_file
from flowlens_ingest.ingest import Disposition, Result

log = logging.getLogger(__name__)

SUFFIX = ".delivery"
# Where a file that can never be applied goes, so it stops blocking the ones after it.
UNUSABLE_SUFFIX = ".unusable"
DRAIN_LOCK = ".drain.lock"
# A temporary file this old belongs to a write that crashed before its rename: the
# sender got no 202 for it, so it is safe to remove.
STALE_TMP_S = 300.0
# At start, before this host's workers run: a write takes milliseconds, so a minute-old
# temporary file is a crashed one (another instance sharing the folder may be writing).
PARTIAL_AT_START_S = 60.0
# A body given as a file is copied into the spool this much at a time.
COPY_CHUNK_BYTES = 1024 * 1024
# A delivery the drain passed over (the database cancelled it: a timeout, out of memory; or a bug) is tried
# again after a quarter of the time it has waited in the spool, within these bounds.
PASSED_OVER_WAIT_S = 2.0
PASSED_OVER_MAX_WAIT_S = 300.0


class Unusable(Exception):
    """A file in the spool that is not a spooled delivery (Spool.read)."""


# Why a file in the spool will never be read, whatever the drain does: set aside (Spool.read).
_UNREADABLE = frozenset(
    # ENXIO, ENODEV: a socket or a device by that name, opened without waiting.
    {errno.EACCES, errno.EPERM, errno.EISDIR, errno.ELOOP, errno.EIO, errno.ENAMETOOLONG, errno.ENXIO, errno.ENODEV}
)


@dataclass(frozen=True)
class Spooled:
    """One spooled delivery: its envelope (every header field, and when it arrived) and the raw body."""

    path: Path
    envelope: Envelope
    body: bytes


def _arrived(name: str) -> float:
    """When a spooled delivery arrived (epoch seconds), from its file name; 0 for a name without it."""
    stamp = name.split("-", 1)[0]
    return int(stamp) / 1e9 if stamp.isascii() and stamp.isdigit() else 0.0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A folder of spooled deliveries, bounded in bytes."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        on_set_aside: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        # Wall-clock seconds, as file times are: a passed-over delivery's wait is its file's mtime.
        self._clock = clock
        # Called once per delivery set aside (a metric counts them).
        self.on_set_aside = on_set_aside
        self._lock = threading.Lock()
        # The estimate a put checks: bytes in the folder at the last scan, bytes this
        # process renamed into it since, and bytes of its puts still being written.
        self._scanned = 0
        self._added = 0
        self._writing = 0
        # Deliveries set aside (*.unusable) at the last listing, and their bytes.
        self.unusable = 0
        self.unusable_bytes = 0
        # Unusable files the drain could not rename aside (said once each).
        self._not_renamed: set[str] = set()
        # What earlier runs left counts from the start. A folder that cannot be read
        # here cannot be written either: its puts will fail and say so.
        with contextlib.suppress(OSError):
            self.refresh()

    def _names(self) -> list[str]:
        """The spooled files' names, in no order (and, in `unusable`, how many are set aside).

        Plain strings: a sorted list of Paths made the drainer's tick over 20,000 files
        cost ~110 ms a second in every worker, names ~15 ms.
        """
        try:
            with os.scandir(self.directory) as entries:
                names = [entry.name for entry in entries]
        except FileNotFoundError:
            names = []
        # Counted in the same listing: the tick reports them, an operator acts on them. Their bytes
        # stay on this disk, so they count against the bound too (a delivery set aside at every
        # tick must not fill the disk past it).
        aside = [name for name in names if name.endswith(UNUSABLE_SUFFIX)]
        self.unusable = len(aside)
        self.unusable_bytes = sum(self._size(name) for name in aside)
        return [name for name in names if name.endswith(SUFFIX)]

    def _size(self, name: str) -> int:
        """The bytes of a spooled (or set-aside) file: from its name, or from a stat for a name without them."""
        fields = name.removesuffix(UNUSABLE_SUFFIX).removesuffix(SUFFIX).split("-")
        if len(fields) == 4 and fields[3].isascii() and fields[3].isdigit():
            return int(fields[3])
        try:
            return os.stat(self.directory / name).st_size
        except OSError:  # drained meanwhile, or no file a stat can follow (read sets it aside)
            return 0

    @contextlib.contextmanager
    def _flock(self, name: str, *, wait: bool) -> Iterator[bool]:
        """Hold the folder-wide lock `name` (True), or yield False when busy and not waiting."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def depth(self) -> int:
        """How many deliveries wait in the spool."""
        return len(self._names())

    def oldest(self) -> datetime | None:
        """When the delivery that has waited longest arrived (from its file name); None when none waits."""
        names = self._names()
        if not names:
            return None
        arrived = _arrived(min(names))
        return datetime.fromtimestamp(arrived, tz=UTC) if arrived else None

    def used_bytes(self) -> int:
        """Bytes the spooled deliveries take, those set aside included (a scan of the folder)."""
        return sum(self._size(name) for name in self._names()) + self.unusable_bytes

    def refresh(self) -> int:
        """Scan the folder: set this process's estimate to its total; return its depth (the drainer's tick)."""
        with self._lock:
            seen_added = self._added
        names = self._names()
        total = sum(self._size(name) for name in names) + self.unusable_bytes
        with self._lock:
            # A put renamed during the scan may be counted twice until the next scan
            # (by the listing and in _added): an estimate too high, never too low.
            self._scanned = total
            self._added -= seen_added
        return len(names)

    def estimate(self) -> int:
        """Bytes this process believes the spool holds (see the module's docstring)."""
        with self._lock:
            return self._scanned + self._added + self._writing

    def put(self, envelope: Envelope, body: bytes | IO[bytes]) -> bool:
        """Store a delivery durably, every field of its envelope kept; False when the spool is full or cannot be written.

        `body`: its bytes, or a file holding them from where it stands to its end, copied in
        chunks (a large delivery spooled raw is never whole in memory). No listing, no stat of
        other files and no lock shared with other workers: the cost does not grow with what the
        spool holds.
        """
        arrived = time.time_ns()
        header = envelope.spool_header(arrived) + b"\n"
        if isinstance(body, bytes):
            length = len(body)
        else:
            start = body.tell()
            length = body.seek(0, io.SEEK_END) - start
            body.seek(start)
        size = len(header) + length
        with self._lock:
            if self._scanned + self._added + self._writing + size > self.max_bytes:
                log.error("spool full", extra={"spool_bytes": self.max_bytes})
                return False
            # Held for this write, so this worker's other threads count it while it is written.
            self._writing += size
        written = False
        try:
            written = self._write(f"{arrived:020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{size}", header, body)
        finally:
            with self._lock:
                self._writing -= size
                if written:
                    self._added += size
        return written

    def _write(self, name: str, header: bytes, body: bytes | IO[bytes]) -> bool:
        """Write `header` then `body` to `name`.delivery atomically and durably; False (logged) when it fails."""
        tmp = self.directory / f".{name}.tmp"
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:  # the first put into a folder not made yet
                self.directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, header)
                if isinstance(body, bytes):
                    _write_all(fd, body)
                else:
                    while chunk := body.read(COPY_CHUNK_BYTES):
                        _write_all(fd, chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.directory / f"{name}{SUFFIX}")
            _fsync_dir(self.directory)
        except OSError:
            log.exception("spool write failed")
            # A full disk leaves half a file: it was never promised to anyone.
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        return True

    @staticmethod
    def read(path: Path) -> Spooled:
        """Load one spooled delivery, of this version's format or an earlier one; Unusable when the file is not one.

        FileNotFoundError when it is gone (another drain took it); Unusable too when this file will never
        be read (no permission, a directory by that name, an I/O error on it): set aside, it no longer
        stops every drain in front of the deliveries behind it. A passing failure of the process or the
        system (out of file descriptors or memory, a stale handle) is raised as it is: the drain stops
        and tries again, setting nothing aside.
        """
        try:
            # Never a symlink followed (ELOOP), never a FIFO or a device waited on or read without end
            # (EISDIR, which the spool sets aside as it does a directory).
            data = read_regular_file(path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in _UNREADABLE:
                raise
            raise Unusable(f"unreadable: {errno.errorcode.get(exc.errno or 0, type(exc).__name__)}") from None
        header, _newline, body = data.partition(b"\n")
        try:
            return Spooled(path=path, envelope=Envelope.from_spool_header(header), body=body)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise Unusable(f"not a spooled delivery: {type(exc).__name__}") from None

    def set_aside(self, path: Path, reason: str) -> None:
        """Rename an unusable file out of the drain's way; it stays for an operator to see."""
        try:
            os.rename(path, path.with_name(path.name + UNUSABLE_SUFFIX))
            _fsync_dir(self.directory)
        except FileNotFoundError:
            return  # another drain took it
        except OSError:
            # Left where it is: every drain meets it and goes past it; said once, not on every tick.
            if path.name not in self._not_renamed:
                self._not_renamed.add(path.name)
                log.exception("spooled delivery cannot be set aside", extra={"file": path.name, "reason": reason})
            return
        log.error("spooled delivery set aside", extra={"file": path.name, "reason": reason})
        if self.on_set_aside is not None:
            self.on_set_aside()

    def _waiting(self, path: Path, name: str) -> tuple[bool, bool]:
        """Whether a file is still in the wait it was passed over with, and whether it ever was.

        The wait is the file's modification time set ahead (`_pass_over`): every worker of the
        host and a restarted one honour it. A file never passed over was last modified when it was
        spooled, and is never waiting, whatever the clocks; a time further ahead than any wait
        (the clock was set back) is over.
        """
        try:
            modified = os.stat(path).st_mtime
        except OSError:
            return False, False  # gone, or unreadable: reading it says which
        # A pass-over sets it at least PASSED_OVER_WAIT_S past the arrival; a write never takes that long.
        passed_before = modified > _arrived(name) + PASSED_OVER_WAIT_S - 0.1
        now = self._clock()
        return passed_before and now < modified <= now + PASSED_OVER_MAX_WAIT_S, passed_before

    def _pass_over(self, path: Path, name: str, before: bool, reason: str) -> None:
        """Keep a delivery the database cancelled (or our code failed on), for a quarter of its time in the spool."""
        now = self._clock()
        wait = min(max((now - _arrived(name)) / 4, PASSED_OVER_WAIT_S), PASSED_OVER_MAX_WAIT_S)
        try:
            os.utime(path, (now, now + wait))
        except OSError:
            return  # gone (another drain took it); if it cannot be touched, the next drain meets it again
        if not before:
            # Said once a delivery; its file and the spool's depth show it until it applies.
            log.warning(
                "spooled delivery passed over: the database cancelled it (a timeout, out of memory) or a bug; the rest drain,"
                " it is tried again later",
                extra={"file": name, "reason": reason, "retry_in_s": round(wait, 1)},
            )

    def remove_partial_files(self, older_than: float = STALE_TMP_S) -> None:
        """Delete the temporary files of writes that never finished (0: all, when no writer runs)."""
        now = time.time()
        for path in self.directory.glob(".*.tmp"):
            # Gone meanwhile, or not a file of ours to remove (a directory by that name): left alone.
            with contextlib.suppress(OSError):
                if now - path.lstat().st_mtime >= older_than:
                    path.unlink()

    def drain(self, handle: Callable[[Spooled], Result], stop: threading.Event | None = None) -> tuple[int, str | None]:
        """Hand each spooled delivery, oldest first, to `handle`, and act on its disposition; between two, `stop` ends it.

        Done: the file is removed. Set aside: it is renamed out of the drain's way.
        Retry later: the drain stops there and keeps the file (the database went away
        again). Only one drain per folder runs at a time (others return at once), so
        the host applies its spool in arrival order. Returns how many deliveries were
        done, and why the drain stopped early (None when it went through).

        One exception to stopping: a delivery the server cancelled (its statement or lock
        timeout: a lock held on its rows; out of memory, a body too large), or one our code
        failed on (a bug its content trips: ingest.bug), may be that delivery's trouble alone. It is kept and passed over, and the drain goes on with the
        ones behind it; it is tried again after a quarter of the time it has waited in the
        spool (PASSED_OVER_WAIT_S to PASSED_OVER_MAX_WAIT_S), by whichever worker drains then.
        A second cancelled right after it, nothing applied between, is the database's trouble,
        not the deliveries': the drain stops there, that one kept first in line.
        """
        done = 0
        with self._flock(DRAIN_LOCK, wait=False) as mine:
            if not mine:
                return 0, None
            self.remove_partial_files()
            cancelled_in_a_row = 0
            for name in sorted(self._names()):
                if stop is not None and stop.is_set():
                    # The worker is stopping: the delivery under way is done, the rest wait for a drain.
                    stopped = "stopping"
                    break
                path = self.directory / name
                waiting, passed_before = self._waiting(path, name)
                if waiting:
                    continue
                try:
                    item = self.read(path)
                except FileNotFoundError:
                    continue  # a drain on another host sharing the folder took it
                except Unusable as exc:
                    self.set_aside(path, str(exc))
                    continue
                result = handle(item)
                if result.disposition is Disposition.RETRY_LATER:
                    cancelled_in_a_row = cancelled_in_a_row + 1 if result.may_pass_over else 2
                    if cancelled_in_a_row < 2:
                        self._pass_over(path, name, passed_before, result.error or "cancelled")
                        continue
                    # Two in a row, nothing applied between: the database, not the deliveries. This
                    # one stays where it is, first in line for the next drain.
                    stopped = result.error or "retry later"
                    break
                cancelled_in_a_row = 0
                if result.disposition is Disposition.SET_ASIDE:
                    self.set_aside(path, result.error or "refused")
                    continue
                # Applied and journaled: a crash before this unlink only means the
                # journal answers `duplicate` on the next drain.
                path.unlink(missing_ok=True)
                done += 1
            else:
                stopped = None
            if done:
                _fsync_dir(self.directory)
        return done, stopped
