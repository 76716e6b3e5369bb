"""What the commands on the journal and the queue do (main.py is the command line): send, deliveries, replay, prune, enrich."""

from __future__ import annotations

import errno
import json
import signal
import sys
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from flowlens_ingest.cli.connect import github_client, load_settings, open_database, read_answer, unavailable
from flowlens_ingest.cli.instances import live_instances
from flowlens_ingest.cli.output import NOT_DONE, counted, fail, utc
from flowlens_ingest.config import Settings
from flowlens_ingest.files import read_regular_file

if TYPE_CHECKING:
    from flowlens_ingest.replay import ReplayReport

DEFAULT_URL = "http://127.0.0.1:8000/webhook"
# `send` waits this long for the service's answer (each socket wait, and the body in all); the
# answer is a small JSON object: one over this size is not the service's.
SEND_TIMEOUT_S = 15.0
SEND_ANSWER_MAX_BYTES = 64 * 1024
# Outcomes after which GitHub would consider the delivery done; `send` exits 1 on any other.
SETTLED = frozenset({"applied", "ignored", "duplicate", "stale"})


def enrich(once: bool, status: bool) -> int:
    """The files worker: fetch queued PR file lists from GitHub until stopped (or, with --once, until idle)."""
    import threading

    from flowlens_ingest import logs
    from flowlens_ingest.github import jobs
    from flowlens_ingest.github.enrich import Enricher
    from flowlens_ingest.metrics import instruments

    settings = load_settings()
    if not status and not settings.github_credentials:
        return fail("no GitHub credential: set GITHUB_TOKEN, or GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY")
    database, _server = open_database(settings)
    if status:
        queue = jobs.status(database)
        for label, count in sorted(queue.counts.items()):
            print(f"{label:<10} {count}")
        if queue.oldest_pending_s is not None:
            print(f"oldest pending job: {queue.oldest_pending_s:.0f} s")
        for row in jobs.recent_errors(database):
            print(f"{row.full_name}#{row.pr_number} {row.head_sha[:12]} {row.state}/{row.result}: {row.last_error}")
        return 0
    logs.configure(settings)
    enricher = Enricher(settings, database, github_client(settings, database), instruments())
    if once:
        while enricher.run_once():
            pass
        return 0
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    enricher.run(stop)
    return 0


def _default_url(settings: Settings) -> str:
    """Where `send` posts: the longest running live `serve` of the data directory, else port 8000."""
    live = live_instances(settings.data_dir)
    if not live:
        return DEFAULT_URL
    chosen, *others = live
    if others:
        print(
            f"flowlens-ingest: {counted(len(live), 'instance', 'instances')} serve FLOWLENS_DATA_DIR"
            f" ({settings.data_dir}): sending to {chosen.url}, the longest running"
            f" (--url for another: {', '.join(i.url for i in others)})",
            file=sys.stderr,
        )
    return chosen.url


def _http_url(url: str) -> bool:
    """An http(s) URL urllib can send to: ASCII, a host, a port that is a number, no space or control."""
    import urllib.parse

    if not url.startswith(("http://", "https://")) or not (url.isascii() and url.isprintable()) or " " in url:
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises for a port that is no number
    except ValueError:
        return False
    return bool(parts.hostname)


def send(file: str, event: str, url: str | None, delivery: str | None) -> int:
    """Sign a payload file with the service's secret and POST it like GitHub; 0 on a 2xx that settled it."""
    import http.client
    import urllib.error
    import urllib.request

    from flowlens_ingest.events.signature import sign
    from flowlens_ingest.postgres.embedded import kept_secret

    settings = load_settings()
    secret = settings.secrets[0] if settings.secrets else None
    if secret is None:
        kept = kept_secret(settings.data_dir)
        if kept is None:
            return fail(
                f"GITHUB_WEBHOOK_SECRET is not set and FLOWLENS_DATA_DIR ({settings.data_dir}) holds no"
                " webhook-secret: set one, or FLOWLENS_DATA_DIR to the folder `serve` used"
            )
        secret = kept.encode()
    url = url or settings.send_url or _default_url(settings)
    if not _http_url(url):
        return fail(f"--url must be an http:// or https:// URL, got {url!r}")
    for name, value in (("--event", event), ("--delivery", delivery or "")):
        if not (value.isascii() and value.isprintable()):
            return fail(f"{name} must be printable ASCII (it is sent as a header), got {value!r}")
    try:
        # Never more than the service takes (it would answer 413), never a FIFO waited on.
        body = read_regular_file(Path(file), settings.max_body_bytes)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            return fail(f"cannot send {file}: larger than FLOWLENS_MAX_BODY_BYTES ({settings.max_body_bytes})")
        if exc.errno == errno.EISDIR:
            return fail(f"cannot send {file}: not a regular file")
        return fail(f"cannot read {file}: {exc.strerror}")
    request = urllib.request.Request(  # noqa: S310 (the scheme is checked above)
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/flowlens-send",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-Hub-Signature-256": sign(body, secret),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=SEND_TIMEOUT_S) as response:  # noqa: S310
            status, (answer, cut) = response.status, read_answer(response, SEND_ANSWER_MAX_BYTES, SEND_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        try:
            status, (answer, cut) = exc.code, read_answer(exc, SEND_ANSWER_MAX_BYTES, SEND_TIMEOUT_S)
        except OSError as read_failed:
            return fail(f"no answer from {url}: {read_failed}", NOT_DONE)
    except urllib.error.URLError as exc:
        return fail(f"cannot reach {url}: {exc.reason}", NOT_DONE)
    except (OSError, http.client.HTTPException) as exc:  # a timeout, a reset connection, an answer not HTTP
        return fail(f"no answer from {url}: {type(exc).__name__}: {exc}", NOT_DONE)
    if cut:
        return fail(
            f"{status} from {url}: an answer over {SEND_ANSWER_MAX_BYTES // 1024} KiB, not the service's", NOT_DONE
        )
    text = answer.decode("utf-8", "replace")
    print(f"{status} {text.strip()}")
    try:
        outcome = json.loads(text).get("outcome")
    except (ValueError, AttributeError):
        outcome = None
    # A 202 `failed` or `spooled` is accepted, not applied: a script must not take it for done.
    return 0 if 200 <= status < 300 and outcome in SETTLED else 1


def deliveries(failed: bool, limit: int, as_json: bool = False) -> int:
    """List the journal, newest first: a line each, or (as_json) one JSON array."""
    import sqlalchemy as sa

    from flowlens_ingest.store.database import DatabaseUnavailable
    from flowlens_ingest.store.journal_admin import list_deliveries

    settings = load_settings()
    database, _server = open_database(settings)
    try:
        rows = list_deliveries(database, failed_only=failed, limit=limit)
    except (sa.exc.OperationalError, DatabaseUnavailable) as exc:
        return unavailable(settings, exc)
    if as_json:
        entries = [dict(row._mapping, received_at=utc(row.received_at)) for row in rows]
        print(json.dumps(entries))
        return 0
    for row in rows:
        line = f"{utc(row.received_at)} {row.delivery_id} {row.event}"
        line += f"/{row.action}" if row.action else ""
        line += f" {row.outcome} attempts={row.attempts}"
        line += f" error={row.error}" if row.error else ""
        print(line)
    print(f"({counted(len(rows), 'delivery', 'deliveries')})", file=sys.stderr)
    return 0


def replay(failed: bool, since: datetime | None, as_json: bool = False) -> int:
    """Re-apply journaled deliveries; a summary (or, as_json, one JSON object); exit 1 if any failed."""
    import sqlalchemy as sa

    from flowlens_ingest.replay import replay as replay_journal
    from flowlens_ingest.store.database import DatabaseUnavailable

    settings = load_settings()
    database, _server = open_database(settings)
    then = "what is replayed so far stays applied; run the replay again once it is back"
    try:
        report = replay_journal(database, failed_only=failed, since=since)
    except (DatabaseUnavailable, sa.exc.OperationalError) as exc:
        # Every delivery replayed so far is committed, and replaying again is idempotent.
        return unavailable(settings, exc, then)
    if report.stopped is not None:
        return fail(f"{report.stopped}; {then}", NOT_DONE)
    if as_json:
        print(json.dumps({k: v for k, v in vars(report).items() if k != "stopped"}))
    else:
        print(_replay_summary(report))
    return 0 if report.failed == 0 else 1


def _replay_summary(report: ReplayReport) -> str:
    """What a replay did, in a line, then a line per delivery that failed (the first ones)."""
    line = f"flowlens-ingest: replayed {counted(report.replayed, 'delivery', 'deliveries')}, {report.failed} failed"
    if report.skipped_no_payload:
        line += f", {report.skipped_no_payload} skipped (journaled without a payload)"
    lines = [line, *(f"  failed {error}" for error in report.errors)]
    if report.failed > len(report.errors):
        lines.append(
            f"  and {report.failed - len(report.errors)} more: `flowlens-ingest deliveries --failed` lists them"
        )
    return "\n".join(lines)


def prune(older_than: timedelta, include_failed: bool) -> int:
    """Delete old journal entries, showing progress on stderr."""
    import sqlalchemy as sa

    from flowlens_ingest.store.database import TIMEOUT_SQLSTATES, DatabaseUnavailable
    from flowlens_ingest.store.journal_admin import prune as prune_journal

    settings = load_settings()
    database, _server = open_database(settings)
    interactive = sys.stderr.isatty()

    def progress(removed: int) -> None:
        # On a terminal one line rewritten in place; in a log, a line per batch.
        line = f"flowlens-ingest: pruned {removed} so far"
        if interactive:
            # The carriage return alone: cli/terminal.py escapes one inside a line.
            sys.stderr.write("\r")
            print(line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    try:
        removed = prune_journal(database, older_than, include_failed=include_failed, progress=progress)
    except DatabaseUnavailable as exc:
        # The reason is the SQLSTATE: a batch that outlived the statement (or lock) timeout
        # is not an outage, and the operator's fix for it is not to wait for the database.
        if str(exc) in TIMEOUT_SQLSTATES:
            return fail(
                f"the database's statement timeout ({settings.statement_timeout_ms} ms) cut a prune batch;"
                " what is pruned so far stays pruned; retry, or raise FLOWLENS_STATEMENT_TIMEOUT_MS",
                NOT_DONE,
            )
        return unavailable(settings, exc, "what is pruned so far stays pruned; run it again")
    except sa.exc.OperationalError as exc:
        return unavailable(settings, exc, "what is pruned so far stays pruned; run it again")
    finally:
        if interactive:
            print(file=sys.stderr)
    print(f"flowlens-ingest: pruned {counted(removed, 'journal entry', 'journal entries')}")
    return 0
