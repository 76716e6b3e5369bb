"""The journal statement, last in every delivery's batch: its RETURNING is the outcome."""

from __future__ import annotations

import zlib
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from flowlens_ingest.events.enums import Outcome
from flowlens_ingest.store.expressions import StaleTest, param
from flowlens_ingest.store.schema import webhook_deliveries

# The journal's time index is led by one of this many buckets (schema.py): enough to
# spread its writes over the tablets of a multi-node YugabyteDB, few enough to read
# bucket by bucket.
JOURNAL_BUCKETS = 16


def bucket_of(delivery_id: str) -> int:
    """The journal bucket of a delivery: a stable hash of its id."""
    return zlib.crc32(delivery_id.encode()) % JOURNAL_BUCKETS


_JOURNAL_COLUMNS = (
    "delivery_id",
    "hook_id",
    "event",
    "action",
    "repository_github_id",
    "payload_sha256",
    "error",
    "body",
    "body_encoding",
    "content_type",
    "bucket",
    "body_from_api",
)


def journal(stale: StaleTest | None, replay: bool) -> sa.Executable:
    """Journal a delivery: `stale` decides stale vs applied; without it `p_outcome` does.

    Only a failed entry may be taken again: for a redelivery of a settled one the
    upsert's WHERE holds no row, RETURNING gives none, and the delivery reads as a
    duplicate (no error: the server would log the batch's text, payload values
    included). A replay re-applies anything.
    """
    t = webhook_deliveries
    outcome: Any = (
        param("outcome") if stale is None else sa.case((stale(), Outcome.STALE.value), else_=Outcome.APPLIED.value)
    )
    stmt = insert(t).values(
        **{c: param(c) for c in _JOURNAL_COLUMNS},
        # A spooled delivery keeps the time it first arrived.
        received_at=sa.func.coalesce(sa.cast(param("received_at"), sa.TIMESTAMP(timezone=True)), sa.func.now()),
        outcome=outcome,
        applied_at=sa.case((param("applied"), sa.func.now()), else_=sa.null()),
    )
    ex = stmt.excluded
    outcome_set: dict[str, Any] = {"outcome": ex.outcome, "applied_at": ex.applied_at}
    if replay:
        # A replay settles a failed entry but keeps any other's first final outcome: a
        # delivery applied back then reads `stale` today only because later ones followed.
        settled = t.c.outcome != Outcome.FAILED.value
        outcome_set = {c: sa.case((settled, t.c[c]), else_=v) for c, v in outcome_set.items()}
    return stmt.on_conflict_do_update(
        index_elements=[t.c.delivery_id, t.c.hook_id],
        set_={
            **outcome_set,
            "error": ex.error,
            # A body once kept stays (a replay sends none back).
            **{
                c: sa.case((ex.body.is_(None), t.c[c]), else_=ex[c])
                for c in ("body", "body_encoding", "content_type", "body_from_api")
            },
            "payload_sha256": ex.payload_sha256,
            "attempts": t.c.attempts + 1,
        },
        where=None if replay else t.c.outcome == Outcome.FAILED.value,
    ).returning(t.c.outcome)
