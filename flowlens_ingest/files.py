"""Files the service is handed (a payload, a key, a kept secret, a spooled delivery): read whole, never waited on.

A name may lead to a FIFO nobody writes (an open that waits for ever), a device that never ends
(`/dev/zero`), or a file far larger than anything it should hold: each is refused as an OSError
before its bytes are held, the caller saying which file and why in its own words.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def read_regular_file(path: Path, max_bytes: int | None = None, *, follow_symlinks: bool = True) -> bytes:
    """The bytes of a regular file, at most `max_bytes` of them.

    Raises IsADirectoryError (EISDIR, "not a regular file") for a directory, FIFO, socket or device,
    opened without waiting for a writer; OSError EFBIG past `max_bytes` (read up to one byte more,
    never further); ELOOP for a symlink when `follow_symlinks` is False; whatever the open raises.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", str(path))
        data = file.read() if max_bytes is None else file.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", str(path))
    return data
