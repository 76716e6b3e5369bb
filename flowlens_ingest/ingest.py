"""One verified delivery, from parsed payload to what became of it: the only orchestration.

map (pure) -> plan -> one transaction (apply + journal) -> a Result. A mapping or
data error is journaled as `failed` in a transaction of its own, so the delivery
can be replayed after a fix. The view, the spool drainer and replay all call
`ingest` and act on its disposition: done (stored with an outcome), retry later
(the database is down or too slow: keep the delivery), or set aside (the database
works but will not keep this one, not even as failed).
"""

from __future__ import annotations

import enum
import logging
import traceback
from dataclasses import dataclass

import sqlalchemy as sa

from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.events.enums import Outcome
from flowlens_ingest.events.mappers import map_delivery
from flowlens_ingest.store.database import Database, DatabaseUnavailable, OnRetry
from flowlens_ingest.store.hooks import RecordedHooks
from flowlens_ingest.store.plan import Plan, failed_journal_entry
from flowlens_ingest.store.schema import webhook_deliveries

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000
# The hooks this process has recorded in webhook_hooks (what `recover` reads the logs of).
HOOKS = RecordedHooks()


class Disposition(enum.Enum):
    """What the caller does with a delivery once `ingest` returns."""

    # Stored: applied, ignored, stale, duplicate, or journaled as failed (Result.outcome says which).
    DONE = "done"
    # The database is unreachable, too slow or not migrated: keep the delivery and try again.
    RETRY_LATER = "retry_later"
    # The database works but refuses even a failure record of this delivery: keep it apart.
    SET_ASIDE = "set_aside"


@dataclass(frozen=True)
class Result:
    """What became of one delivery: its disposition, its stored outcome, and why it failed if it did."""

    disposition: Disposition
    outcome: Outcome | None = None
    error: str | None = None
    # Retry later, but maybe this delivery's trouble alone, not the database's: the server cancelled its
    # work (a timeout, out of memory: it answers), or our code failed on it (a bug). The spool's drain
    # passes over it and goes on with the deliveries behind it.
    may_pass_over: bool = False
    # Cancelled at its statement or lock timeout (57014, 55P03): a row it needed held by another
    # session (the statement timeout, counted from the statement's start, usually comes first), or
    # the server too slow for it.
    timed_out: bool = False

    @classmethod
    def stored(cls, outcome: Outcome, error: str | None = None) -> Result:
        """A delivery the journal holds, with this outcome."""
        return cls(Disposition.DONE, outcome, error)

    @classmethod
    def unavailable(cls, exc: DatabaseUnavailable) -> Result:
        """A delivery to keep for later: the database was down, too slow, or cancelled this work."""
        return cls(
            Disposition.RETRY_LATER,
            error=f"database unavailable ({exc})",
            may_pass_over=exc.work_cancelled,
            timed_out=exc.timed_out,
        )


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
    """Apply and journal one delivery; say what became of it.

    `replay` re-applies a journaled delivery: a failed entry takes the new outcome,
    any other keeps its first one, and nothing is a duplicate.
    """
    if database.hung:
        # Known hung: no wait and no connection for this one, not even mapping it. The caller
        # keeps it (the spool) until the probe finds the database answering again.
        return Result(Disposition.RETRY_LATER, error="database unavailable (hung)")
    if delivery.unparsed is not None:
        # Signed, so kept (its exact bytes, replayable), but never parsed: see parse.MAX_ELEMENTS.
        return record_failure(database, delivery, delivery.unparsed, compress=compress, on_retry=on_retry)
    try:
        plan = Plan(map_delivery(delivery.event, delivery.payload))
    except Exception as exc:  # any shape we did not foresee: journal it, keep serving
        return record_failure(database, delivery, describe(exc), compress=compress, on_retry=on_retry)
    journal = plan.journal(delivery, store_payload=store_payload, replay=replay, compress=compress)
    hook = HOOKS.statement(delivery)
    try:
        # One round trip: a duplicate's batch, refused by its journal entry, is committed as it
        # is: its upserts compare equal or older than what is stored and change nothing
        # (store/statements.py).
        row = database.run(
            [*plan.statements, *([hook] if hook else []), journal], on_retry=on_retry, rollback_refused=False
        )
    except DatabaseUnavailable as exc:
        return Result.unavailable(exc)
    except sa.exc.SQLAlchemyError as exc:  # the database refused this delivery's rows
        result = record_failure(database, delivery, describe(exc), compress=compress, on_retry=on_retry)
        # Said of a delivery the journal now holds as failed. When the journal cannot take it
        # either (not migrated, gone), the fault is the database's: said once at start by
        # gunicorn's master, not once per delivery.
        if result.outcome is Outcome.FAILED:
            log.warning("delivery %s failed to apply: %s", delivery.delivery_id, result.error)
        return result
    except Exception as exc:  # a bug of ours, not the delivery's failure
        return bug(delivery, exc)
    if row is not None and hook is not None:
        HOOKS.recorded(delivery)
    return Result.stored(Outcome.DUPLICATE if row is None else Outcome(row[0]))


def record_failure(
    database: Database, delivery: Delivery, error: str, *, compress: bool = False, on_retry: OnRetry | None = None
) -> Result:
    """Journal a delivery that could not be applied, with its payload, for a later replay.

    An entry already settled keeps its outcome (the answer is then `duplicate`). When
    even the journal refuses the delivery, the journal table is asked whether it
    answers at all: if not (unreachable, unmigrated), the fault is the database's and
    the delivery is retried later; if it does, the delivery is set aside.
    """
    try:
        # One statement: refused, it wrote nothing, so there is nothing to roll back.
        row = database.run(
            [failed_journal_entry(delivery, error, compress=compress)], on_retry=on_retry, rollback_refused=False
        )
    except DatabaseUnavailable as exc:
        return Result.unavailable(exc)
    except sa.exc.SQLAlchemyError as exc:  # the database refused even the failure record
        refusal = describe(exc)
        if journal_works(database):
            log.error("delivery %s cannot be journaled: %s", delivery.delivery_id, refusal)  # noqa: TRY400 (no payload in the log)
            return Result(Disposition.SET_ASIDE, error=refusal)
        return Result(Disposition.RETRY_LATER, error=refusal)
    except Exception as exc:  # a bug of ours, not the delivery's failure
        return bug(delivery, exc)
    return Result.stored(Outcome.DUPLICATE if row is None else Outcome.FAILED, error)


def journal_works(database: Database) -> bool:
    """The journal table exists and this role may write it: a refusal is then the delivery's fault, not the database's.

    Asked, not tried: a journal that is not there (not migrated) is an answer, not an error in the server's log.
    """
    journal = sa.func.to_regclass(sa.literal(webhook_deliveries.name, sa.Text))
    writable = sa.func.coalesce(sa.func.has_table_privilege(journal, sa.literal("INSERT", sa.Text)), sa.false())
    try:
        rows = database.read(sa.select(writable))
    except (sa.exc.SQLAlchemyError, DatabaseUnavailable):  # unreachable
        return False
    return bool(rows and rows[0][0])


# The bugs said so far by this process, by where they were raised: said once each, not per delivery.
_BUGS_SAID: set[tuple[str, str]] = set()


def bug(delivery: Delivery, exc: BaseException) -> Result:
    """A bug in our own code while storing a delivery: logged as a bug, the delivery kept for a retry.

    Never journaled as the delivery's failure, and never set aside: the delivery is fine, our
    code is not, and once it is fixed the spool applies it. The line names the exception's type
    and where it was raised, not its message (it may hold a payload value), once per process.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "unknown"
    key = (type(exc).__name__, where)
    if key not in _BUGS_SAID:
        _BUGS_SAID.add(key)
        log.error(
            "bug: %s raised at %s while storing delivery %s; it is kept and retried, not journaled as failed",
            type(exc).__name__,
            where,
            delivery.delivery_id,
        )
    return Result(Disposition.RETRY_LATER, error=f"internal error ({type(exc).__name__}, logged)", may_pass_over=True)
