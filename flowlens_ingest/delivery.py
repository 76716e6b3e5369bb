"""A verified delivery, built once from what came over HTTP and used by everything after.

The view, the spool drainer and replay all construct it with `Delivery.from_http`
from the headers and the raw body, so each parses a delivery exactly the same way.
Pure: no Flask, no database.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from . import parse


@dataclass(frozen=True)
class Delivery:
    """A signed delivery: its headers, its parsed body and that body's JSON text."""

    delivery_id: str
    hook_id: int
    event: str
    payload: dict[str, Any]
    payload_sha256: str
    # The JSON text as received (the `payload` field of a form body): the journal
    # stores it as is, instead of serializing the parsed payload again.
    payload_json: str | None = None

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
    ) -> Delivery:
        """Parse a delivery's raw body by its content type.

        Raises parse.UnsupportedMediaType or parse.BadPayload. `payload_sha256`
        defaults to the body's digest; replay passes the one first journaled.
        """
        text = parse.json_text(content_type, body)
        return cls(
            delivery_id=delivery_id,
            hook_id=hook_id,
            event=event,
            payload=parse.loads(text),
            payload_sha256=payload_sha256 or hashlib.sha256(body).hexdigest(),
            payload_json=text,
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
