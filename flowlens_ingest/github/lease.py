"""One recoverer at a time across every VM: the `recover` lease, taken by the scheduled pass and the command alike.

A lease is a row of `leases`: its holder (a uuid per process), until when it holds, who that is
(`host pid N (what)`) and since when. Taking it is one upsert that succeeds only when the row is free
(lapsed) or already ours; a holder renews it while it works and releases it when done, so a second
recoverer (another worker's pass, an operator's `recover` on any VM) never redelivers the same GUIDs.
The database clock decides lapses, so VMs whose clocks disagree still agree on who holds it.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from flowlens_ingest.store.database import Database
from flowlens_ingest.store.expressions import seconds_from_now
from flowlens_ingest.store.schema import leases

RECOVER = "recover"


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, since when, and until when it holds unless renewed."""

    name: str
    taken_at: datetime | None
    leased_until: datetime

    def describe(self) -> str:
        """`host pid 12 (recover pass) since 2026-12-06 01:02:03 UTC, held until …`."""
        since = f" since {self.taken_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC" if self.taken_at else ""
        return f"{self.name}{since}, held until {self.leased_until.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"


class Lease:
    """A named lease held for `seconds` at a time: take, renew while working (every third of it), release."""

    def __init__(self, database: Database, what: str, seconds: float, *, name: str = RECOVER) -> None:
        if seconds <= 0:
            raise ValueError("a lease lasts a positive number of seconds")
        self.database = database
        self.name = name
        self.seconds = seconds
        self.holder = uuid.uuid4()
        self.holder_name = f"{socket.gethostname()} pid {os.getpid()} ({what})"
        self._renewed_at = -1e18

    def take(self, seconds: float | None = None) -> bool:
        """Hold the lease for `seconds` (default: its length) unless another holder's has not lapsed; whether we hold it."""
        t = leases
        until = seconds_from_now(seconds or self.seconds)
        stmt = insert(t).values(
            name=self.name, holder=self.holder, leased_until=until, holder_name=self.holder_name, taken_at=sa.func.now()
        )
        upsert = stmt.on_conflict_do_update(
            index_elements=[t.c.name],
            set_={
                "holder": stmt.excluded.holder,
                "leased_until": stmt.excluded.leased_until,
                "holder_name": stmt.excluded.holder_name,
                # Since when this holder has held it: kept while it renews.
                "taken_at": sa.case((t.c.holder == self.holder, t.c.taken_at), else_=stmt.excluded.taken_at),
            },
            where=sa.or_(t.c.leased_until < sa.func.now(), t.c.holder == self.holder),
        ).returning(t.c.holder)
        held = self.database.first(upsert) is not None
        if held:
            self._renewed_at = time.monotonic()
        return held

    def keep(self) -> bool:
        """Renew the lease when a third of it has passed since the last renewal; False once it is lost to another holder."""
        if time.monotonic() - self._renewed_at < self.seconds / 3:
            return True
        return self.take()

    def release(self) -> None:
        """Let the lease go now (only ours: a lease another holder took after ours lapsed is left alone)."""
        t = leases
        self.database.execute(
            sa.update(t).where(t.c.name == self.name, t.c.holder == self.holder).values(leased_until=sa.func.now())
        )

    def holder_now(self) -> Holder | None:
        """Who holds the lease now (not lapsed), or None when it is free."""
        t = leases
        row = self.database.first(
            sa.select(t.c.holder_name, t.c.taken_at, t.c.leased_until).where(
                t.c.name == self.name, t.c.leased_until >= sa.func.now()
            )
        )
        if row is None:
            return None
        return Holder(row.holder_name or "another process (an older release)", row.taken_at, row.leased_until)
