"""A request body read once, in chunks, through the signature's HMACs into a spooled file.

The body is never held whole before its signature is known: each chunk goes through
one HMAC-SHA256 per secret and into a `SpooledTemporaryFile` (in memory up to
MEMORY_BYTES, then a temporary file in `TMPDIR`), so unsigned multi-megabyte bodies
cost a worker some disk writes, not resident memory. The check is signature.py's
(raw bytes, `sha256=` only, constant-time comparison against every secret); the
view reads the bytes back only once they are known to be signed.

A large signed body (over memory.LARGE_BYTES) is read back and parsed only in its
turn: at most one at a time per worker process (memory.LargeBodies), the rest
waiting on disk.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Iterable
from typing import IO

from flowlens_ingest.events.signature import StreamingVerifier

CHUNK_BYTES = 64 * 1024
MEMORY_BYTES = 1024 * 1024


class BodyNotKept(OSError):
    """The temporary file a body goes through could not be written (TMPDIR full, an I/O error): ours, not the sender's."""


def read_signed(read: Callable[[int], bytes], header: str | None, secrets: Iterable[bytes]) -> IO[bytes]:
    """Read a body with `read(n)` until it returns b"", and return it rewound if `header` signs it.

    Raises SignatureError (nothing read for a missing or unsupported header), BodyNotKept (the
    temporary file failed), or whatever `read` raises (a body over the limit; a connection that
    broke mid-body, which Werkzeug answers 400); the spooled copy is closed then.
    """
    verifier = StreamingVerifier(header, secrets)
    spooled: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=MEMORY_BYTES)  # noqa: SIM115 (returned open)
    try:
        while chunk := read(CHUNK_BYTES):
            verifier.update(chunk)
            try:
                spooled.write(chunk)
            except OSError as exc:
                raise BodyNotKept(exc.errno, exc.strerror) from exc
        verifier.verify()
    except BaseException:
        spooled.close()
        raise
    spooled.seek(0)
    return spooled


def size_of(spooled: IO[bytes]) -> int:
    """How many bytes a body read by read_signed holds (it is left rewound)."""
    size = spooled.seek(0, io.SEEK_END)
    spooled.seek(0)
    return size
