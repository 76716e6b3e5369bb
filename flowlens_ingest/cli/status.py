"""`flowlens-ingest status`, gathering: what one screen for someone on call shows (status_screen.py shows it).

It reads what an operator would otherwise look up in five places: the database
(reachable, revision, pending migrations), the journal (the last hour by outcome,
failed deliveries not yet replayed), this host's spool folder, the files queue,
GitHub's rate limit as the running `serve` last saw it, and recovery. Each part
says what in it needs action; the thresholds are the alerting rules' own
(deploy/prometheus/flowlens-alerts.yml, docs/alerts.md). Exit 0: nothing needs
action; 1: something does (the lines say what and which command shows more).

It answers within `deadline_s` however the database behaves: the database's part
runs in a thread of its own under a client-side deadline (store/deadline.py),
and is reported as not answering when it is not back in time.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flowlens_ingest.cli.connect import NoDatabase, connect, database_label, read_answer
from flowlens_ingest.cli.output import counted, utc
from flowlens_ingest.config import Settings

# The thresholds, the same as the alerting rules' (docs/alerts.md says why each).
# The spool holds deliveries only while the database is away: one older than this is an outage.
SPOOL_OLDEST_S = 5 * 60
# Room left in the spool below this share of its cap: deliveries will soon be answered 503.
SPOOL_ROOM_SHARE = 0.2
# A files job waiting this long: a credential, permission or rate-limit problem.
FILES_OLDEST_S = 60 * 60
# A hook whose delivery log has not been checked for this long: two of GitHub's three days left.
RECOVERY_BEHIND = timedelta(days=1)
# Fewer GitHub requests left than this: enrichment is about to stall until the reset.
RATE_LIMIT_LOW = 500
# How long the rate limit probe waits for a running `serve`'s /metrics.
METRICS_TIMEOUT_S = 2.0
# A serve's /metrics page is some tens of KB: a page past this is not one, and is not read on.
METRICS_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_DEADLINE_S = 10.0
# The parts, in the order they are shown (those the database gives are absent when it does not answer).
PARTS = ("database", "deliveries_last_hour", "failed", "spool", "files", "github_rate_limit", "recovery")


@dataclass
class Report:
    """What `status` found: one dict per part, and the lines that need action."""

    parts: dict[str, Any] = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)

    def act(self, line: str) -> None:
        """Record something that needs an operator."""
        self.actions.append(line)


def _utc(moment: datetime | None) -> str | None:
    return None if moment is None else utc(moment)


def age(seconds: float) -> str:
    """A duration the way a person reads it: 45 s, 12 min, 3.5 h, 2.1 d."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


# --- the database: its own thread, under the deadline -----------------------------------------


def _probe_database(settings: Settings, deadline_s: float, report: Report) -> None:
    """The probe thread: the database's parts, or what stopped them (never an exception lost in a thread)."""
    try:
        _database_parts(settings, deadline_s, report)
    except Exception as exc:  # an embedded server that will not start, a bug: still one line and exit 1
        report.parts["database"] = {"reachable": False, "error": type(exc).__name__}
        report.act(f"database: could not be asked ({type(exc).__name__}: {exc})")


def _database_parts(settings: Settings, deadline_s: float, report: Report) -> None:
    """Fill the database's, the journal's and the files queue's parts (runs in the probe thread)."""
    import sqlalchemy as sa

    from flowlens_ingest.store import migrate
    from flowlens_ingest.store.database import DatabaseUnavailable
    from flowlens_ingest.store.deadline import deadline

    database_part: dict[str, Any] = {"reachable": False}
    report.parts["database"] = database_part
    url = settings.database_url
    database_part["where"] = "DATABASE_URL" if url else f"embedded in {settings.data_dir / 'pgdata'}"
    with deadline(deadline_s):
        try:
            database, _server = connect(settings, "flowlens-ingest-status")
        except NoDatabase as exc:
            database_part["error"] = "no database: DATABASE_URL is unset and FLOWLENS_DATA_DIR holds none"
            report.act(f"database: {exc}")
            return
        try:
            with database.bounded():
                current, newest = migrate.revisions(database.engine)
                problem = migrate.pending(database.engine)
        except (sa.exc.SQLAlchemyError, DatabaseUnavailable) as exc:
            database_part["error"] = _reason(exc)
            report.act(f"database: {_unavailable(settings, exc)}")
            return
        database_part.update(reachable=True, revision=current, head=newest, pending_migrations=problem is not None)
        if problem is not None:
            report.act(f"database: {problem}")
            return
        try:
            _journal_parts(database, report)
            _files_part(settings, database, report)
            _recovery_part(settings, database, report)
        except (sa.exc.SQLAlchemyError, DatabaseUnavailable) as exc:
            database_part["error"] = _reason(exc)
            report.act(f"database: stopped answering ({database_part['error']})")
        finally:
            database.dispose()


def _unavailable(settings: Settings, exc: BaseException) -> str:
    """Why the database could not be used and what to do; and what happens to deliveries meanwhile, if a `serve` runs here."""
    from flowlens_ingest.cli.instances import live_instances
    from flowlens_ingest.store import reachable

    line = reachable.unavailable(exc).line(database_label(settings))
    if not live_instances(settings.data_dir):
        return f"{line} (no `serve` runs from {settings.data_dir})"
    spooled = "spools" if settings.spool_enabled else "answers 503 to"
    return f"{line} (the `serve` running here {spooled} deliveries until it answers)"


def _reason(exc: Exception) -> str:
    """A database error as a reason: its SQLSTATE or type, never its text (it may hold the URL)."""
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "pgcode", None)
    return str(code or type(orig or exc).__name__)


def _journal_parts(database: Any, report: Report) -> None:
    """The last hour by outcome, and the failed deliveries a replay has not settled yet."""
    from flowlens_ingest.store.journal_admin import failed_entries, outcomes_last_hour

    report.parts["deliveries_last_hour"] = outcomes_last_hour(database)
    count, oldest = failed_entries(database)
    report.parts["failed"] = {"count": int(count), "oldest": _utc(oldest)}
    if count:
        report.act(
            f"journal: {counted(count, 'failed delivery', 'failed deliveries')} not replayed (oldest {_utc(oldest)}):"
            " `flowlens-ingest deliveries --failed` says why; after the fix, `flowlens-ingest replay --failed`"
        )


def _files_part(settings: Settings, database: Any, report: Report) -> None:
    """The files queue: jobs by status, how long the oldest pending one has waited, and whether a worker here can take them."""
    from flowlens_ingest.github import jobs

    queue = jobs.status(database)
    pending = queue.counts.get("pending", 0) + queue.counts.get("leased", 0)
    report.parts["files"] = {
        "pending": pending,
        "oldest_pending_s": queue.oldest_pending_s,
        "by_status": queue.counts,
        # A files worker needs a GitHub credential: without one here, none runs from this environment.
        "credential_here": bool(settings.github_credentials),
    }
    if queue.oldest_pending_s is not None and queue.oldest_pending_s > FILES_OLDEST_S:
        report.act(
            f"files: the oldest pending job has waited {age(queue.oldest_pending_s)}"
            " (a credential, permission or rate limit problem): `flowlens-ingest enrich --status`"
        )


# --- this host: the spool folder, the running serve's /metrics ----------------------------------


def _spool_part(settings: Settings, report: Report) -> None:
    """This host's spool: depth, oldest, set aside, bytes, and the room left (cap and disk)."""
    from flowlens_ingest.spool.folder import Spool

    if settings.spool_dir is None or settings.spool_max_bytes == 0:
        report.parts["spool"] = {"enabled": False}
        return
    try:
        spool = Spool(settings.spool_dir, settings.spool_max_bytes)
        depth = spool.refresh()
        used = spool.estimate()
        oldest = spool.oldest()
        folder = next((p for p in (settings.spool_dir, *settings.spool_dir.parents) if p.exists()), Path("/"))
        disk_free = shutil.disk_usage(folder).free
    except OSError as exc:
        # Not readable by whoever runs status (another user), or its disk failing: said, not a traceback.
        report.parts["spool"] = {"enabled": True, "folder": str(settings.spool_dir), "error": str(exc)}
        report.act(
            f"spool: {settings.spool_dir} cannot be read ({exc.strerror or exc}): run status as the service's user"
        )
        return
    room = max(0, min(settings.spool_max_bytes - used, disk_free))
    oldest_s = None if oldest is None else time.time() - oldest.timestamp()
    report.parts["spool"] = {
        "enabled": True,
        "folder": str(settings.spool_dir),
        "depth": depth,
        "oldest": _utc(oldest),
        "oldest_s": oldest_s,
        "set_aside": spool.unusable,
        "bytes": used,
        "max_bytes": settings.spool_max_bytes,
        "room_bytes": room,
    }
    if oldest_s is not None and oldest_s > SPOOL_OLDEST_S:
        report.act(
            f"spool: {counted(depth, 'delivery', 'deliveries')} waiting, the oldest for {age(oldest_s)}:"
            " the database is down or refuses them (the service's log says `spool drain paused`)"
        )
    if spool.unusable:
        report.act(
            f"spool: {spool.unusable} set aside (*.unusable in {settings.spool_dir}): see docs/alerts.md,"
            " FlowLensSpoolSetAside"
        )
    if room < SPOOL_ROOM_SHARE * settings.spool_max_bytes:
        report.act(
            f"spool: {room // (1 << 20)} MiB of room left (cap {settings.spool_max_bytes // (1 << 20)} MiB):"
            " when it is full, deliveries are answered 503 and GitHub does not retry them"
        )


def _metrics_urls(settings: Settings) -> list[str]:
    """The /metrics of the `serve`s running from this data folder, and of FLOWLENS_URL."""
    from flowlens_ingest.cli.instances import live_instances

    urls = [instance.url for instance in live_instances(settings.data_dir)]
    if settings.send_url:
        urls.append(settings.send_url)
    return [url.removesuffix("/webhook").rstrip("/") + "/metrics" for url in dict.fromkeys(urls)]


def _rate_limit_part(settings: Settings, report: Report) -> None:
    """GitHub's rate limit as the files worker last saw it, from a running `serve`'s /metrics."""
    import http.client
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    part: dict[str, Any] = {"remaining": None, "source": None}
    report.parts["github_rate_limit"] = part
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for url in _metrics_urls(settings):
        try:
            with opener.open(url, timeout=METRICS_TIMEOUT_S) as answer:
                body, cut = read_answer(answer, METRICS_MAX_BYTES, METRICS_TIMEOUT_S)
        except (OSError, ValueError, http.client.HTTPException):  # no answer, or not HTTP
            continue
        if cut:
            continue
        try:
            families = list(text_string_to_metric_families(body.decode("utf-8", "replace")))
        except ValueError:
            continue  # answered, but not with Prometheus text: not a serve's /metrics
        for family in families:
            for sample in family.samples:
                if sample.name == "flowlens_github_rate_limit_remaining":
                    part.update(remaining=sample.value, source=url)
        if part["remaining"] is not None:
            break
    if part["remaining"] is None:
        part["note"] = "not seen: no running serve here with a files worker that has asked GitHub yet"
    elif part["remaining"] < RATE_LIMIT_LOW:
        report.act(
            f"github: {part['remaining']:.0f} requests left in the rate limit: files enrichment stalls until the"
            " reset (`flowlens-ingest enrich --status`)"
        )


def _recovery_part(settings: Settings, database: Any, report: Report) -> None:
    """Recovery: the hooks whose delivery logs are read, and how far back each has been checked.

    A hook checked through a time older than a day is an action (FlowLensRecoveryNearRetention
    in docs/alerts.md): GitHub keeps its delivery log 3 days (7 on GHES), so what was missed
    before then is about to be gone for good.
    """
    from flowlens_ingest.github.recover import retention
    from flowlens_ingest.store.hooks import checked_through

    hooks = checked_through(database)
    scheduled = settings.recover_every_s > 0 and settings.github_credentials
    keeps = retention(settings.github_api_url)
    part: dict[str, Any] = {
        "scheduled_every_s": settings.recover_every_s if scheduled else None,
        "github_keeps_days": keeps.days,
        "hooks": {str(path): _utc(checked) for path, checked in hooks},
    }
    report.parts["recovery"] = part
    if not hooks:
        part["note"] = "no hook recorded yet (one is recorded from the first delivery that names it)"
        return
    if not scheduled:
        part["note"] = "no scheduled pass (FLOWLENS_RECOVER_EVERY=0 or no GitHub credential): run `recover` by hand"
    now = datetime.now(UTC)
    behind = [path for path, checked in hooks if checked is None or now - checked > RECOVERY_BEHIND]
    if behind:
        report.act(
            f"recovery: {len(behind)} hook log(s) not checked for over a day"
            f" ({', '.join(str(p) for p in behind[:3])}); GitHub keeps {keeps.days} days:"
            " `flowlens-ingest recover --dry-run` shows what is missing"
        )


# --- the whole ---------------------------------------------------------------------------------


def gather(settings: Settings, deadline_s: float = DEFAULT_DEADLINE_S) -> Report:
    """Everything `status` shows, within `deadline_s` (the database's part is cut off there)."""
    started = time.monotonic()
    report = Report()
    probe = Report()
    # A daemon thread: if the database hangs past every deadline, the command still ends.
    thread = threading.Thread(target=_probe_database, args=(settings, deadline_s, probe), daemon=True)
    thread.start()
    # The spool's disk and a serve's /metrics may stall too (a hung volume, a peer answering a byte
    # at a time): each in a thread of its own, given what is left of the deadline.
    local: list[tuple[Callable[[Settings, Report], None], Report, str, dict[str, Any]]] = [
        (_spool_part, Report(), "spool", {"enabled": True}),
        (_rate_limit_part, Report(), "github_rate_limit", {"remaining": None, "source": None}),
    ]
    threads = [threading.Thread(target=part, args=(settings, found), daemon=True) for part, found, _, _ in local]
    for each in threads:
        each.start()
    for each, (_, found, name, unknown) in zip(threads, local, strict=True):
        each.join(max(0.0, deadline_s - (time.monotonic() - started)))
        said = f"no answer within {deadline_s:g} s"
        if each.is_alive() or name not in found.parts:
            # Still waiting (a hung volume, a peer trickling), or ended without saying (an error).
            report.parts[name] = {**unknown, "error": said, "note": f"not seen: {said}"}
            report.act(f"{name.replace('_', ' ')}: {said}")
        else:
            report.parts.update(found.parts)
            report.actions.extend(found.actions)
    thread.join(max(0.0, deadline_s - (time.monotonic() - started)))
    if thread.is_alive():
        report.parts["database"] = {"reachable": False, "error": f"no answer within {deadline_s:g} s"}
        report.actions.insert(0, f"database: no answer within {deadline_s:g} s (hung, or a network partition)")
    else:
        report.parts.update(probe.parts)
        report.actions[:0] = probe.actions
    return report
