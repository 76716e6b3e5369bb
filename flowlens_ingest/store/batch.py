"""What a caller hands `Database.run`: a batch of Core statements, each with its values. Plain data.

A statement is named by the function that builds it (and that function's
arguments, when it has variants), not by its SQL: wire.py turns each into SQL
once per process and binds the values at send time. The values are keyed by the
names given to `expressions.param`, without the `p_` prefix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of a batch: `builder(*args)` with these values for its parameters."""

    builder: Callable[..., sa.Executable]
    values: Mapping[str, Any]
    args: tuple[Any, ...] = ()


# The statements of one transaction, in order; the last one's first row decides COMMIT.
Batch = Sequence[Statement]

_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def row_values(row: Any, **extra: Any) -> dict[str, Any]:
    """A row dataclass's fields (and `extra`) as a statement's values."""
    names = _FIELD_NAMES.get(type(row))
    if names is None:
        # dataclasses.fields() rebuilds its tuple on every call: once per row type is enough.
        names = _FIELD_NAMES[type(row)] = tuple(f.name for f in dataclasses.fields(row))
    # Shallow on purpose: dataclasses.asdict deep-copies every label and file list.
    values = {name: getattr(row, name) for name in names}
    if extra:
        values.update(extra)
    return values
