"""One verified delivery, from parsed payload to a durable outcome: the only orchestration.

map (pure) -> plan -> one transaction (apply + journal) -> outcome. A mapping or
data error is journaled as `failed` in a transaction of its own, so the delivery
can be replayed after a fix; a database outage raises DatabaseUnavailable, which
the caller answers by spooling. Used by the view, the spool drainer and replay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import sqlalchemy as sa

from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.events.enums import Outcome
from flowlens_ingest.events.mappers import map_delivery
from flowlens_ingest.store.database import Database, DatabaseUnavailable, OnRetry
from flowlens_ingest.store.plan import FAILURE, Plan
from flowlens_ingest.store.schema import webhook_deliveries

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


class JournalRefused(DatabaseUnavailable):
    """The database answered, but would not journal this delivery even as failed."""


@dataclass(frozen=True)
class Result:
    """A delivery's outcome, and why it failed to apply if it did."""

    outcome: Outcome
    error: str | None = None


def describe(exc: BaseException) -> str:
    """A journal-safe one-line description of an error (no SQL, no parameters, no row data)."""
    orig = getattr(exc, "orig", None)
    if orig is None:
        text = f"{type(exc).__name__}: {exc}"
    else:
        # PostgreSQL's DETAIL repeats the failing row, i.e. payload content: keep only
        # the primary message and the SQLSTATE.
        diag = getattr(orig, "diag", None)
        message = getattr(diag, "message_primary", None) or str(orig).split("\n", 1)[0]
        code = getattr(orig, "pgcode", None)
        text = f"{type(exc).__name__}{f' {code}' if code else ''}: {message}"
    return " ".join(text.split())[:MAX_ERROR_CHARS]


def ingest(
    database: Database,
    delivery: Delivery,
    *,
    store_payload: bool = True,
    compress: bool = False,
    replay: bool = False,
    on_retry: OnRetry | None = None,
) -> Result:
    """Apply and journal one delivery; return its outcome (applied, ignored, stale, duplicate, failed).

    `replay` re-applies a journaled delivery: a failed entry takes the new outcome,
    any other keeps its first one, and nothing is a duplicate.
    """
    try:
        plan = Plan(map_delivery(delivery.event, delivery.payload))
    except Exception as exc:  # any shape we did not foresee: journal it, keep serving
        return record_failure(database, delivery, describe(exc), compress=compress, on_retry=on_retry)
    journal = plan.journal(delivery, store_payload=store_payload, replay=replay, compress=compress)
    batch = [*plan.statements, journal]
    try:
        row = database.run(batch, on_retry=on_retry)
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        log.warning("delivery %s failed to apply: %s", delivery.delivery_id, describe(exc))
        return record_failure(database, delivery, describe(exc), compress=compress, on_retry=on_retry)
    return Result(Outcome.DUPLICATE if row is None else Outcome(row[0]))


def record_failure(
    database: Database, delivery: Delivery, error: str, *, compress: bool = False, on_retry: OnRetry | None = None
) -> Result:
    """Journal a delivery that could not be applied, with its payload, for a later replay.

    An entry already settled keeps its outcome (the answer is then `duplicate`). If
    even the journal refuses the delivery (a database without our schema, say),
    raise JournalRefused, a DatabaseUnavailable: the view spools the delivery rather
    than lose it, and the drainer asks `journal_works` whether the fault is the
    database's or this delivery's.
    """
    try:
        row = database.run([FAILURE.journal(delivery, error=error, compress=compress)], on_retry=on_retry)
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        log.error("delivery %s cannot be journaled: %s", delivery.delivery_id, describe(exc))  # noqa: TRY400 (no payload in the log)
        raise JournalRefused(describe(exc)) from exc
    return Result(Outcome.DUPLICATE if row is None else Outcome.FAILED, error)


def journal_works(database: Database) -> bool:
    """The journal table answers a query: a refusal is then the delivery's fault, not the database's."""
    try:
        database.read(sa.select(webhook_deliveries.c.delivery_id).limit(0))
    except Exception:  # unreachable, unmigrated, no permission: not this delivery's fault
        return False
    return True
