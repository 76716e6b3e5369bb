"""The scheduled recovery pass: the files worker redelivers what GitHub logged and the journal lacks.

Every FLOWLENS_RECOVER_EVERY, one worker across all VMs (whoever takes the `recover` lease; the
lease then runs until the next pass is due, so the cluster makes one pass per interval) reads each
hook's delivery log back to where the last pass checked it (`webhook_hooks.checked_through`), asks
GitHub to redeliver what is missing, and moves the checkpoint on. A hook left unchecked for longer
than GitHub keeps its log (3 days, 7 on GHES) is a gap recovery cannot fill: said loudly, counted.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from flowlens_ingest.config import Settings
from flowlens_ingest.events.hooks import APP_HOOK_PATH
from flowlens_ingest.github.client import GitHubClient
from flowlens_ingest.github.recover import PACE_S, SETTLE_S, Hook, Recoverer, Report, hooks_to_read, retention
from flowlens_ingest.ingest import describe
from flowlens_ingest.metrics import Metrics
from flowlens_ingest.names import hook_path
from flowlens_ingest.store.database import Database
from flowlens_ingest.store.schema import leases, webhook_hooks

log = logging.getLogger(__name__)

LEASE = "recover"
# A pass holds the lease this long at most (pacing at one POST a second, then waiting a minute
# for the redeliveries); a crashed worker's pass is taken over after it.
PASS_LEASE_S = 1800
# An attempt GitHub was making as the pass started is logged when it ends (GitHub gives up after
# 10 s): the checkpoint stays this far behind the pass's start, so the next pass reads it.
IN_FLIGHT_S = 60.0
# How often a worker that found the lease taken asks again.
RETRY_LEASE_S = 60.0


def take_lease(database: Database, holder: uuid.UUID, seconds: float) -> bool:
    """Hold the named lease for `seconds` unless another holder's has not run out; whether we hold it."""
    until = sa.func.now() + sa.literal(timedelta(seconds=seconds), sa.Interval())
    stmt = insert(leases).values(name=LEASE, holder=holder, leased_until=until)
    upsert = stmt.on_conflict_do_update(
        index_elements=[leases.c.name],
        set_={"holder": stmt.excluded.holder, "leased_until": stmt.excluded.leased_until},
        where=sa.or_(leases.c.leased_until < sa.func.now(), leases.c.holder == holder),
    ).returning(leases.c.holder)
    return database.first(upsert) is not None


def _record_hooks(database: Database, settings: Settings, learned: dict[str, int]) -> None:
    """Record GITHUB_WEBHOOKS' hooks and the App hook's learned id, so their checkpoints are kept."""
    found = [hook_path(entry) for entry in settings.github_webhooks]
    listed: list[tuple[str, int, str, int | None]] = [
        (path, hook_id, "organization" if path.startswith("orgs/") else "repository", None)
        for path, hook_id in (f for f in found if f is not None)
    ]
    app_id = int(settings.github_app_id) if settings.github_app_id and settings.github_app_id.isdigit() else None
    listed += [
        (APP_HOOK_PATH, hook_id, "integration", app_id) for path, hook_id in learned.items() if path == APP_HOOK_PATH
    ]
    for path, hook_id, target_type, target_id in listed:
        stmt = insert(webhook_hooks).values(
            hook_id=hook_id, target_type=target_type, target_id=target_id, api_path=path
        )
        database.execute(stmt.on_conflict_do_nothing(index_elements=[webhook_hooks.c.hook_id]))


def _checkpoint(database: Database, hook_id: int, through: datetime) -> None:
    """Every delivery the hook logged up to `through` has been compared with the journal."""
    t = webhook_hooks
    database.execute(
        sa.update(t)
        .where(t.c.hook_id == hook_id, sa.or_(t.c.checked_through.is_(None), t.c.checked_through < through))
        .values(checked_through=through, updated_at=sa.func.now())
    )


class RecoveryPass:
    """The scheduled pass of one worker: takes the lease when due, recovers, moves checkpoints on."""

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
    ) -> None:
        self.settings = settings
        self.database = database
        self.client = client
        self.metrics = metrics
        self.holder = uuid.uuid4()
        self._clock = clock
        self.pace_s = pace_s
        self.settle_s = settle_s

    def run_once(self, stop: threading.Event | None = None) -> Report | None:
        """One pass if this worker takes the lease; None when another worker holds it."""
        if not take_lease(self.database, self.holder, PASS_LEASE_S):
            return None
        started = datetime.fromtimestamp(self._clock(), UTC)
        _record_hooks(self.database, self.settings, {})
        hooks, skipped = hooks_to_read(self.settings, self.database)
        for reason in skipped:
            log.warning("recovery pass skips a hook", extra={"reason": reason})
        checked = {
            row.api_path: row.checked_through
            for row in self.database.read(sa.select(webhook_hooks.c.api_path, webhook_hooks.c.checked_through))
        }
        oldest = started - retention(self.settings.github_api_url)

        def since(hook: Hook) -> datetime:
            through = checked.get(hook.path)
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
        )
        report = recoverer.run(since, "redeliver", hooks)
        _record_hooks(self.database, self.settings, recoverer.learned)
        self._advance(report, hooks, recoverer.learned, started - timedelta(seconds=IN_FLIGHT_S))
        # Held until the next pass is due: one pass per interval across every worker.
        take_lease(self.database, self.holder, self.settings.recover_every_s)
        self.metrics.recovery_passes.labels("complete" if report.complete else "incomplete").inc()
        if report.complete:
            # What the alert on recovery falling behind GitHub's retention watches.
            self.metrics.recovery_last_success.set(time.time())
        log.info("recovery pass", extra={"summary": report.summary()})
        return report

    def _advance(self, report: Report, hooks: list[Hook], learned: dict[str, int], through: datetime) -> None:
        """Move each hook's checkpoint on, unless its log was unreadable or some of its deliveries stay missing."""
        unread = {path for path, _ in report.unreadable}
        failed = {name for name, _ in report.failed}
        behind = {m.hook.path for m in report.missing if m.name in failed}
        for hook in hooks:
            hook_id = hook.hook_id if hook.hook_id is not None else learned.get(hook.path)
            if hook_id is not None and hook.path not in unread | behind:
                _checkpoint(self.database, hook_id, through)

    def run(self, stop: threading.Event) -> None:
        """Run a pass whenever one is due until `stop` is set; errors are logged, and the next pass tries again."""
        every = self.settings.recover_every_s
        log.info("recovery passes on", extra={"every_s": every})
        while not stop.is_set():
            wait = float(every)
            try:
                if self.run_once(stop) is None:
                    wait = min(every, RETRY_LEASE_S)
            except Exception as exc:  # the database or GitHub away, a bug: say it, try at the next pass
                self.metrics.recovery_passes.labels("error").inc()
                log.warning("recovery pass failed", extra={"error": describe(exc)})
            stop.wait(wait)
