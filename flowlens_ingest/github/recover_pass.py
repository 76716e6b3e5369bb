"""The scheduled recovery pass: the files worker redelivers what GitHub logged and the journal lacks.

Every FLOWLENS_RECOVER_EVERY, one recoverer across all VMs: a worker whose pass is due takes the
`recover` lease (lease.py; the `recover` command takes the same one), renews it while it works and
releases it when done; the `recover:due` row says when the next pass is due, so the cluster makes
one pass per interval. A pass reads each hook's delivery log back to where the last one checked it
(`webhook_hooks.checked_through`), asks GitHub to redeliver what is missing, and moves the
checkpoint on: to the pass's start when everything was brought in, else to the oldest delivery it
left (failed, or held back by a rate limit or a bound), and not at all for a log it did not read to
the end, so the next pass goes on from there. A pass is bounded (PASS_BOUNDS: pages, deliveries
held, redeliveries, wall time, all well inside its lease). After GitHub told a credential to wait,
the next pass is due no earlier than that. A hook left unchecked for longer than GitHub keeps its
log (3 days, 7 on GHES) is a gap recovery cannot fill: said loudly, counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from flowlens_ingest.config import Settings
from flowlens_ingest.events.hooks import APP_HOOK_PATH, header_number
from flowlens_ingest.github.client import GitHubClient
from flowlens_ingest.github.hooks import tried
from flowlens_ingest.github.lease import RECOVER, Lease
from flowlens_ingest.github.recover import (
    PACE_S,
    SETTLE_S,
    Bounds,
    Hook,
    Recoverer,
    Report,
    Resume,
    hooks_to_read,
    retention,
)
from flowlens_ingest.ingest import describe
from flowlens_ingest.metrics import Metrics
from flowlens_ingest.names import hook_path
from flowlens_ingest.store.database import Database
from flowlens_ingest.store.expressions import seconds_from_now
from flowlens_ingest.store.schema import leases, webhook_hooks

log = logging.getLogger(__name__)

# The lease a pass (or the command) holds while it works, renewed every third of it; a crashed
# worker's is taken over once it lapses.
PASS_LEASE_S = 600.0
# When the next pass is due: a row of `leases` nobody holds, only its time matters.
DUE = RECOVER + ":due"
# A pass's bounds: 300 log pages a hook (30,000 attempts), 20,000 missing deliveries held, 600
# redeliveries (ten minutes at one a second), and 20 minutes of requests, then at most SETTLE_S
# waiting for the redeliveries. What it leaves is read by the next pass.
PASS_BOUNDS = Bounds(pages=300, held=20_000, recoveries=600, seconds=1200.0)
# An attempt GitHub was making as the pass started is logged when it ends (GitHub gives up after
# 10 s): the checkpoint stays this far behind the pass's start, so the next pass reads it.
IN_FLIGHT_S = 60.0
# How often a worker whose pass was not due (or found the lease taken) asks again.
RETRY_LEASE_S = 60.0


def _record_hooks(database: Database, settings: Settings, learned: dict[str, int]) -> None:
    """Record GITHUB_WEBHOOKS' hooks and the App hook's learned id, so their checkpoints are kept."""
    found = [hook_path(entry) for entry in settings.github_webhooks]
    listed: list[tuple[str, int, str, int | None]] = [
        (path, hook_id, "organization" if path.startswith("orgs/") else "repository", None)
        for path, hook_id in (f for f in found if f is not None)
    ]
    app_id = header_number(settings.github_app_id) if settings.github_app_id else None  # None for a client ID
    listed += [
        (APP_HOOK_PATH, hook_id, "integration", app_id) for path, hook_id in learned.items() if path == APP_HOOK_PATH
    ]
    for path, hook_id, target_type, target_id in listed:
        stmt = insert(webhook_hooks).values(
            hook_id=hook_id, target_type=target_type, target_id=target_id, api_path=path
        )
        database.execute(stmt.on_conflict_do_nothing(index_elements=[webhook_hooks.c.hook_id]))


def _checkpoint(database: Database, hook_id: int, through: datetime) -> None:
    """Every delivery the hook logged up to `through` has been compared with the journal: no reading to resume."""
    t = webhook_hooks
    database.execute(
        sa.update(t)
        .where(t.c.hook_id == hook_id)
        .values(
            checked_through=sa.case(
                (sa.or_(t.c.checked_through.is_(None), t.c.checked_through < through), through),
                else_=t.c.checked_through,
            ),
            resume_url=None,
            resume_newer_than=None,
            updated_at=sa.func.now(),
        )
    )


def _resume_at(database: Database, hook_id: int, url: str | None, newer_than: datetime) -> None:
    """A pass stopped reading this hook's log at `url` (None: read it anew), having read what is newer than `newer_than`."""
    t = webhook_hooks
    database.execute(
        sa.update(t)
        .where(t.c.hook_id == hook_id)
        .values(
            resume_url=url,
            resume_newer_than=None if url is None else newer_than,
            updated_at=sa.func.now(),
        )
    )


def _due(database: Database) -> bool:
    """Whether the next scheduled pass is due (no pass has set a later time)."""
    t = leases
    row = database.first(sa.select(t.c.leased_until).where(t.c.name == DUE, t.c.leased_until > sa.func.now()))
    return row is None


def _next_due(database: Database, holder: Lease, seconds: float) -> None:
    """The next pass is due in `seconds` (database clock)."""
    t = leases
    until = seconds_from_now(seconds)
    stmt = insert(t).values(name=DUE, holder=holder.holder, leased_until=until, holder_name=holder.holder_name)
    database.execute(
        stmt.on_conflict_do_update(
            index_elements=[t.c.name],
            set_={"holder": stmt.excluded.holder, "leased_until": until, "holder_name": stmt.excluded.holder_name},
        )
    )


class RecoveryPass:
    """The scheduled pass of one worker: takes the lease when due, recovers within its bounds, moves checkpoints on."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        client: GitHubClient,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        pace_s: float = PACE_S,
        settle_s: float = SETTLE_S,
        bounds: Bounds = PASS_BOUNDS,
        lease_s: float = PASS_LEASE_S,
    ) -> None:
        self.settings = settings
        self.database = database
        self.client = client
        self.metrics = metrics
        self.lease = Lease(database, "recovery pass", lease_s)
        self._clock = clock
        self.pace_s = pace_s
        self.settle_s = settle_s
        self.bounds = bounds

    def run_once(self, stop: threading.Event | None = None) -> Report | None:
        """One pass if one is due and this worker takes the lease; None when not due or another recoverer holds it."""
        if not _due(self.database) or not self.lease.take():
            return None
        try:
            if not _due(self.database):
                return None  # another worker's pass ended between our look and our lease
            report = self._pass(stop)
            # One pass per interval across every worker, and none before GitHub's wait ends.
            wait = float(self.settings.recover_every_s)
            if report.retry_at is not None:
                wait = max(wait, report.retry_at - self._clock())
            _next_due(self.database, self.lease, wait)
            return report
        finally:
            self.lease.release()

    def _pass(self, stop: threading.Event | None) -> Report:
        started = datetime.fromtimestamp(self._clock(), UTC)
        _record_hooks(self.database, self.settings, {})
        hooks, skipped = hooks_to_read(self.settings, self.database)
        for reason in skipped:
            log.warning("recovery pass skips a hook", extra={"reason": reason})
        wh = webhook_hooks
        known = self.database.read(
            sa.select(wh.c.hook_id, wh.c.checked_through, wh.c.resume_url, wh.c.resume_newer_than).where(
                wh.c.hook_id.in_([hook.hook_id for hook in hooks if hook.hook_id is not None])
            )
        )
        # By the hook id hooks_to_read chose: another row of the same path (an App hook named only by a
        # delivery's headers, never checked) must not send the pass back to the start of GitHub's log.
        checked = {row.hook_id: row.checked_through for row in known}
        resumes = {
            row.hook_id: Resume(row.resume_url, row.resume_newer_than)
            for row in known
            if row.resume_url is not None and row.resume_newer_than is not None
        }
        oldest = started - retention(self.settings.github_api_url)

        def since(hook: Hook) -> datetime:
            through = checked.get(hook.hook_id)
            if through is not None and through < oldest:
                self.metrics.recovery_gaps.inc()
                log.error(
                    "recovery gap older than GitHub's retention: deliveries of this hook between these times"
                    " are gone from GitHub's log and cannot be recovered; `flowlens-ingest backfill` lands current state",
                    extra={"hook": hook.path, "from": through.isoformat(), "to": oldest.isoformat()},
                )
            return oldest if through is None or through < oldest else through

        recoverer = Recoverer(
            self.settings,
            self.database,
            self.client,
            metrics=self.metrics,
            stop=stop,
            pace_s=self.pace_s,
            settle_s=self.settle_s,
            clock=self._clock,
            bounds=self.bounds,
            keep=self.lease.keep,
        )
        report = recoverer.run(since, "redeliver", hooks, lambda hook: resumes.get(hook.hook_id))
        _record_hooks(self.database, self.settings, recoverer.learned)
        self._advance(report, hooks, recoverer.learned, started - timedelta(seconds=IN_FLIGHT_S))
        self.metrics.recovery_passes.labels("complete" if report.complete else "incomplete").inc()
        if report.complete:
            # What the alert on recovery falling behind GitHub's retention watches.
            self.metrics.recovery_last_success.set(time.time())
        else:
            log.warning("recovery pass left work for the next pass", extra={"summary": report.summary()})
        log.info("recovery pass", extra={"summary": report.summary()})
        return report

    def _advance(self, report: Report, hooks: list[Hook], learned: dict[str, int], through: datetime) -> None:
        """Move each hook's checkpoint on: to `through`, or to the oldest delivery this pass left; not past a log it did not finish."""
        unread = {path for path, _ in report.unreadable}
        cut = {path for path, _ in report.cut}
        failed = {name for name, _ in report.failed}
        # A hook GitHub refused waits behind the others not yet read (hooks.tried): one invented by a
        # replayed delivery's headers is never read, and must not take a real one's turn every pass.
        tried(self.database, [h.hook_id for h in hooks if h.hook_id is not None and h.path in unread])
        left: dict[str, datetime] = {}
        for item in [m for m in report.missing if m.name in failed] + [m for m, _ in report.held]:
            at = left.get(item.hook.path)
            left[item.hook.path] = item.delivered_at if at is None else min(at, item.delivered_at)
        for hook in hooks:
            # What GitHub said in this pass first (the App hook's id is learned every pass).
            hook_id = learned.get(hook.path, hook.hook_id)
            if hook_id is None or hook.path in unread:
                continue
            if hook.path in cut:
                # Not read to the end: the checkpoint stays; the next pass reads what is newer than
                # `through`, then goes on where this one stopped (or, without a cursor, anew).
                _resume_at(
                    self.database, hook_id, report.resume.get(hook.path), min(through, left.get(hook.path, through))
                )
                continue
            # The oldest delivery left is read again next time (a pass reads from its checkpoint on, inclusive).
            _checkpoint(self.database, hook_id, min(through, left.get(hook.path, through)))

    def run(self, stop: threading.Event) -> None:
        """Run a pass whenever one is due until `stop` is set; errors are logged, and the next pass tries again."""
        log.info("recovery passes on", extra={"every_s": self.settings.recover_every_s})
        while not stop.is_set():
            try:
                self.run_once(stop)
            except Exception as exc:  # the database or GitHub away, a bug: say it, try at the next pass
                self.metrics.recovery_passes.labels("error").inc()
                log.warning("recovery pass failed", extra={"error": describe(exc)})
            # When the next pass is due is in the database (`recover:due`): look again shortly.
            stop.wait(min(float(self.settings.recover_every_s), RETRY_LEASE_S))
