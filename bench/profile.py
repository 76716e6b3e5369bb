"""`python -m bench.profile DIR`: share of worker samples per step, from py-spy raw profiles.

Reads the `--profile-format raw` files `python -m bench --profile DIR` wrote
(collapsed stacks, one `frame;frame;... count` per line) and puts every sample
in the first category that its frames, read from the innermost outwards, match.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowlens_ingest.events import delivery
from flowlens_ingest.store import wire


def _lines(function: Callable[..., Any], *needles: str) -> str:
    """Line numbers of `function` holding any of `needles`, as a regex alternation.

    Found in the source, not written down: the files move as others edit them.
    """
    lines, start = inspect.getsourcelines(function)
    found = [str(start + i) for i, text in enumerate(lines) if any(n in text for n in needles)]
    return "|".join(found) or "0"


# (category, pattern over one frame "function (file:line)"); the innermost match wins.
RULES: list[tuple[str, re.Pattern[str]]] = [
    (label, re.compile(pattern))
    for label, pattern in [
        (
            "psycopg2 execute (send, server work, receive)",
            rf"CountingCursor\.execute|wait_until_deadline|send \(flowlens_ingest/store/wire\.py:({_lines(wire.send, '.execute(')})\)",
        ),
        (
            "quote parameters into the EXECUTEs (mogrify; incl. the journal body)",
            (
                r"\(flowlens_ingest/store/bytea\.py|send\.<locals>\.<listcomp>"
                rf"|send \(flowlens_ingest/store/wire\.py:({_lines(wire.send, 'mogrify')})\)"
            ),
        ),
        (
            "psycopg2 autocommit toggles, commit, cursor",
            r"CountingConnection\.commit|send \(flowlens_ingest/store/wire\.py",
        ),
        ("JSON encode (row digests, the log line, the answer)", r"json/encoder\.py|dumps \(json/__init__\.py"),
        (
            "JSON parse + checks (events/parse.py, orjson)",
            r"flowlens_ingest/events/parse\.py|json/decoder\.py|json/__init__\.py",
        ),
        ("signature HMAC (events/signature.py)", r"flowlens_ingest/events/signature\.py|hmac\.py"),
        (
            "payload sha256 (events/delivery.py)",
            rf"parse \(flowlens_ingest/events/delivery\.py:({_lines(delivery.Delivery.parse, 'sha256(')})\)",
        ),
        (
            "request body read (web/signed_body.py, Werkzeug's stream, gunicorn's body reader)",
            r"flowlens_ingest/web/signed_body\.py|tempfile\.py|_bounded_read|gunicorn/http/(body|unreader)\.py|LimitedStream",
        ),
        ("map (events: mappers, readers)", r"flowlens_ingest/events/(mappers|repository|pulls|checks|readers)\.py"),
        (
            "plan: rows to parameters, digests, uuid4",
            (
                r"flowlens_ingest/(store/(plan|batch|statements|derived|journal|expressions)|events/rows)\.py"
                r"|(_adapt|form) \(flowlens_ingest/store/wire\.py|uuid\.py"
            ),
        ),
        ("SQLAlchemy compile", r"sqlalchemy/sql/"),
        ("SQLAlchemy engine, pool, transaction", r"sqlalchemy/|flowlens_ingest/store/(database|deadline)\.py"),
        ("metrics (prometheus_client)", r"prometheus_client/|flowlens_ingest/metrics\.py|_round_trip"),
        ("logging", r"logging/|flowlens_ingest/logs\.py"),
        ("Flask / Werkzeug (routing, request, response)", r"flask/|werkzeug/|flowlens_ingest/web/webhook\.py"),
        ("gunicorn (HTTP parse, socket I/O, accept)", r"gunicorn/|selectors\.py|socket\.py"),
        ("threads waiting (pool, queue)", r"threading\.py|concurrent/futures"),
    ]
]


def categorize(stack: str) -> str:
    """The category of one collapsed stack."""
    for frame in reversed(stack.split(";")):
        for label, pattern in RULES:
            if pattern.search(frame):
                return label
    return "other"


def summarize(files: list[Path]) -> tuple[Counter[str], int]:
    """Samples per category over all files, and the total."""
    counts: Counter[str] = Counter()
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                counts[categorize(stack)] += int(count)
    return counts, sum(counts.values())


def main(argv: list[str] | None = None) -> int:
    """Print one line per category, largest first."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    files = sorted(args.directory.glob("*.txt"))
    if not files:
        print(f"no raw profiles (*.txt) in {args.directory}", file=sys.stderr)
        return 2
    counts, total = summarize(files)
    for label, n in counts.most_common():
        print(f"{100 * n / total:5.1f}%  {label}")
    print(f"({total} samples, {len(files)} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
