"""Shared pieces of the service's Core statements: parameters, the repository lookup, the flags.

Every statement takes its values as named bind parameters (`p_<column>`), so
wire.py compiles it once per process and binds each delivery's values (batch.Statement.values,
keyed by the name without its prefix).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from flowlens_ingest.store.schema import repositories

Builder = Callable[[], sa.Executable]
StaleTest = Callable[[], sa.ColumnElement[bool]]


# Older than any GitHub timestamp: what a missing one compares as.
NEVER = sa.literal(datetime.min.replace(tzinfo=UTC).isoformat()).cast(sa.TIMESTAMP(timezone=True))


# Below any digest: what a row stored before digests existed compares as.
NO_DIGEST = sa.literal(-(2**63), sa.BigInteger)


def ranked(value: Any, ranks: Mapping[Any, int]) -> sa.Case[Any]:
    """A lifecycle rank of a status column or parameter, in SQL (rules.py's tables)."""
    return sa.case(*((value == name, rank) for name, rank in ranks.items()), else_=-1)


def order_key(updated_at: Any, *ranks: Any, digest: Any) -> sa.Tuple:
    """The total order snapshots merge by: GitHub's time, then lifecycle ranks, then the content digest.

    Timestamps tie (GitHub's are to the second), so the winner of two snapshots is
    decided by the ranks and finally by the digest of their content: never by which
    arrived last. Re-applying the stored snapshot compares equal and changes nothing.
    """
    return sa.tuple_(sa.func.coalesce(updated_at, NEVER), *ranks, sa.func.coalesce(digest, NO_DIGEST))


def param(name: str) -> sa.BindParameter[Any]:
    """The bind parameter `p_<name>`."""
    # Prefixed: insert() reserves bare column names for its own VALUES parameters.
    return sa.bindparam(f"p_{name}")


def repo_id() -> sa.ScalarSelect[Any]:
    """The id of the delivery's repository (upserted by the batch's first statement)."""
    return sa.select(repositories.c.id).where(repositories.c.github_id == param("repo_github_id")).scalar_subquery()


def flag_changed(table: sa.Table) -> dict[str, Any]:
    """The processing contract's SET clause for an UPDATE of a polled table."""
    return {"processed": sa.false(), "version": table.c.version + 1, "updated_at": sa.func.now()}


def differs(table: sa.Table, new: dict[str, Any]) -> sa.ColumnElement[bool]:
    """Any of `new` differs from the stored row (NULL-safe)."""
    return sa.or_(*(table.c[c].is_distinct_from(v) for c, v in new.items()))


def fields(row_type: type, *, without: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A row dataclass's field names (its columns), less `without`."""
    return tuple(f.name for f in dataclasses.fields(row_type) if f.name not in without)


def seconds_from_now(seconds: float) -> sa.ColumnElement[Any]:
    """The database's now() plus `seconds` (none below zero): a time every process reads on one clock."""
    return sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, sa.literal(max(seconds, 0.0), sa.Float))
