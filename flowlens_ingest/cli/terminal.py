"""Everything a command writes to stdout or stderr goes through `printable`: no raw control byte.

Commands print values that came from outside: GUIDs and event names from the journal (the
unauthenticated X-GitHub-* headers of a signed delivery), GitHub's delivery logs, names from
payloads. A terminal acts on ESC, BEL, C1 controls or a bidirectional override instead of
showing them, so `escaped_output` wraps both streams once, in `main`, rather than trusting
every print: each write has them escaped (logs.printable), keeping the output's own layout —
newlines, tabs, and a lone carriage return written alone to redraw a progress line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from flowlens_ingest.logs import printable

# What the commands write on purpose: a progress line redraws with a write of "\r" alone
# (commands.py, recovery.py), never as part of a value.
_LAYOUT = "\n\t"
REDRAW = "\r"


class EscapingStream:
    """A text stream writing through to another with control characters escaped."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        """Write `text` escaped; return its length as given (what print expects)."""
        self.stream.write(text if text == REDRAW else printable(text, keep=_LAYOUT))
        return len(text)

    def writelines(self, lines: Any) -> None:
        """Write each line escaped."""
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        # flush, isatty, fileno, encoding, buffer…: the wrapped stream's own.
        return getattr(self.stream, name)


@contextmanager
def escaped_output() -> Iterator[None]:
    """Escape control characters in whatever is printed on stdout and stderr inside the block."""
    saved = sys.stdout, sys.stderr
    sys.stdout = EscapingStream(saved[0])
    sys.stderr = EscapingStream(saved[1])
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
