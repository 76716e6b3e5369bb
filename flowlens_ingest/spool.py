"""A local, durable spool for deliveries that arrive while the database is down.

One file per delivery: written to a temporary name, fsynced, renamed into place
(atomic), and the folder fsynced, so a crash never leaves half a delivery. File
names start with a nanosecond clock, so draining in name order is arrival order.
The journal makes applying twice harmless, so two workers (or two VMs sharing
nothing) draining at once cannot apply a delivery twice.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

SUFFIX = ".delivery"


@dataclass(frozen=True)
class Spooled:
    """One spooled delivery: its headers and the raw body as received."""

    path: Path
    delivery_id: str
    hook_id: int
    event: str
    content_type: str
    body: bytes


class Spool:
    """A folder of spooled deliveries, bounded in bytes."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def _files(self) -> list[Path]:
        try:
            return sorted(p for p in self.directory.iterdir() if p.name.endswith(SUFFIX))
        except FileNotFoundError:
            return []

    def depth(self) -> int:
        """How many deliveries wait in the spool."""
        return len(self._files())

    def used_bytes(self) -> int:
        """Bytes the spooled deliveries take."""
        total = 0
        for path in self._files():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def put(self, delivery_id: str, hook_id: int, event: str, content_type: str, body: bytes) -> bool:
        """Store a delivery durably; False when the spool is full or cannot be written."""
        header = json.dumps(
            {"delivery_id": delivery_id, "hook_id": hook_id, "event": event, "content_type": content_type}
        ).encode()
        data = header + b"\n" + body
        with self._lock:
            try:
                if self.used_bytes() + len(data) > self.max_bytes:
                    log.error("spool full", extra={"spool_bytes": self.max_bytes})
                    return False
                self.directory.mkdir(parents=True, exist_ok=True)
                name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                tmp = self.directory / f".{name}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, self.directory / f"{name}{SUFFIX}")
                dir_fd = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            except OSError:
                log.exception("spool write failed")
                return False
        return True

    @staticmethod
    def read(path: Path) -> Spooled:
        """Load one spooled delivery."""
        data = path.read_bytes()
        header, _, body = data.partition(b"\n")
        meta = json.loads(header)
        return Spooled(
            path=path,
            delivery_id=meta["delivery_id"],
            hook_id=int(meta["hook_id"]),
            event=meta["event"],
            content_type=meta["content_type"],
            body=body,
        )

    def drain(self, handle: Callable[[Spooled], None]) -> int:
        """Hand each spooled delivery, oldest first, to `handle`; remove it once handled.

        `handle` raising stops the drain (the database went away again) and keeps
        the file. Returns how many deliveries were handled.
        """
        done = 0
        for path in self._files():
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # another worker took it
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another worker is on it
                if not path.exists():
                    continue
                handle(self.read(path))
                path.unlink(missing_ok=True)
                done += 1
            finally:
                os.close(fd)
        return done


class Drainer(threading.Thread):
    """A worker's background thread that empties the spool once the database is back."""

    def __init__(self, spool: Spool, handle: Callable[[Spooled], None], interval: float = 1.0,
                 on_depth: Callable[[int], None] | None = None) -> None:
        super().__init__(name="flowlens-spool-drainer", daemon=True)
        self.spool = spool
        self.handle = handle
        self.interval = interval
        self.on_depth = on_depth
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                depth = self.spool.depth()
                if self.on_depth is not None:
                    self.on_depth(depth)
                if depth:
                    drained = self.spool.drain(self.handle)
                    if drained:
                        log.info("spool drained", extra={"drained": drained})
            except Exception as exc:  # keep the thread alive; the next tick tries again
                log.warning("spool drain paused: %s", type(exc).__name__)
