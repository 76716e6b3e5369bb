"""A verified delivery: its envelope (envelope.py), its exact bytes, and the object they parse to.

Every path (the view, the spool drainer, replay, `recover --fetch`, backfill) makes an
`Envelope` from what it holds and calls `Delivery.parse(envelope, body)`: one parse, the
same for all. Pure: no Flask, no database.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flowlens_ingest.events import parse
from flowlens_ingest.events.envelope import Envelope
from flowlens_ingest.events.hooks import HookTarget, api_path


@dataclass(frozen=True)
class Delivery:
    """A signed delivery: its envelope, its exact bytes, and the object they parse to."""

    envelope: Envelope
    # The parsed body, with text PostgreSQL cannot store already replaced (parse.py).
    payload: dict[str, Any]
    payload_sha256: str
    # The exact bytes the signature covered: what the journal keeps.
    body: bytes
    # Why the body was not parsed (payload then empty): more elements than any GitHub payload
    # holds (parse.TooManyElements). ingest journals such a delivery as failed, bytes kept.
    unparsed: str | None = None

    @classmethod
    def parse(cls, envelope: Envelope, body: bytes) -> Delivery:
        """Parse a delivery's raw body by its envelope's content type.

        Raises parse.UnsupportedMediaType or parse.BadPayload. The digest is the
        envelope's (the one first journaled) or the body's. A body with too many elements to
        parse is no error here: its delivery has an empty payload and says why (`unparsed`).
        """
        unparsed = None
        try:
            payload = parse.loads(parse.json_text(envelope.content_type, body))
        except parse.TooManyElements as exc:
            payload, unparsed = {}, str(exc)
        return cls(
            envelope=envelope,
            payload=payload,
            payload_sha256=envelope.payload_sha256 or hashlib.sha256(body).hexdigest(),
            body=body,
            unparsed=unparsed,
        )

    @property
    def delivery_id(self) -> str:
        """X-GitHub-Delivery: the GUID (with hook_id, the journal's key)."""
        return self.envelope.delivery_id

    @property
    def hook_id(self) -> int:
        """X-GitHub-Hook-ID, 0 when none was sent."""
        return self.envelope.hook_id

    @property
    def event(self) -> str:
        """X-GitHub-Event."""
        return self.envelope.event

    @property
    def content_type(self) -> str:
        """The body's content type as sent (what the journal keeps beside the bytes)."""
        return self.envelope.content_type

    @property
    def received_at(self) -> datetime | None:
        """When it first arrived, if not now (a spooled delivery drained later)."""
        return self.envelope.received_at

    @property
    def hook_target(self) -> HookTarget | None:
        """What the hook is installed on, when the headers said."""
        return self.envelope.hook_target

    @property
    def body_from_api(self) -> bool:
        """The body is GitHub's API JSON of the delivery, not bytes it signed."""
        return self.envelope.body_from_api

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
