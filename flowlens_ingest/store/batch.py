"""What a caller hands `Database.run`: a batch of Core statements, each with its values. Plain data.

A statement is named by the function that builds it (and that function's
arguments, when it has variants), not by its SQL: wire.py turns each into SQL
once per process and binds the values at send time. The values are keyed by the
names given to `expressions.param`, without the `p_` prefix.
"""

from __future__ import annotations

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
