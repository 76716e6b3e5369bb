"""One verified delivery, from parsed payload to a durable outcome: the only orchestration.

map (pure) -> plan -> one transaction (apply + journal) -> outcome. A mapping or
data error is journaled as `failed` in a transaction of its own, so the delivery
can be replayed after a fix; a database outage raises DatabaseUnavailable, which
the caller answers by spooling. Used by the view, the spool drainer and replay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .database import Database, DatabaseUnavailable, OnRetry
from .delivery import Delivery
from .mappers import map_delivery
from .plan import FAILURE, Plan
from .values import Outcome

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


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
        return record_failure(database, delivery, describe(exc), on_retry=on_retry)
    batch = [*plan.statements, plan.journal(delivery, store_payload=store_payload, replay=replay)]
    try:
        row = database.run(batch, on_retry=on_retry)
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        log.warning("delivery %s failed to apply: %s", delivery.delivery_id, describe(exc))
        return record_failure(database, delivery, describe(exc), on_retry=on_retry)
    return Result(Outcome.DUPLICATE if row is None else Outcome(row[0]))


def record_failure(database: Database, delivery: Delivery, error: str, *, on_retry: OnRetry | None = None) -> Result:
    """Journal a delivery that could not be applied, with its payload, for a later replay.

    An entry already settled keeps its outcome (the answer is then `duplicate`). If
    even the journal refuses the delivery (a database without our schema, say),
    raise DatabaseUnavailable: the caller spools the delivery rather than lose it.
    """
    try:
        row = database.run([FAILURE.journal(delivery, error=error)], on_retry=on_retry)
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        log.error("delivery %s cannot be journaled: %s", delivery.delivery_id, describe(exc))  # noqa: TRY400 (no payload in the log)
        raise DatabaseUnavailable("journal") from exc
    return Result(Outcome.DUPLICATE if row is None else Outcome.FAILED, error)
