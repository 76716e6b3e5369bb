"""Operator actions on the journal: list, replay, prune."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.events.enums import Outcome
from flowlens_ingest.ingest import Disposition, ingest
from flowlens_ingest.store.batch import Statement
from flowlens_ingest.store.database import Database
from flowlens_ingest.store.expressions import param
from flowlens_ingest.store.journal import JOURNAL_BUCKETS
from flowlens_ingest.store.plan import decode_body
from flowlens_ingest.store.schema import webhook_deliveries as wd

MAX_REPORTED_ERRORS = 20


_LISTED = (
    wd.c.received_at,
    wd.c.delivery_id,
    wd.c.hook_id,
    wd.c.event,
    wd.c.action,
    wd.c.outcome,
    wd.c.attempts,
    wd.c.error,
)


def _by_bucket(
    build: Callable[[int], sa.Select[Any]], order: list[sa.Column[Any]], limit: int, *, newest_first: bool = False
) -> sa.Select[Any]:
    """One query per journal bucket, each an ordered range read of the bucket's index, merged.

    The journal's time index leads with its bucket (schema.py): on YugabyteDB each
    bucket is one hash value, stored in received_at order, so this reads at most
    `limit` rows per bucket in index order instead of scanning the whole table.
    """

    def ordered(columns: list[Any]) -> list[Any]:
        return [c.desc() for c in columns] if newest_first else columns

    parts = sa.union_all(*(build(b).order_by(*ordered(order)).limit(limit) for b in range(JOURNAL_BUCKETS)))
    merged = parts.subquery()
    return sa.select(merged).order_by(*ordered([merged.c[c.name] for c in order]))


def list_deliveries(database: Database, *, failed_only: bool = False, limit: int = 50) -> list[sa.Row[Any]]:
    """The most recent journal entries, newest first."""
    if failed_only:
        # Failed entries are few: their partial index is small however it is sharded.
        query = sa.select(*_LISTED).where(wd.c.outcome == Outcome.FAILED.value).order_by(wd.c.received_at.desc())
        return database.read(query.limit(limit))
    order = [wd.c.received_at, wd.c.delivery_id, wd.c.hook_id]
    merged = _by_bucket(lambda b: sa.select(*_LISTED).where(wd.c.bucket == b), order, limit, newest_first=True)
    return database.read(merged.limit(limit))


@dataclass
class ReplayReport:
    """What a replay did; `errors` names the first deliveries that could not be re-applied."""

    replayed: int = 0
    failed: int = 0
    skipped_no_payload: int = 0
    errors: list[str] = field(default_factory=list)
    # Why the replay stopped before the end (the database went away), else None.
    stopped: str | None = None


# Keys are read in pages (keyset pagination, one short query each), never all at once.
REPLAY_PAGE = 500


def _keys(database: Database, *, failed_only: bool, since: datetime | None) -> Iterator[tuple[str, int]]:
    """Journal keys in arrival order, a page at a time.

    Entries that fail again during the replay keep their place, behind the cursor,
    so none is taken twice.
    """
    order = [wd.c.received_at, wd.c.delivery_id, wd.c.hook_id]
    after: tuple[Any, ...] | None = None
    while True:

        def page(bucket: int | None, after: tuple[Any, ...] | None = after) -> sa.Select[Any]:
            query = sa.select(wd.c.received_at, wd.c.delivery_id, wd.c.hook_id)
            if bucket is not None:
                query = query.where(wd.c.bucket == bucket)
            if failed_only:
                query = query.where(wd.c.outcome == Outcome.FAILED.value)
            if since is not None:
                query = query.where(wd.c.received_at >= since)
            if after is not None:
                query = query.where(
                    wd.c.received_at >= after[0], sa.tuple_(*order) > sa.tuple_(*(sa.literal(v) for v in after))
                )
            return query

        if failed_only:
            query = page(None).order_by(*order).limit(REPLAY_PAGE)
        else:
            query = _by_bucket(page, order, REPLAY_PAGE).limit(REPLAY_PAGE)
        rows = database.read(query)
        for row in rows:
            yield row.delivery_id, row.hook_id
        if len(rows) < REPLAY_PAGE:
            return
        after = tuple(rows[-1])


def _journaled(database: Database, delivery_id: str, hook_id: int) -> Delivery | None:
    """The delivery as the journal holds it, or None when it kept no payload."""
    row = database.first(
        sa.select(
            wd.c.event,
            wd.c.body,
            wd.c.body_encoding,
            wd.c.content_type,
            wd.c.payload_sha256,
            wd.c.received_at,
            wd.c.body_from_api,
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
        body_from_api=row.body_from_api,
    )


def replay(database: Database, *, failed_only: bool = False, since: datetime | None = None) -> ReplayReport:
    """Re-apply journaled payloads in arrival order; idempotent, as every upsert is guarded.

    A failed entry takes the outcome of its replay; any other keeps its first final
    outcome. A delivery that fails again stays journaled as failed, and the replay
    goes on; it stops, saying why, when the database goes away (what it replayed so
    far stays, and replaying again is idempotent).
    """
    report = ReplayReport()
    for delivery_id, hook_id in _keys(database, failed_only=failed_only, since=since):
        delivery = _journaled(database, delivery_id, hook_id)
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


# Rows deleted per transaction: each batch is well inside the statement timeout.
PRUNE_BATCH = 2000
# Below any received_at: where each bucket's walk starts.
BEGINNING = datetime.min.replace(tzinfo=UTC)


def _index_order_only() -> sa.Select[Any]:
    """Forbid sorts for the rest of the transaction, so the next statement reads the index in order."""
    return sa.select(sa.func.set_config("enable_sort", "off", True))


def _prune_batch(include_failed: bool) -> sa.Select[Any]:
    """Delete the oldest `p_batch` entries of bucket `p_bucket` in [`p_after`, `p_cutoff`); their count and last time.

    The equality on the bucket and the range on received_at make it one ordered
    range read of the bucket's (bucket, received_at) index, stopped after `p_batch`
    rows. The lower bound `p_after` (where the previous batch ended) skips the failed
    entries that stay and the index entries of rows already deleted (dead until
    VACUUM on PostgreSQL, tombstones until compaction on YugabyteDB), so a batch
    costs the same at the end of a bucket as at its start.
    """
    doomed = (
        sa.select(wd.c.delivery_id, wd.c.hook_id)
        .where(wd.c.bucket == param("bucket"), wd.c.received_at >= param("after"), wd.c.received_at < param("cutoff"))
        .order_by(wd.c.received_at)
        .limit(param("batch"))
    )
    if not include_failed:
        doomed = doomed.where(wd.c.outcome != Outcome.FAILED.value)
    gone = (
        sa.delete(wd)
        .where(sa.tuple_(wd.c.delivery_id, wd.c.hook_id).in_(doomed))
        .returning(wd.c.received_at)
        .cte("gone")
    )
    return sa.select(sa.func.count(), sa.func.max(gone.c.received_at))


def prune(
    database: Database,
    older_than: timedelta,
    *,
    include_failed: bool = False,
    batch: int = PRUNE_BATCH,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete journal entries received before now - older_than, in short batches; failed ones stay unless asked.

    Each batch is its own transaction, so a journal of millions of rows prunes under
    the statement timeout, and an interrupted prune resumes where it stopped.
    `progress` is told the running total after each batch. Raises
    DatabaseUnavailable, whose reason is the SQLSTATE (57014: the statement
    timeout cut a batch).

    Sorts are switched off for each batch's transaction: planned without
    statistics (a table loaded or bucketed since its last ANALYZE, as migration
    0004 left old rows all in bucket 0), PostgreSQL takes a bucket of a million rows
    for a few hundred and prefers to collect and sort them all, which no statement
    timeout survives. With sorts off, reading the index in its own order is the plan.
    """
    (cutoff,) = database.read(sa.select(sa.func.now() - older_than))[0]
    removed = 0
    for bucket in range(JOURNAL_BUCKETS):
        after = BEGINNING
        while True:
            bound = {"bucket": bucket, "after": after, "cutoff": cutoff, "batch": batch}
            row = database.run([Statement(_index_order_only, {}), Statement(_prune_batch, bound, (include_failed,))])
            done, last = row if row is not None else (0, None)
            removed += done
            if done and progress is not None:
                progress(removed)
            if done < batch:
                break
            after = last
    return removed
