"""Per-worker background work: draining the spool once the database is back."""

from __future__ import annotations

import logging

from flask import Flask

from .ingest import delivery_from_spool, ingest
from .spool import Drainer, Spooled

log = logging.getLogger(__name__)


def start(app: Flask) -> Drainer | None:
    """Start this worker's spool drainer (a daemon thread); None when the spool is off."""
    spool = app.extensions.get("flowlens_spool")
    if spool is None:
        return None
    settings = app.config["FLOWLENS"]
    database = app.extensions["flowlens_db"]
    metrics = app.extensions["flowlens_metrics"]

    def handle(item: Spooled) -> None:
        outcome = ingest(
            database.engine,
            delivery_from_spool(item),
            store_payload=settings.store_payloads,
            on_retry=metrics.db_retry,
        )
        metrics.spool_drained.labels(outcome).inc()
        log.info("spooled delivery applied", extra={"delivery": item.delivery_id, "event": item.event, "outcome": outcome})

    drainer = Drainer(spool, handle, on_depth=metrics.spool_depth.set)
    drainer.start()
    return drainer

