"""The hooks deliveries came from (webhook_hooks): recorded once per process as deliveries name them."""

from __future__ import annotations

import threading
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.store.batch import Statement
from flowlens_ingest.store.database import Database
from flowlens_ingest.store.expressions import param
from flowlens_ingest.store.schema import webhook_hooks


def hook_seen() -> sa.Executable:
    """Record a hook unless it is known: DO NOTHING, so a known hook's row is neither written nor locked."""
    t = webhook_hooks
    return (
        insert(t)
        .values(
            hook_id=param("hook_id"),
            target_type=param("target_type"),
            target_id=param("target_id"),
            api_path=param("api_path"),
        )
        .on_conflict_do_nothing(index_elements=[t.c.hook_id])
    )


# Hooks remembered per process. A real installation has a handful; the hook headers are not covered
# by the signature, so a signed body replayed with invented ones must not grow a worker without end:
# past this the memory is cleared, and each hook costs its statement (DO NOTHING) once more.
MAX_REMEMBERED = 10_000


class RecordedHooks:
    """The hooks this process has recorded: each costs one statement in one delivery's batch, once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: set[tuple[int, str]] = set()

    def statement(self, delivery: Delivery) -> Statement | None:
        """The statement recording the delivery's hook, or None when it names none or this process recorded it."""
        path = delivery.hook_path
        if path is None or delivery.hook_target is None:
            return None
        with self._lock:
            if (delivery.hook_id, path) in self._known:
                return None
        target = delivery.hook_target
        return Statement(
            hook_seen,
            {"hook_id": delivery.hook_id, "target_type": target.type, "target_id": target.id, "api_path": path},
        )

    def recorded(self, delivery: Delivery) -> None:
        """The delivery's batch committed: its hook is in the table."""
        path = delivery.hook_path
        if path is not None:
            with self._lock:
                if len(self._known) >= MAX_REMEMBERED:
                    self._known.clear()
                self._known.add((delivery.hook_id, path))


# `status` shows at most this many hooks: the table grows from headers the signature does not cover.
MAX_SHOWN = 1_000


def checked_through(database: Database) -> list[tuple[str, datetime | None]]:
    """Each recorded hook's API path and how far back recovery has checked its delivery log (None: never).

    The hooks recovery has read first, at most MAX_SHOWN in all.
    """
    t = webhook_hooks
    rows = database.read(
        sa.select(t.c.api_path, t.c.checked_through)
        .order_by(t.c.checked_through.is_(None), t.c.api_path)
        .limit(MAX_SHOWN)
    )
    return [(str(path), checked) for path, checked in rows]
