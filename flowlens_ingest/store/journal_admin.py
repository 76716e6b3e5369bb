"""The journal for operators: list it, walk its keys for a replay, read one entry back, prune it in
batches, and the counts `status` shows. Every read goes through the journal's bucketed indexes
(schema.py), so each costs the same on a journal of millions of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from flowlens_ingest.events.enums import Outcome
from flowlens_ingest.events.envelope import Envelope
from flowlens_ingest.store.batch import Statement
from flowlens_ingest.store.database import Database
from flowlens_ingest.store.expressions import param
from flowlens_ingest.store.journal import JOURNAL_BUCKETS
from flowlens_ingest.store.plan import decode_body
from flowlens_ingest.store.schema import webhook_deliveries as wd
from flowlens_ingest.store.schema import webhook_hooks

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


# Keys are read in pages (keyset pagination, one short query each), never all at once.
REPLAY_PAGE = 500


def journal_keys(
    database: Database, *, failed_only: bool, since: datetime | None, until: datetime | None = None
) -> Iterator[tuple[str, int]]:
    """Journal keys (delivery id, hook id) in arrival order, a page at a time, up to `until` if given.

    Entries that fail again during the replay keep their place, behind the cursor,
    so none is taken twice; `until` ends the walk where deliveries arriving meanwhile begin.
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
            if until is not None:
                query = query.where(wd.c.received_at <= until)
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


def journal_entry(database: Database, delivery_id: str, hook_id: int) -> tuple[Envelope, bytes] | None:
    """One delivery as the journal holds it: its envelope (with its hook's target, when recorded) and its
    exact bytes; None when the journal kept no payload."""
    hooks = webhook_hooks
    row = database.first(
        sa.select(
            wd.c.delivery_id,
            wd.c.hook_id,
            wd.c.event,
            wd.c.body,
            wd.c.body_encoding,
            wd.c.content_type,
            wd.c.payload_sha256,
            wd.c.received_at,
            wd.c.body_from_api,
            hooks.c.target_type,
            hooks.c.target_id,
        )
        .select_from(wd.outerjoin(hooks, hooks.c.hook_id == wd.c.hook_id))
        .where(wd.c.delivery_id == delivery_id, wd.c.hook_id == hook_id)
    )
    if row is None or row.body is None:
        return None
    return Envelope.from_journal(row), decode_body(bytes(row.body), row.body_encoding)


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


def outcomes_last_hour(database: Database) -> dict[str, int]:
    """How many deliveries arrived in the last hour, by outcome."""
    # By bucket: the journal's time index leads with it (schema.py), so this is a range
    # read per bucket, not a scan, on a journal of millions of rows.
    recent = database.read(
        sa.select(wd.c.outcome, sa.func.count())
        .where(
            wd.c.bucket.in_(range(JOURNAL_BUCKETS)), wd.c.received_at >= sa.func.now() - sa.text("interval '1 hour'")
        )
        .group_by(wd.c.outcome)
    )
    return {str(outcome): int(n) for outcome, n in recent}


def failed_entries(database: Database) -> tuple[int, datetime | None]:
    """How many journal entries are failed (not replayed since), and when the oldest arrived."""
    # The partial index of failed entries holds only them.
    count, oldest = database.read(
        sa.select(sa.func.count(), sa.func.min(wd.c.received_at)).where(wd.c.outcome == Outcome.FAILED.value)
    )[0]
    return int(count), oldest
