"""Per-worker background work: draining the spool once the database is back."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from flowlens_ingest.config import Settings
from flowlens_ingest.events import parse
from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.ingest import Disposition, Result, describe, ingest
from flowlens_ingest.memory import LARGE
from flowlens_ingest.metrics import Metrics
from flowlens_ingest.spool.folder import Spool, Spooled
from flowlens_ingest.store.database import Database
from flowlens_ingest.store.readiness import Readiness

log = logging.getLogger(__name__)

# Short enough that a spool empties within seconds of the database coming back;
# while it is down, each tick costs one refused connection.
DRAIN_INTERVAL_S = 1.0
# The reason of a pause the handler has already said (or the master): not said again.
SAID = "the database schema is not ready (said above)"


def spool_handler(
    database: Database,
    settings: Settings,
    metrics: Metrics,
    *,
    said_at_start: bool = False,
    readiness: Readiness | None = None,
) -> Callable[[Spooled], Result]:
    """Apply one spooled delivery exactly as the view would have, and say what became of it.

    `said_at_start`: gunicorn's master said what is wrong with the database; not said again here.
    `readiness`: the schema's state this handler keeps current, shared with the request path.
    """
    schema = readiness if readiness is not None else Readiness(database)
    said: list[str] = []  # the problem of this outage: said once, not on every tick
    # The master said at start what is wrong with the database: not said again by each
    # worker until the schema has been found ready once (a migration under way changes
    # the revision the problem names, not the fix).
    quiet = [said_at_start]

    def schema_problem() -> str | None:
        # Without this every tick would log the missing table's error (twice a second with
        # two workers) instead of the one thing to do about it. Once a pass, not once a file.
        problem = schema.check()
        if problem is None:
            said.clear()
            quiet[0] = False
            return None
        if not said and not quiet[0]:
            # Once an outage: a migration under way moves the revision it names, the fix is the same.
            log.warning("spool kept: %s", problem)
        said[:] = [problem]
        return problem

    def handle(item: Spooled) -> Result:
        problem = schema_problem()
        if problem is not None:
            # A schema problem is said above (or by the master): the pause line would repeat it.
            return Result(Disposition.RETRY_LATER, error=SAID if problem in said else problem)
        # A large delivery only in a turn no request waits for (memory.LARGE): else the next tick.
        turn = LARGE.take_if_free(len(item.body))
        if turn is False:
            return Result(Disposition.RETRY_LATER, error="large deliveries of requests come first")
        try:
            return apply(item)
        finally:
            if turn:
                LARGE.give_back()

    def apply(item: Spooled) -> Result:
        try:
            delivery = Delivery.parse(item.envelope, item.body)
        except (parse.BadPayload, parse.UnsupportedMediaType) as exc:
            # A file no code version will ever apply must not block the rest.
            return Result(Disposition.SET_ASIDE, error=describe(exc))
        # Anything else is ours: ingest says a bug once and keeps the file for a retry.
        result = ingest(
            database,
            delivery,
            store_payload=settings.store_payloads,
            compress=settings.journal_compression,
            on_retry=metrics.db_retry,
        )
        if result.outcome is not None:
            metrics.spool_drained.labels(result.outcome.value).inc()
            log.info(
                "spooled delivery applied",
                extra={"delivery": delivery.delivery_id, "event": delivery.event, "outcome": result.outcome.value},
            )
        return result

    return handle


class Drainer(threading.Thread):
    """A worker's background thread that empties the spool once the database is back."""

    def __init__(
        self,
        spool: Spool,
        handle: Callable[[Spooled], Result],
        interval: float = DRAIN_INTERVAL_S,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(name="flowlens-spool-drainer", daemon=True)
        self.spool = spool
        self.handle = handle
        self.interval = interval
        self.on_depth = on_depth
        self.stopping = threading.Event()

    def run(self) -> None:
        """Every `interval` seconds, drain what the spool holds, until stopped."""
        paused = False
        while not self.stopping.wait(self.interval):
            try:
                depth = self.spool.refresh()
                if self.on_depth is not None:
                    self.on_depth(depth)
                drained, stopped = self.spool.drain(self.handle, self.stopping) if depth else (0, None)
            except Exception as exc:  # keep the thread alive; the next tick tries again
                drained, stopped = 0, type(exc).__name__
            if drained:
                log.info("spool drained", extra={"drained": drained})
            # Once per outage, not once per tick; not at all when the handler said why.
            if stopped is not None and not paused and stopped != SAID and not self.stopping.is_set():
                log.warning("spool drain paused: %s", stopped)
            paused = stopped is not None

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to stop after its current delivery, and wait for it."""
        self.stopping.set()
        self.join(timeout)


def start(spool: Spool, handle: Callable[[Spooled], Result], metrics: Metrics, interval: float) -> Drainer:
    """Start a spool drainer (a daemon thread) that reports the spool's depth, bytes, cap and set-aside files."""
    spool.on_set_aside = metrics.spool_set_aside.inc
    metrics.spool_limit.set(spool.max_bytes)

    def report(depth: int) -> None:
        # Right after the tick's scan: its estimate is the folder's total.
        metrics.spool_depth.set(depth)
        metrics.spool_size.set(spool.estimate())
        metrics.spool_unusable.set(spool.unusable)

    drainer = Drainer(spool, handle, interval=interval, on_depth=report)
    drainer.start()
    return drainer
