"""Operator actions on the journal: list, replay, prune."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .db import DatabaseUnavailable, transaction
from .ingest import describe, record_failure
from .mappers import map_delivery
from .schema import webhook_deliveries as wd
from .store import FAILED, Delivery, apply_delivery


def list_deliveries(conn: Connection, *, failed_only: bool = False, limit: int = 50) -> list[sa.Row]:
    """The most recent journal entries, newest first."""
    query = sa.select(
        wd.c.received_at, wd.c.delivery_id, wd.c.hook_id, wd.c.event, wd.c.action, wd.c.outcome, wd.c.attempts, wd.c.error
    ).order_by(wd.c.received_at.desc()).limit(limit)
    if failed_only:
        query = query.where(wd.c.outcome == FAILED)
    return list(conn.execute(query))


@dataclass
class ReplayReport:
    """What a replay did; `errors` names the first deliveries that could not be re-applied."""

    replayed: int = 0
    failed: int = 0
    skipped_no_payload: int = 0
    errors: list[str] = field(default_factory=list)


MAX_REPORTED_ERRORS = 20


def _keys(engine: Engine, *, failed_only: bool, since: datetime | None) -> list[tuple[str, int]]:
    # Taken once, up front: entries that fail again during this replay are not retaken.
    query = sa.select(wd.c.delivery_id, wd.c.hook_id).order_by(wd.c.received_at, wd.c.delivery_id, wd.c.hook_id)
    if failed_only:
        query = query.where(wd.c.outcome == FAILED)
    if since is not None:
        query = query.where(wd.c.received_at >= since)
    with engine.connect() as conn:
        return list(conn.execute(query).tuples())


def _journaled(engine: Engine, delivery_id: str, hook_id: int) -> Delivery | None:
    """The delivery as the journal holds it, or None when it kept no payload."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(wd.c.event, wd.c.payload, wd.c.payload_sha256).where(
                wd.c.delivery_id == delivery_id, wd.c.hook_id == hook_id
            )
        ).first()
    if row is None or not isinstance(row.payload, dict):
        return None
    return Delivery(delivery_id, hook_id, row.event, row.payload, row.payload_sha256)


def replay(engine: Engine, *, failed_only: bool = False, since: datetime | None = None) -> ReplayReport:
    """Re-apply journaled payloads in arrival order; idempotent, as every upsert is guarded.

    A failed entry takes the outcome of its replay; any other keeps its first final
    outcome. A delivery that fails again stays journaled as failed, and the replay
    goes on. Raises DatabaseUnavailable when the database goes away.
    """
    report = ReplayReport()
    for delivery_id, hook_id in _keys(engine, failed_only=failed_only, since=since):
        delivery = _journaled(engine, delivery_id, hook_id)
        if delivery is None:
            report.skipped_no_payload += 1
            continue
        try:
            changes = map_delivery(delivery.event, delivery.payload)
            # store_payload=False: the journal keeps the payload it has, not a copy sent back.
            transaction(
                engine, lambda conn: apply_delivery(conn, delivery, changes, store_payload=False, replay=True)
            )
        except DatabaseUnavailable:
            raise
        except Exception as exc:  # one bad payload must not stop the rest
            error = describe(exc)
            # Journals the error on a failed entry; leaves a final one as it was.
            record_failure(engine, delivery, error)
            report.failed += 1
            if len(report.errors) < MAX_REPORTED_ERRORS:
                report.errors.append(f"{delivery_id}: {error}")
            continue
        report.replayed += 1
    return report


def prune(engine: Engine, older_than: timedelta, *, include_failed: bool = False) -> int:
    """Delete journal entries received before now - older_than; failed ones stay unless asked."""
    query = sa.delete(wd).where(wd.c.received_at < sa.func.now() - older_than)
    if not include_failed:
        query = query.where(wd.c.outcome != FAILED)
    return transaction(engine, lambda conn: conn.execute(query).rowcount)
