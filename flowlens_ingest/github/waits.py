"""GitHub's rate-limit waits shared through the database: every process using a credential honours one wall.

serve's files worker and an operator's `recover` or `backfill`, on one VM or several, use the same
credentials: a wait GitHub asked of one process binds all of them. `DatabaseWaits` is the
`SharedWaits` the client is given (budget.py): a read by primary key as each request takes its
turn, and one before a token is minted for it (milliseconds beside a request to GitHub), one
upsert when GitHub says wait.

A wait is stored as a time on the database's clock (`now()` plus the seconds GitHub asked for) and
read back as the seconds left by that clock: two hosts whose clocks disagree still end it together,
as the leases (lease.py) are timed on that one clock too.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from flowlens_ingest.github.errors import NotSent, WaitReason, wait_reason
from flowlens_ingest.ingest import describe
from flowlens_ingest.store.database import Database, DatabaseUnavailable
from flowlens_ingest.store.expressions import seconds_from_now
from flowlens_ingest.store.schema import github_waits

log = logging.getLogger(__name__)


class DatabaseWaits:
    """The `github_waits` table as a `SharedWaits`.

    A database that cannot be read sends nothing (NotSent): another process may have been told
    to wait, and a request made without knowing is one GitHub may count against the integration.
    A wait that cannot be written is still honoured here (Budgets keeps it).
    """

    def __init__(self, database: Database) -> None:
        self.database = database
        self._unavailable = False

    def wait_of(self, key: str) -> tuple[float, WaitReason] | None:
        """Seconds left of the wait any process recorded for this credential, and why; None if none is left.

        Raises NotSent when the database cannot say: the caller then sends nothing.
        """
        t = github_waits
        left = sa.extract("epoch", t.c.wait_until - sa.func.now())
        query = sa.select(left, t.c.reason).where(t.c.credential == key, t.c.wait_until > sa.func.now())
        try:
            row = self.database.first(query)
        except (DatabaseUnavailable, sa.exc.SQLAlchemyError) as exc:
            # Any failure, not only an outage (a read-only standby after a failover, a revoked grant).
            self._say_unavailable(exc)
            raise NotSent(
                f"GitHub's shared rate-limit waits unreadable ({describe(exc)}): not sent", credential=key
            ) from exc
        self._unavailable = False
        if row is None:
            return None
        return float(row[0]), wait_reason(row.reason)

    def record(self, key: str, seconds: float, reason: WaitReason) -> bool:
        """Record a wait of `seconds` from the database's now (a later one already stored is kept); False when the database is unavailable."""
        t = github_waits
        until = seconds_from_now(seconds)
        stmt = insert(t).values(credential=key, wait_until=until, reason=reason)
        upsert = stmt.on_conflict_do_update(
            index_elements=[t.c.credential],
            set_={"wait_until": stmt.excluded.wait_until, "reason": stmt.excluded.reason, "updated_at": sa.func.now()},
            where=t.c.wait_until < stmt.excluded.wait_until,
        )
        try:
            self.database.execute(upsert)
        except (DatabaseUnavailable, sa.exc.SQLAlchemyError) as exc:
            # This process still honours the wait, and shares it again before its next request (Budgets).
            self._say_unavailable(exc)
            return False
        return True

    def _say_unavailable(self, exc: Exception) -> None:
        if not self._unavailable:
            log.warning(
                "GitHub rate-limit waits not shared: the database did not answer or refused;"
                " no request to GitHub until it answers",
                extra={"reason": describe(exc)},
            )
        self._unavailable = True
