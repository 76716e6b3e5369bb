"""Logging: one JSON object per line in production, readable text in development.

Never log a secret or a payload: log records carry ids, names and outcomes only.
Values that came from outside (the unauthenticated X-GitHub-* headers, GitHub's
answers) are never written raw to a terminal: `printable` escapes the characters
that drive one, in the text format here and in every command's output (cli/terminal.py).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from flowlens_ingest.config import Settings

# What a terminal acts on rather than shows: C0 controls (ESC starts the sequences that
# recolour, move the cursor or set the window title; BEL rings), DEL, C1 controls (U+009B
# is a one-character ESC [), and the bidirectional overrides and isolates that make text
# read in another order than it is (U+202A-U+202E, U+2066-U+2069).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, keep: str = "") -> str:
    """`text` with every character a terminal would act on written as an escape (`\\x1b`, `\\u202e`).

    `keep` names controls the caller writes on purpose (an output's own newlines).
    """
    if not _UNPRINTABLE.search(text):
        return text
    if not keep:
        return _UNPRINTABLE.sub(_escape, text)
    return _UNPRINTABLE.sub(lambda m: m.group() if m.group() in keep else _escape(m), text)


# Attributes every LogRecord has; anything else was passed with `extra=` and is logged.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


# One encoder for every line: json.dumps with `default` builds a new one per call.
_ENCODE = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            # Which worker: lines of one delivery, of one crash, belong together.
            "pid": record.process,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        # json.dumps escapes every other control character (and, ASCII only, C1 and bidi
        # ones), but writes DEL as it is.
        return _ENCODE(entry).replace("\x7f", "\\u007f")


def _text_value(value: object) -> str:
    # Quoted when it would not read back as one token.
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


class TextFormatter(logging.Formatter):
    """A log record as a readable line, extras as key=value; no control character written raw.

    The message and every value are escaped (a delivery id may hold ESC or a newline that
    would forge a line); a traceback keeps its own newlines, escaped otherwise.
    """

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={_text_value(v)}" for k, v in _extras(record).items() if v is not None)
        line = (
            f"{self.formatTime(record)} [{record.process}] {record.levelname:<7} {record.name}: {record.getMessage()}"
        )
        line = printable(f"{line} {extras}" if extras else line)
        if record.exc_info:
            line += "\n" + printable(self.formatException(record.exc_info), keep="\n")
        return line


def configure(settings: Settings) -> None:
    """Route the service's loggers to stderr in the configured format (idempotent)."""
    logger = logging.getLogger("flowlens_ingest")
    handler = next((h for h in logger.handlers if getattr(h, "_flowlens", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler._flowlens = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    logger.setLevel(settings.log_level)
    # What no line of ours shows, not gathered for every record (the logging HOWTO's
    # "Optimization"): the caller's file and line (a walk up the stack), the thread's
    # and the multiprocessing process's names. The pid stays: every line carries it.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
