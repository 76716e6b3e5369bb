"""The files worker: fetch each queued PR head's file list from GitHub and write it back.

One job at a time per worker: claim (short transaction) -> GitHub (no transaction
open) -> settle or reschedule (short transaction). Rate limits reschedule the job
to GitHub's reset time and pause this worker's claims until then; the thread only
ever waits in short polls, so a stop request is honoured at once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from datetime import UTC, datetime, timedelta

from . import files, jobs
from .config import Settings
from .database import Database, DatabaseUnavailable
from .github import Forbidden, GitHubClient, GitHubError, NotFound, RateLimited
from .metrics import Metrics
from .values import FilesStatus

log = logging.getLogger(__name__)

# Retries of a failing fetch: base * 2^(attempt-1), jittered, capped.
MAX_BACKOFF_S = 900.0
# How often the queue gauges are refreshed.
GAUGE_INTERVAL_S = 10.0


def client_for(settings: Settings) -> GitHubClient:
    """The GitHub client the settings describe (App, token, or both)."""
    return GitHubClient(
        api_url=settings.github_api_url,
        token=settings.github_token,
        app_id=settings.github_app_id,
        private_key=settings.github_app_private_key,
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
    ) -> None:
        self.settings = settings
        self.database = database
        self.client = client
        self.metrics = metrics
        self.retry_base_s = retry_base_s
        # No claims before this time (epoch seconds): GitHub's limit is the client's, not one job's.
        self.paused_until = 0.0
        self._gauges_at = 0.0

    def run_once(self) -> bool:
        """Claim and work one due job; False when none is due (or claims are paused)."""
        if time.time() < self.paused_until:
            return False
        job = jobs.claim(self.database, timedelta(seconds=self.settings.enrich_lease_s))
        if job is None:
            return False
        self.work(job)
        return True

    def work(self, job: jobs.Job) -> None:
        """Fetch one job's list and settle or reschedule it."""
        started = time.perf_counter()
        # A 304 is only as good as the stored list it vouches for.
        etag = job.etag if job.etag_sha is not None and job.etag_sha == job.stored_sha else None
        outcome, detail = "", ""
        try:
            page = self.client.list_files(job.full_name, job.pr_number, installation_id=job.installation_id, etag=etag)
        except RateLimited as exc:
            self.paused_until = max(self.paused_until, exc.retry_at)
            at = datetime.fromtimestamp(exc.retry_at, tz=UTC)
            jobs.reschedule(self.database, job, at, f"rate limited ({exc.reason})", refund=True)
            outcome, detail = "rescheduled", f"rate_limit_{exc.reason}"
            self.metrics.github_requests.labels(str(exc.status or "rate_limited")).inc()
        except (NotFound, Forbidden) as exc:
            status = FilesStatus.NOT_FOUND if isinstance(exc, NotFound) else FilesStatus.FORBIDDEN
            self.metrics.github_requests.labels(str(exc.status or exc.reason)).inc()
            jobs.settle(self.database, job, status, error=str(exc))
            outcome, detail = status.value, exc.reason or ""
        except GitHubError as exc:
            self.metrics.github_requests.labels(str(exc.status or exc.reason)).inc()
            outcome, detail = self._failed(job, exc), exc.reason or ""
        else:
            self.metrics.github_requests.labels("304" if page.not_modified else "200").inc(page.requests)
            if page.not_modified:
                status = FilesStatus(job.result or FilesStatus.FETCHED)
                jobs.settle(self.database, job, status, not_modified=True, etag=page.etag)
                outcome, detail = status.value, "not_modified"
            else:
                shaped = files.shape(page.entries, expected=job.changed_files)
                jobs.settle(self.database, job, shaped.status, files=shaped.files, etag=page.etag)
                outcome, detail = shaped.status.value, f"{len(shaped.files)} files"
        self.metrics.files_jobs.labels(outcome).inc()
        limit = self.client.rate_limit
        if limit.remaining is not None:
            self.metrics.github_rate_remaining.set(limit.remaining)
        reset = self.client.reserve_exhausted(self.settings.enrich_rate_reserve)
        if reset is not None:
            self.paused_until = max(self.paused_until, reset)
        log.info(
            "files job",
            extra={
                "repository": job.full_name,
                "pr": job.pr_number,
                "head": job.head_sha[:12],
                "attempt": job.attempts,
                "outcome": outcome,
                "detail": detail,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )

    def _failed(self, job: jobs.Job, exc: GitHubError) -> str:
        """Retry with backoff, or settle as failed once the attempts are spent."""
        if job.attempts >= self.settings.enrich_max_attempts:
            jobs.settle(self.database, job, FilesStatus.FAILED, error=str(exc))
            return FilesStatus.FAILED.value
        delay = min(MAX_BACKOFF_S, self.retry_base_s * 2 ** (job.attempts - 1))
        # Jitter: jobs that failed together do not all come back together.
        at = datetime.now(UTC) + timedelta(seconds=random.uniform(delay / 2, delay))
        jobs.reschedule(self.database, job, at, str(exc))
        return "retry"

    def refresh_gauges(self) -> None:
        """Queue depth and the oldest pending job's age, for /metrics."""
        queue = jobs.status(self.database)
        self.metrics.files_pending.set(queue.counts.get("pending", 0) + queue.counts.get("leased", 0))
        self.metrics.files_oldest_pending.set(queue.oldest_pending_s or 0)

    def run(self, stop: threading.Event) -> None:
        """Work the queue until `stop` is set; between jobs, wait at most one poll interval."""
        log.info(
            "files worker started",
            extra={"credential": self.client.describe(), "api": self.settings.github_api_url},
        )
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
        log.info("files worker stopped")
