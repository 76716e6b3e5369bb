"""A verified delivery, built once from what came over HTTP and used by everything after.

The view, the spool drainer and replay all construct it with `Delivery.from_http`
from the headers and the raw body, so each parses a delivery exactly the same way.
Pure: no Flask, no database.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flowlens_ingest.events import parse


@dataclass(frozen=True)
class Delivery:
    """A signed delivery: its headers, its exact bytes, and the object they parse to."""

    delivery_id: str
    hook_id: int
    event: str
    # The parsed body, with text PostgreSQL cannot store already replaced (parse.py).
    payload: dict[str, Any]
    payload_sha256: str
    # The exact bytes the signature covered, and their content type: what the journal keeps.
    body: bytes
    content_type: str
    # When it first arrived, if not now (a spooled delivery drained later).
    received_at: datetime | None = None

    @classmethod
    def from_http(
        cls,
        *,
        delivery_id: str,
        hook_id: int,
        event: str,
        content_type: str | None,
        body: bytes,
        payload_sha256: str | None = None,
        received_at: datetime | None = None,
    ) -> Delivery:
        """Parse a delivery's raw body by its content type.

        Raises parse.UnsupportedMediaType or parse.BadPayload. `payload_sha256`
        defaults to the body's digest.
        """
        return cls(
            delivery_id=delivery_id,
            hook_id=hook_id,
            event=event,
            payload=parse.loads(parse.json_text(content_type, body)),
            payload_sha256=payload_sha256 or hashlib.sha256(body).hexdigest(),
            body=body,
            content_type=content_type or "",
            received_at=received_at,
        )

    @property
    def action(self) -> str | None:
        """The payload's `action`, where the event has one."""
        action = self.payload.get("action")
        return action if isinstance(action, str) else None

    @property
    def repository_github_id(self) -> int | None:
        """The repository id the payload names, if any (kept even when mapping fails)."""
        repo = self.payload.get("repository")
        rid = repo.get("id") if isinstance(repo, dict) else None
        if isinstance(rid, int) and not isinstance(rid, bool) and -(2**63) <= rid < 2**63:
            return rid
        return None
