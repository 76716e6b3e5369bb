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
from flowlens_ingest.events.hooks import HookTarget, api_path


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
    # What the hook is installed on (X-GitHub-Hook-Installation-Target-Type/-ID), when sent.
    hook_target: HookTarget | None = None
    # The body is GitHub's API JSON of the delivery (`recover --fetch`), not bytes it signed.
    body_from_api: bool = False
    # Why the body was not parsed (payload then empty): more elements than any GitHub payload
    # holds (parse.TooManyElements). ingest journals such a delivery as failed, bytes kept.
    unparsed: str | None = None

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
        hook_target: HookTarget | None = None,
        body_from_api: bool = False,
    ) -> Delivery:
        """Parse a delivery's raw body by its content type.

        Raises parse.UnsupportedMediaType or parse.BadPayload. `payload_sha256`
        defaults to the body's digest. A body with too many elements to parse is
        no error here: its delivery has an empty payload and says why (`unparsed`).
        """
        unparsed = None
        try:
            payload = parse.loads(parse.json_text(content_type, body))
        except parse.TooManyElements as exc:
            payload, unparsed = {}, str(exc)
        return cls(
            delivery_id=delivery_id,
            hook_id=hook_id,
            event=event,
            payload=payload,
            payload_sha256=payload_sha256 or hashlib.sha256(body).hexdigest(),
            body=body,
            content_type=content_type or "",
            received_at=received_at,
            hook_target=hook_target,
            body_from_api=body_from_api,
            unparsed=unparsed,
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

    @property
    def hook_path(self) -> str | None:
        """The API path of the hook this came from (its delivery log), when the headers and payload say."""
        if self.hook_target is None:
            return None
        return api_path(self.hook_id, self.hook_target, self.payload)
