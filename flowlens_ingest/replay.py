"""Replay: journaled deliveries applied again, in arrival order, through the same `ingest`.

Idempotent, as every upsert is guarded: an operator replays the failed ones after a fix, or a
time range. Above ingest (it calls it) and the store (its journal_admin reads the journal).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa

from flowlens_ingest.events import parse
from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.ingest import Disposition, ingest
from flowlens_ingest.store.database import Database
from flowlens_ingest.store.journal_admin import journal_entry, journal_keys

MAX_REPORTED_ERRORS = 20
# What a journaled body that does not read back raises: gzip's own errors (a bad header, a stream
# cut short), or a payload that does not parse (its content type, its JSON).
UNREADABLE = (OSError, EOFError, zlib.error, parse.BadPayload, parse.UnsupportedMediaType)
# A replay takes what arrived up to its start and this much after (other hosts' clocks may run ahead).
ARRIVED_MARGIN = timedelta(minutes=1)


@dataclass
class ReplayReport:
    """What a replay did; `errors` names the first deliveries that could not be re-applied."""

    replayed: int = 0
    failed: int = 0
    skipped_no_payload: int = 0
    errors: list[str] = field(default_factory=list)
    # Why the replay stopped before the end (the database went away), else None.
    stopped: str | None = None


def replay(database: Database, *, failed_only: bool = False, since: datetime | None = None) -> ReplayReport:
    """Re-apply journaled payloads in arrival order; idempotent, as every upsert is guarded.

    A failed entry takes the outcome of its replay; any other keeps its first final
    outcome. A delivery that fails again stays journaled as failed, and the replay
    goes on; it stops, saying why, when the database goes away (what it replayed so
    far stays, and replaying again is idempotent).
    """
    report = ReplayReport()
    # What had arrived when the replay began, by the database's clock (it stamps what arrives;
    # a spooled delivery carries its host's, given a minute): under live traffic the walk ends
    # instead of chasing each new arrival.
    until = database.read(sa.select(sa.func.now()))[0][0] + ARRIVED_MARGIN
    for delivery_id, hook_id in journal_keys(database, failed_only=failed_only, since=since, until=until):
        try:
            entry = journal_entry(database, delivery_id, hook_id)
            # Parsed from exactly the bytes GitHub sent, as the view parsed them.
            delivery = Delivery.parse(*entry) if entry is not None else None
        except UNREADABLE as exc:
            # A stored body that does not read back (a gzip cut short, bytes no payload parses from):
            # named, and the replay goes on with the rest.
            report.failed += 1
            if len(report.errors) < MAX_REPORTED_ERRORS:
                report.errors.append(
                    f"{delivery_id}: its stored body cannot be read back ({type(exc).__name__}: {exc})"
                )
            continue
        if delivery is None:
            report.skipped_no_payload += 1
            continue
        # store_payload=False: the journal keeps the payload it has, not a copy sent back.
        result = ingest(database, delivery, store_payload=False, replay=True)
        if result.disposition is Disposition.RETRY_LATER:
            report.stopped = result.error
            break
        if result.error is not None:
            report.failed += 1
            if len(report.errors) < MAX_REPORTED_ERRORS:
                report.errors.append(f"{delivery_id}: {result.error}")
            continue
        report.replayed += 1
    return report
