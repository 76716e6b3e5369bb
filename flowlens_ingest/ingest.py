"""One verified delivery, from parsed payload to a durable outcome.

map (pure) -> apply + journal in one transaction -> outcome. A mapping or data
error is journaled as `failed` in a transaction of its own, so the delivery can
be replayed after a fix; a database outage raises DatabaseUnavailable, which the
caller answers by spooling.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Callable

from sqlalchemy.engine import Connection, Engine

from .db import DatabaseUnavailable, transaction
from .mappers import map_delivery
from .parse import json_text, loads
from .spool import Spooled
from . import store
from .store import DUPLICATE, Delivery, Duplicate

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


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
    engine: Engine,
    delivery: Delivery,
    *,
    store_payload: bool = True,
    on_retry: Callable[[str], None] | None = None,
) -> str:
    """Apply and journal one delivery; return its outcome (applied, ignored, stale, duplicate, failed)."""
    try:
        changes = map_delivery(delivery.event, delivery.payload)
    except Exception as exc:  # any shape we did not foresee: journal it, keep serving
        return record_failure(engine, delivery, describe(exc), on_retry=on_retry)

    def work(conn: Connection) -> str:
        return store.apply_delivery(conn, delivery, changes, store_payload=store_payload)

    try:
        return transaction(engine, work, on_retry=on_retry)
    except Duplicate:
        return DUPLICATE
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        log.warning("delivery %s failed to apply: %s", delivery.delivery_id, describe(exc))
        return record_failure(engine, delivery, describe(exc), on_retry=on_retry)


def record_failure(
    engine: Engine, delivery: Delivery, error: str, *, on_retry: Callable[[str], None] | None = None
) -> str:
    """Journal a delivery that could not be applied, with its payload, for a later replay.

    If even the journal refuses it (a database without our schema, say), raise
    DatabaseUnavailable: the caller spools the delivery rather than lose it.
    """
    try:
        return transaction(engine, lambda conn: store.record_failure(conn, delivery, error), on_retry=on_retry)
    except Duplicate:
        return DUPLICATE
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        log.error("delivery %s cannot be journaled: %s", delivery.delivery_id, describe(exc))
        raise DatabaseUnavailable("journal") from exc


def delivery_from_spool(item: Spooled) -> Delivery:
    """Rebuild a verified delivery from its spooled headers and raw body."""
    text = json_text(item.content_type, item.body)
    return Delivery(
        delivery_id=item.delivery_id,
        hook_id=item.hook_id,
        event=item.event,
        payload=loads(text),
        payload_sha256=hashlib.sha256(item.body).hexdigest(),
        payload_json=text,
    )
