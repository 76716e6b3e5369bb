"""Shared pieces of the service's Core statements: parameters, the repository lookup, the flags.

Every statement takes its values as named bind parameters (`p_<column>`), so
batch.py compiles it once per process and binds each delivery's values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from .schema import repositories

Builder = Callable[[], sa.Executable]
StaleTest = Callable[[], sa.ColumnElement[bool]]


# Older than any GitHub timestamp: what a missing one compares as.
NEVER = sa.literal(datetime.min.replace(tzinfo=UTC).isoformat()).cast(sa.TIMESTAMP(timezone=True))


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
