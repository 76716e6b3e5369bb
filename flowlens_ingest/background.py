"""Per-worker background work: draining the spool once the database is back."""

from __future__ import annotations

import logging
from typing import Callable

from flask import Flask

from .db import DatabaseUnavailable
from .ingest import delivery_from_spool, describe, ingest
from .spool import Drainer, Spooled, Unusable

log = logging.getLogger(__name__)

# Short enough that a spool empties within seconds of the database coming back;
# while it is down, each tick costs one refused connection.
DRAIN_INTERVAL_S = 1.0


def spool_handler(app: Flask) -> Callable[[Spooled], None]:
    """Apply one spooled delivery exactly as the view would have; raise to keep it spooled."""
    settings = app.config["FLOWLENS"]
    database = app.extensions["flowlens_db"]
    metrics = app.extensions["flowlens_metrics"]

    def handle(item: Spooled) -> None:
        try:
            delivery = delivery_from_spool(item)
            outcome = ingest(
                database.engine,
                delivery,
                store_payload=settings.store_payloads,
                on_retry=metrics.db_retry,
            )
        except DatabaseUnavailable:
            raise
        except Exception as exc:  # a file no code version will ever apply must not block the rest
            raise Unusable(describe(exc)) from exc
        metrics.spool_drained.labels(outcome).inc()
        log.info("spooled delivery applied", extra={"delivery": item.delivery_id, "event": item.event, "outcome": outcome})

    return handle


def start(app: Flask, interval: float = DRAIN_INTERVAL_S) -> Drainer | None:
    """Start this worker's spool drainer (a daemon thread); None when the spool is off."""
    spool = app.extensions.get("flowlens_spool")
    if spool is None:
        return None
    metrics = app.extensions["flowlens_metrics"]
    drainer = Drainer(spool, spool_handler(app), interval=interval, on_depth=metrics.spool_depth.set)
    drainer.start()
    return drainer
