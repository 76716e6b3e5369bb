"""Per-worker background work: draining the spool once the database is back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flask import Flask

from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.ingest import JournalRefused, describe, ingest, journal_works
from flowlens_ingest.spool.folder import Drainer, Spooled, Unusable
from flowlens_ingest.store import migrate
from flowlens_ingest.store.database import DatabaseUnavailable
from flowlens_ingest.web.app import services

log = logging.getLogger(__name__)

# Short enough that a spool empties within seconds of the database coming back;
# while it is down, each tick costs one refused connection.
DRAIN_INTERVAL_S = 1.0
# How long a schema found migrated is trusted before the drainer looks again.
SCHEMA_RECHECK_S = 10.0


class SchemaPending(DatabaseUnavailable):
    """The database answers but is not migrated: keep the spool until it is."""


def spool_handler(app: Flask) -> Callable[[Spooled], None]:
    """Apply one spooled delivery exactly as the view would have; raise to keep it spooled."""
    svc = services(app)
    said: list[str] = []  # the last problem logged: said once, not on every tick
    checked_at = [-SCHEMA_RECHECK_S]

    def check_schema() -> None:
        # Without this every tick would log the missing table's error (twice a second with
        # two workers) instead of the one thing to do about it. Once a pass, not once a file.
        if time.monotonic() - checked_at[0] < SCHEMA_RECHECK_S:
            return
        try:
            with svc.database.bounded():
                problem = migrate.pending(svc.database.engine)
        except Exception as exc:  # unreachable: the drain pauses, the drainer says so once
            raise DatabaseUnavailable(type(exc).__name__) from exc
        if problem is None:
            said.clear()
            checked_at[0] = time.monotonic()
            return
        if problem not in said:
            log.warning("spool kept: %s", problem)
            said[:] = [problem]
        raise SchemaPending(problem)

    def handle(item: Spooled) -> None:
        check_schema()
        try:
            delivery = Delivery.from_http(
                delivery_id=item.delivery_id,
                hook_id=item.hook_id,
                event=item.event,
                content_type=item.content_type,
                body=item.body,
                received_at=item.received_at,
            )
            outcome = ingest(
                svc.database,
                delivery,
                store_payload=svc.settings.store_payloads,
                compress=svc.settings.journal_compression,
                on_retry=svc.metrics.db_retry,
            ).outcome
        except JournalRefused as exc:
            # The database answers, yet will not keep even a failure record of this one:
            # it must not hold up the deliveries behind it.
            if journal_works(svc.database):
                raise Unusable(str(exc)) from exc
            raise
        except DatabaseUnavailable:
            raise
        except Exception as exc:  # a file no code version will ever apply must not block the rest
            raise Unusable(describe(exc)) from exc
        svc.metrics.spool_drained.labels(outcome.value).inc()
        log.info(
            "spooled delivery applied",
            extra={"delivery": item.delivery_id, "event": item.event, "outcome": outcome.value},
        )

    return handle


def start(app: Flask, interval: float = DRAIN_INTERVAL_S) -> Drainer | None:
    """Start this worker's spool drainer (a daemon thread); None when the spool is off."""
    svc = services(app)
    if svc.spool is None:
        return None
    svc.spool.on_set_aside = svc.metrics.spool_set_aside.inc
    drainer = Drainer(svc.spool, spool_handler(app), interval=interval, on_depth=svc.metrics.spool_depth.set)
    drainer.start()
    return drainer
