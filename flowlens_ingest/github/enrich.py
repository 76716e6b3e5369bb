"""The files worker: fetch each queued PR head's file list from GitHub and write it back.

One job at a time per worker: claim (short transaction) -> GitHub (no transaction
open) -> settle or reschedule (short transaction). GitHub's rate limits bind one
credential (an App installation, the token): a job of a credential GitHub asked to
wait, or left with fewer than FLOWLENS_ENRICH_RATE_RESERVE requests, is rescheduled to
that time without a request (the client refuses it, budget.py), while jobs of other
credentials go on. The thread only ever waits in short polls, so a stop request is honoured at once. Whatever goes
wrong while a job is worked (a bug, the database failing after the fetch), the job
goes back to the queue with backoff: it never waits out its lease.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from flowlens_ingest.config import Settings
from flowlens_ingest.events.enums import FilesStatus
from flowlens_ingest.github import files, jobs
from flowlens_ingest.github.client import FilesPage, GitHubClient
from flowlens_ingest.github.errors import Forbidden, GitHubError, NotFound, NotSent, RateLimited
from flowlens_ingest.ingest import describe
from flowlens_ingest.metrics import Metrics
from flowlens_ingest.store.database import Database, DatabaseUnavailable

log = logging.getLogger(__name__)

# Retries of a failing fetch: base * 2^(attempt-1), jittered, capped.
MAX_BACKOFF_S = 900.0
# How often the queue gauges are refreshed.
GAUGE_INTERVAL_S = 10.0
# The outcome of a job another worker took over meanwhile: this worker's result was not kept.
LEASE_LOST = "lease_lost"
# A job not sent because the shared rate-limit waits could not be read is tried again this much later.
NOT_SENT_RETRY_S = 60.0


def client_for(settings: Settings, database: Database | None) -> GitHubClient:
    """The GitHub client the settings describe (App, token, or both); with `database`, rate-limit waits are shared."""
    from flowlens_ingest.github.waits import DatabaseWaits

    return GitHubClient(
        api_url=settings.github_api_url,
        token=settings.github_token,
        app_id=settings.github_app_id,
        private_key=settings.github_app_private_key,
        waits=DatabaseWaits(database) if database is not None else None,
    )


class Enricher:
    """Works the files queue with one GitHub client."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        client: GitHubClient,
        metrics: Metrics,
        *,
        retry_base_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.database = database
        self.client = client
        self.metrics = metrics
        self.retry_base_s = retry_base_s
        self._clock = clock
        self._gauges_at = 0.0

    def run_once(self) -> bool:
        """Claim and work one due job; False when none is due."""
        job = jobs.claim(self.database, timedelta(seconds=self.settings.enrich_lease_s))
        if job is None:
            return False
        self.work(job)
        return True

    def work(self, job: jobs.Job) -> None:
        """Fetch one job's list and settle or reschedule it; on any error, reschedule it. Logs one line."""
        started = time.perf_counter()
        error: Exception | None = None
        try:
            outcome, detail = self._fetch_and_settle(job)
        except Exception as exc:  # a bug, an overflow, the database failing after the fetch
            error = exc
            outcome, detail = self._after_error(job, exc)
        self.metrics.files_jobs.labels(outcome).inc()
        limit = self.client.rate_limit
        if limit.remaining is not None:
            self.metrics.github_rate_remaining.set(limit.remaining)
        extra = {
            "repository": job.full_name,
            "pr": job.pr_number,
            "head": job.head_sha[:12],
            "attempt": job.attempts,
            "outcome": outcome,
            "detail": detail,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        }
        if error is None:
            log.info("files job", extra=extra)
        else:
            # One line, no traceback: an exception's text may carry payload (a failing row),
            # `describe` keeps its type and primary message, `where` the line that raised.
            log.warning("files job error", extra={**extra, "error": describe(error), "where": _where(error)})

    def _fetch_and_settle(self, job: jobs.Job) -> tuple[str, str]:
        """Fetch the job's list, then settle or reschedule it; its outcome and a detail."""
        if job.attempts > self.settings.enrich_max_attempts:
            # Claimed past its attempts: the claims before ended unsettled (the worker killed, out of
            # memory, mid-job each time). Settled failed, nothing sent: it does not come back for ever.
            error = (
                f"claimed {job.attempts} times (attempts at most {self.settings.enrich_max_attempts}), never settled"
            )
            return _settled(jobs.settle(self.database, job, FilesStatus.FAILED, error=error), FilesStatus.FAILED), ""
        # A 304 is only as good as the stored list it vouches for.
        etag = job.etag if job.etag_sha is not None and job.etag_sha == job.stored_sha else None
        try:
            page = self._list_files(job, etag)
        except RateLimited as exc:
            if exc.sent:
                self.metrics.github_requests.labels(str(exc.status or "rate_limited")).inc()
            wait = exc.retry_at - self._clock()
            released = jobs.reschedule(self.database, job, wait, f"rate limited ({exc.reason})", refund=True)
            return ("rescheduled" if released else LEASE_LOST), f"rate_limit_{exc.reason}"
        except NotSent as exc:
            # Nothing went to GitHub: no request counted, no attempt spent.
            released = jobs.reschedule(self.database, job, NOT_SENT_RETRY_S, str(exc), refund=True)
            return ("rescheduled" if released else LEASE_LOST), exc.reason
        except (NotFound, Forbidden) as exc:
            status = FilesStatus.NOT_FOUND if isinstance(exc, NotFound) else FilesStatus.FORBIDDEN
            self.metrics.github_requests.labels(str(exc.status or exc.reason)).inc()
            return _settled(jobs.settle(self.database, job, status, error=str(exc)), status), exc.reason or ""
        except GitHubError as exc:
            self.metrics.github_requests.labels(str(exc.status or exc.reason)).inc()
            return self._retry(job, str(exc)), exc.reason or ""
        self.metrics.github_requests.labels("304" if page.not_modified else "200").inc(page.requests)
        if page.not_modified:
            status = FilesStatus(job.result or FilesStatus.FETCHED)
            settled = jobs.settle(self.database, job, status, not_modified=True, etag=page.etag)
            return _settled(settled, status), "not_modified"
        shaped = files.shape(page.entries, expected=job.changed_files, truncated=page.truncated)
        settled = jobs.settle(self.database, job, shaped.status, files=shaped.files, etag=page.etag)
        return _settled(settled, shaped.status), f"{len(shaped.files)} files"

    def _list_files(self, job: jobs.Job, etag: str | None) -> FilesPage:
        """The job's file list; RateLimited without a request while its credential's reserve is reached.

        The reserve (FLOWLENS_ENRICH_RATE_RESERVE) is per credential: one installation running
        low leaves the others' jobs alone, and what is left of it goes to recover and backfill.
        """
        reset = self.client.reserve_exhausted(self.settings.enrich_rate_reserve, installation_id=job.installation_id)
        if reset is not None:
            raise RateLimited(reset, "primary", sent=False)
        lease = timedelta(seconds=self.settings.enrich_lease_s)
        return self.client.list_files(
            job.full_name,
            job.pr_number,
            installation_id=job.installation_id,
            etag=etag,
            # Before each further page: the job held for another lease, or left to the worker that took it.
            keep=lambda: self._extend(job, lease),
        )

    def _extend(self, job: jobs.Job, lease: timedelta) -> bool:
        """Hold the job another lease; False when another worker holds it, or the database cannot say."""
        try:
            return jobs.extend(self.database, job, lease)
        except DatabaseUnavailable:
            return False  # not known to be ours past its lease: no further page is asked

    def _retry(self, job: jobs.Job, error: str) -> str:
        """Retry with backoff, or settle as failed once the attempts are spent."""
        if job.attempts >= self.settings.enrich_max_attempts:
            return _settled(jobs.settle(self.database, job, FilesStatus.FAILED, error=error), FilesStatus.FAILED)
        delay = min(MAX_BACKOFF_S, self.retry_base_s * 2 ** (job.attempts - 1))
        # Jitter: jobs that failed together do not all come back together.
        return "retry" if jobs.reschedule(self.database, job, random.uniform(delay / 2, delay), error) else LEASE_LOST

    def _after_error(self, job: jobs.Job, exc: Exception) -> tuple[str, str]:
        """Put the job back after an unexpected error: retried with backoff like a failed fetch."""
        try:
            return self._retry(job, describe(exc)), "error"
        except Exception:  # the database is unreachable too
            # Nothing more to do here: the lease runs out and the job is claimed again.
            return "error", "lease_expires"

    def refresh_gauges(self) -> None:
        """Queue depth and the oldest pending job's age, for /metrics."""
        queue = jobs.status(self.database)
        self.metrics.files_pending.set(queue.counts.get("pending", 0) + queue.counts.get("leased", 0))
        self.metrics.files_oldest_pending.set(queue.oldest_pending_s or 0)

    def run(self, stop: threading.Event) -> None:
        """Work the queue until `stop` is set; between jobs, wait at most one poll interval.

        Beside it, in a thread of its own, the scheduled recovery pass (recover_pass), unless
        FLOWLENS_RECOVER_EVERY is 0.
        """
        log.info(
            "files worker started",
            extra={"credential": self.client.describe(), "api": self.settings.github_api_url},
        )
        recovery = None
        if self.settings.recover_every_s > 0:
            from flowlens_ingest.github.recover_pass import RecoveryPass

            passes = RecoveryPass(self.settings, self.database, self.client, self.metrics)
            recovery = threading.Thread(target=passes.run, args=(stop,), name="recovery", daemon=True)
            recovery.start()
        try:
            self._work_queue(stop)
        finally:
            if recovery is not None:
                # The pass notices `stop` at its next wait; a request in flight ends within its deadline.
                recovery.join(timeout=60)
        log.info("files worker stopped")

    def _work_queue(self, stop: threading.Event) -> None:
        unavailable = False
        while not stop.is_set():
            try:
                if time.monotonic() - self._gauges_at >= GAUGE_INTERVAL_S:
                    self._gauges_at = time.monotonic()
                    self.refresh_gauges()
                worked = self.run_once()
                unavailable = False
            except DatabaseUnavailable as exc:
                # Once per outage, not once per poll.
                if not unavailable:
                    log.warning("files worker waiting for the database", extra={"reason": str(exc)})
                unavailable, worked = True, False
            except Exception:  # an unmigrated database, a bug: keep the worker alive, say it once
                if not unavailable:
                    log.exception("files worker error; retrying")
                unavailable, worked = True, False
            if not worked:
                stop.wait(self.settings.enrich_poll_s)


def _settled(settled: bool, status: FilesStatus) -> str:
    """The outcome of a settle: its status, or LEASE_LOST when it was refused (another worker holds the job now)."""
    return status.value if settled else LEASE_LOST


def _where(exc: BaseException) -> str:
    """Where an exception was raised, as `file:line` (no values, unlike its message)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown"
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"
