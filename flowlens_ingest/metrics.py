"""Prometheus metrics, correct across gunicorn workers.

With PROMETHEUS_MULTIPROC_DIR set (gunicorn_conf sets it, for `serve` and the
Procfile alike), every worker writes its samples to files there and /metrics
sums them: https://prometheus.github.io/client_python/multiprocess/ (this module
gets the folder from Settings.metrics_dir; prometheus_client reads the variable itself).

prometheus_client decides between per-process and multiprocess values once, when
it is first imported, from that variable. gunicorn imports this package (for
gunicorn_conf) before the configuration can set it, so this module imports
prometheus_client only when a metric is created or rendered: in a worker, after
the fork, long after gunicorn_conf ran.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only events we know become label values: a signed sender could invent any name.
from flowlens_ingest.events.mappers import KNOWN_EVENTS

# Label values created at 0 when a process starts, so an alert's increase() sees the first
# one: a series that appears with the value 1 has no earlier sample to increase from, and
# the first failed delivery after a restart would go unnoticed (deploy/prometheus/).
WATCHED_OUTCOMES = ("failed", "unavailable")
SIGNATURE_REASONS = ("missing", "unsupported_algorithm", "mismatch")
RETRY_REASONS = ("40001", "40P01", "disconnect")

# Set by gunicorn_conf in each worker it forks: the name of the worker's sample files,
# its slot (`worker0`, `worker1`…), not its pid. A worker that replaces a recycled or dead
# one takes its slot and counts on in its files, so recycling workers (memory.py) never
# grows the folder that every scrape reads. Unset (the files worker, tests): the pid.
FILES_ID = "FLOWLENS_METRICS_FILES_ID"

if TYPE_CHECKING:
    from collections.abc import Callable

    from prometheus_client import CollectorRegistry, Gauge


def event_label(event: str) -> str:
    """The event name, or `other` for events outside KNOWN_EVENTS."""
    return event if event in KNOWN_EVENTS else "other"


class SeenGauge:
    """A gauge that exists from its first value on: until then absent, not 0.

    Every process makes every instrument, and a gauge starts at 0: the rate limit would
    read 0 ("exhausted", the lowest of all processes' values) from every web worker and
    on every installation without a files worker, and FlowLensGitHubRateLimitLow would
    fire for ever. Only the files worker, once GitHub has answered it, creates this one.
    """

    def __init__(self, make: Callable[[], Gauge]) -> None:
        self._make = make
        self._gauge: Gauge | None = None

    def set(self, value: float) -> None:
        """Set the gauge, creating it on the first call."""
        if self._gauge is None:
            self._gauge = self._make()
        self._gauge.set(value)


class Metrics:
    """The service's instruments, registered once per process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        _name_files_by_slot()
        reg = REGISTRY if registry is None else registry
        self.deliveries = Counter(
            "flowlens_deliveries",
            "Signed deliveries answered, by event and outcome",
            ["event", "outcome"],
            registry=reg,
        )
        self.latency = Histogram(
            "flowlens_delivery_duration_seconds",
            "Time from request to answer for signed deliveries",
            ["event"],
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=reg,
        )
        self.retries = Counter(
            "flowlens_db_retries", "Delivery transactions retried, by SQLSTATE or disconnect", ["reason"], registry=reg
        )
        self.signature_failures = Counter(
            "flowlens_signature_failures", "Requests refused with 401, by reason", ["reason"], registry=reg
        )
        self.spool_drained = Counter(
            "flowlens_spool_drained",
            "Spooled deliveries applied after an outage, by outcome",
            ["outcome"],
            registry=reg,
        )
        self.spool_set_aside = Counter(
            "flowlens_spool_set_aside",
            "Spooled deliveries that could never be applied nor journaled, moved aside (*.unusable)",
            registry=reg,
        )
        self.round_trips = Counter(
            "flowlens_db_round_trips",
            "SQL round trips to the database (statements, BEGIN, COMMIT, ROLLBACK)",
            registry=reg,
        )
        # Every worker's drainer samples the shared spool each second. "livemax" keeps
        # only live workers' samples: a dead worker's last sample would otherwise
        # be reported for ever ("max" keeps the files of dead processes).
        self.spool_depth = Gauge(
            "flowlens_spool_depth",
            "Deliveries waiting in the local spool",
            multiprocess_mode="livemax",
            registry=reg,
        )
        # The same tick measures the spool against its cap, and counts what waits set aside.
        self.spool_size = Gauge(
            "flowlens_spool_size_bytes",
            "Bytes the deliveries waiting in the local spool take",
            multiprocess_mode="livemax",
            registry=reg,
        )
        self.spool_limit = Gauge(
            "flowlens_spool_limit_bytes",
            "The spool's cap (FLOWLENS_SPOOL_MAX_BYTES); past it deliveries are answered 503",
            multiprocess_mode="livemax",
            registry=reg,
        )
        self.spool_unusable = Gauge(
            "flowlens_spool_unusable_files",
            "Spooled deliveries set aside (*.unusable) that wait for an operator",
            multiprocess_mode="livemax",
            registry=reg,
        )

        # The files worker (enrich.py).
        self.files_jobs = Counter(
            "flowlens_files_jobs",
            "Files jobs worked, by files_status settled, retry or rescheduled",
            ["outcome"],
            registry=reg,
        )
        self.github_requests = Counter(
            "flowlens_github_requests",
            "GitHub API requests of the files worker, by HTTP status",
            ["code"],
            registry=reg,
        )
        self.github_rate_remaining = SeenGauge(
            lambda: Gauge(
                "flowlens_github_rate_limit_remaining",
                "GitHub's x-ratelimit-remaining on the files worker's latest response",
                multiprocess_mode="livemin",
                registry=reg,
            )
        )
        self.files_pending = Gauge(
            "flowlens_files_jobs_pending", "Files jobs waiting or leased", multiprocess_mode="livemax", registry=reg
        )
        self.files_oldest_pending = Gauge(
            "flowlens_files_oldest_pending_seconds",
            "Age of the oldest files job still waiting",
            multiprocess_mode="livemax",
            registry=reg,
        )

        # Recovery of missed deliveries (github/recover.py, its scheduled pass).
        self.recovered = Counter(
            "flowlens_recovered_deliveries",
            "Deliveries missing from the journal that recovery brought in, by how (redelivered, fetched)",
            ["how"],
            registry=reg,
        )
        self.recovery_failures = Counter(
            "flowlens_recovery_failures",
            "Missing deliveries a recovery pass could not bring in (retried on the next pass)",
            registry=reg,
        )
        self.recovery_gaps = Counter(
            "flowlens_recovery_gaps",
            "Recovery passes that found a hook unchecked for longer than GitHub keeps its delivery log",
            registry=reg,
        )
        # Absent until a pass completes (a SeenGauge): an installation without recovery must
        # not read "never, i.e. 1970" and fire FlowLensRecoveryBehind for ever.
        self.recovery_last_success = SeenGauge(
            lambda: Gauge(
                "flowlens_recovery_last_success_timestamp_seconds",
                "Unix time of the last recovery pass that read every hook's log to its end",
                multiprocess_mode="max",
                registry=reg,
            )
        )
        self.recovery_passes = Counter(
            "flowlens_recovery_passes", "Scheduled recovery passes run, by result", ["result"], registry=reg
        )
        self.recovery_skipped = Counter(
            "flowlens_recovery_skipped",
            "What a recovery run left for the next one, by cause: malformed log entries skipped, missing"
            " deliveries held back (a rate limit, a bound), hook logs not read to the end",
            ["cause"],
            registry=reg,
        )
        self._delivery_series: dict[tuple[str, str], tuple[Callable[[], None], Callable[[float], None]]] = {}
        self._watched_series_at_zero()

    def _watched_series_at_zero(self) -> None:
        """Create the series the alerting rules count increases of, at 0 (see WATCHED_OUTCOMES)."""
        for event in (*sorted(KNOWN_EVENTS), "other"):
            for outcome in WATCHED_OUTCOMES:
                self.deliveries.labels(event, outcome)
        for reason in SIGNATURE_REASONS:
            self.signature_failures.labels(reason)
        for reason in RETRY_REASONS:
            self.retries.labels(reason)

    def delivery(self, event: str, outcome: str, seconds: float) -> None:
        """Count one answered delivery."""
        series = self._delivery_series.get((event, outcome))
        if series is None:
            # Looked up once per event and outcome (labels() locks and builds a key each call);
            # the events are KNOWN_EVENTS and `other`, so this holds a few dozen pairs at most.
            label = event_label(event)
            series = self.deliveries.labels(label, outcome).inc, self.latency.labels(label).observe
            if label != "other":
                self._delivery_series[(event, outcome)] = series
        count, observe = series
        count()
        observe(seconds)

    def db_retry(self, reason: str) -> None:
        """Count one retried transaction."""
        self.retries.labels(reason).inc()

    def signature_failure(self, reason: str) -> None:
        """Count one refused signature."""
        self.signature_failures.labels(reason).inc()


def _name_files_by_slot() -> None:
    """Name this process's sample files by the slot gunicorn_conf gave it (FILES_ID), before any metric exists."""
    from prometheus_client import values

    slot = os.environ.get(FILES_ID)
    if slot and values.ValueClass is not values.MutexValue and not getattr(values.ValueClass, "_flowlens", False):
        # prometheus_client's own hook for this (values.MultiProcessValue): distinct
        # values in processes that run at once, which slots are (gunicorn_conf.pre_fork).
        values.ValueClass = values.MultiProcessValue(process_identifier=lambda: slot)  # type: ignore[no-untyped-call]
        values.ValueClass._flowlens = True


def _initialised(path: str) -> bool:
    # A process that is starting (a replacement worker, the files worker) creates its
    # file empty and sizes it a moment later; prometheus_client cannot read it in
    # between (struct.error) and /metrics answered 500. Such a file holds nothing yet.
    try:
        return os.path.getsize(path) >= 8
    except FileNotFoundError:
        return False


def render(directory: Path | None) -> tuple[bytes, str]:
    """The exposition text: summed over all workers' files in `directory` (Settings.metrics_dir), if any."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

    if directory is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    folder = directory

    class Collector(multiprocess.MultiProcessCollector):
        def collect(self) -> Any:
            files = [str(path) for path in folder.glob("*.db") if _initialised(str(path))]
            return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]

    registry = CollectorRegistry()
    # The folder given: prometheus_client would read PROMETHEUS_MULTIPROC_DIR itself.
    Collector(registry, str(folder))  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


_instruments: Metrics | None = None


def instruments() -> Metrics:
    """The process's Metrics, created on first use (apps built in tests share them)."""
    global _instruments
    if _instruments is None:
        _instruments = Metrics()
    return _instruments
