"""Operator actions on the journal: list, replay, prune."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from .database import Database
from .delivery import Delivery
from .ingest import ingest
from .plan import decode_body
from .schema import webhook_deliveries as wd
from .values import Outcome

MAX_REPORTED_ERRORS = 20


def list_deliveries(database: Database, *, failed_only: bool = False, limit: int = 50) -> list[sa.Row[Any]]:
    """The most recent journal entries, newest first."""
    query = (
        sa.select(
            wd.c.received_at,
            wd.c.delivery_id,
            wd.c.hook_id,
            wd.c.event,
            wd.c.action,
            wd.c.outcome,
            wd.c.attempts,
            wd.c.error,
        )
        .order_by(wd.c.received_at.desc())
        .limit(limit)
    )
    if failed_only:
        query = query.where(wd.c.outcome == Outcome.FAILED.value)
    return database.read(query)


@dataclass
class ReplayReport:
    """What a replay did; `errors` names the first deliveries that could not be re-applied."""

    replayed: int = 0
    failed: int = 0
    skipped_no_payload: int = 0
    errors: list[str] = field(default_factory=list)


def _keys(database: Database, *, failed_only: bool, since: datetime | None) -> list[sa.Row[Any]]:
    # Taken once, up front: entries that fail again during this replay are not retaken.
    query = sa.select(wd.c.delivery_id, wd.c.hook_id).order_by(wd.c.received_at, wd.c.delivery_id, wd.c.hook_id)
    if failed_only:
        query = query.where(wd.c.outcome == Outcome.FAILED.value)
    if since is not None:
        query = query.where(wd.c.received_at >= since)
    return database.read(query)


def _journaled(database: Database, delivery_id: str, hook_id: int) -> Delivery | None:
    """The delivery as the journal holds it, or None when it kept no payload."""
    row = database.first(
        sa.select(
            wd.c.event, wd.c.body, wd.c.body_encoding, wd.c.content_type, wd.c.payload_sha256, wd.c.received_at
        ).where(wd.c.delivery_id == delivery_id, wd.c.hook_id == hook_id)
    )
    if row is None or row.body is None:
        return None
    # Parsed from exactly the bytes GitHub sent, as the view parsed them.
    return Delivery.from_http(
        delivery_id=delivery_id,
        hook_id=hook_id,
        event=row.event,
        content_type=row.content_type,
        body=decode_body(bytes(row.body), row.body_encoding),
        payload_sha256=row.payload_sha256,
        received_at=row.received_at,
    )


def replay(database: Database, *, failed_only: bool = False, since: datetime | None = None) -> ReplayReport:
    """Re-apply journaled payloads in arrival order; idempotent, as every upsert is guarded.

    A failed entry takes the outcome of its replay; any other keeps its first final
    outcome. A delivery that fails again stays journaled as failed, and the replay
    goes on. Raises DatabaseUnavailable when the database goes away.
    """
    report = ReplayReport()
    for delivery_id, hook_id in _keys(database, failed_only=failed_only, since=since):
        delivery = _journaled(database, delivery_id, hook_id)
        if delivery is None:
            report.skipped_no_payload += 1
            continue
        # store_payload=False: the journal keeps the payload it has, not a copy sent back.
        result = ingest(database, delivery, store_payload=False, replay=True)
        if result.error is not None:
            report.failed += 1
            if len(report.errors) < MAX_REPORTED_ERRORS:
                report.errors.append(f"{delivery_id}: {result.error}")
            continue
        report.replayed += 1
    return report


def prune(database: Database, older_than: timedelta, *, include_failed: bool = False) -> int:
    """Delete journal entries received before now - older_than; failed ones stay unless asked."""
    query = sa.delete(wd).where(wd.c.received_at < sa.func.now() - older_than)
    if not include_failed:
        query = query.where(wd.c.outcome != Outcome.FAILED.value)
    return database.execute(query)
