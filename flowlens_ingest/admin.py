"""Operator actions on the journal: list, replay, prune."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .db import transaction
from .ingest import describe
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
    """What a replay did."""

    replayed: int = 0
    failed: int = 0
    skipped_no_payload: int = 0


def _keys(engine: Engine, *, failed_only: bool, since: datetime | None) -> Iterator[tuple[str, int]]:
    query = sa.select(wd.c.delivery_id, wd.c.hook_id).order_by(wd.c.received_at, wd.c.delivery_id)
    if failed_only:
        query = query.where(wd.c.outcome == FAILED)
    if since is not None:
        query = query.where(wd.c.received_at >= since)
    with engine.connect() as conn:
        yield from conn.execute(query).tuples().all()


def replay(engine: Engine, *, failed_only: bool = False, since: datetime | None = None) -> ReplayReport:
    """Re-apply journaled payloads in arrival order; idempotent, as every upsert is guarded."""
    report = ReplayReport()
    for delivery_id, hook_id in _keys(engine, failed_only=failed_only, since=since):
        def work(conn: Connection) -> str | None:
            row = conn.execute(
                sa.select(wd.c.event, wd.c.payload, wd.c.payload_sha256)
                .where(wd.c.delivery_id == delivery_id, wd.c.hook_id == hook_id)
                .with_for_update()
            ).first()
            if row is None or row.payload is None:
                return None
            delivery = Delivery(delivery_id, hook_id, row.event, row.payload, row.payload_sha256)
            return apply_delivery(conn, delivery, map_delivery(delivery.event, delivery.payload), replay=True)

        try:
            outcome = transaction(engine, work)
        except Exception as exc:  # keep going: one bad payload must not stop the rest
            transaction(
                engine,
                lambda conn: conn.execute(
                    sa.update(wd)
                    .where(wd.c.delivery_id == delivery_id, wd.c.hook_id == hook_id)
                    .values(outcome=FAILED, error=describe(exc), attempts=wd.c.attempts + 1)
                ),
            )
            report.failed += 1
            continue
        if outcome is None:
            report.skipped_no_payload += 1
        else:
            report.replayed += 1
    return report


def prune(engine: Engine, older_than: timedelta, *, include_failed: bool = False) -> int:
    """Delete journal entries received before now - older_than; failed ones stay unless asked."""
    query = sa.delete(wd).where(wd.c.received_at < sa.func.now() - older_than)
    if not include_failed:
        query = query.where(wd.c.outcome != FAILED)
    return transaction(engine, lambda conn: conn.execute(query).rowcount)
