"""A delivery's identity (everything about it but its body), read and written in one place. Pure.

An `Envelope` is made once, from wherever the delivery comes from: GitHub's HTTP headers
(the view), a spool file's header line (the drainer), a journal row (replay), GitHub's
shown delivery (`recover --fetch`) or a REST snapshot (`backfill`). `Delivery.parse`
turns an envelope and the body into a delivery. So no caller lists the fields, and a
field added here is kept by every path (the spool once dropped the hook target).

The spool's header line is this module's JSON form: one line, ASCII, then the body.
Files written before a field existed still decode, the field taking its default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from flowlens_ingest.events.hooks import HookTarget, header_number, target_of

# The JSON body of GitHub's REST answers (a shown delivery's payload, a backfill snapshot).
API_CONTENT_TYPE = "application/json"
# GitHub's event names and GUIDs are far shorter: anything longer is not GitHub's.
MAX_EVENT = 100
MAX_DELIVERY_ID = 200
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class BadHeaders(ValueError):
    """The delivery's X-GitHub-* headers are missing or not GitHub's (answered 400).

    Carries the raw event and delivery id, for the log line that refuses them.
    """

    def __init__(self, message: str, *, event: str, delivery_id: str) -> None:
        super().__init__(message)
        self.event = event
        self.delivery_id = delivery_id


class HeaderLookup(Protocol):
    """HTTP headers by name, case-insensitively: Flask's `request.headers`, or `Caseless` over a plain mapping."""

    def get(self, key: str, /) -> str | None: ...


class Caseless:
    """Header values looked up by any case of their name, from a mapping (GitHub shows `X-GitHub-Event`)."""

    def __init__(self, headers: Any) -> None:
        items = headers.items() if isinstance(headers, Mapping) else ()
        self._values = {key.lower(): value for key, value in items if isinstance(key, str) and isinstance(value, str)}

    def get(self, key: str, /) -> str | None:
        """The value of header `key`, None when absent."""
        return self._values.get(key.lower())


class JournalRow(Protocol):
    """The journal columns an envelope is read from (with the hook's target, when recorded)."""

    @property
    def delivery_id(self) -> str: ...
    @property
    def hook_id(self) -> int: ...
    @property
    def event(self) -> str: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def payload_sha256(self) -> str | None: ...
    @property
    def received_at(self) -> datetime | None: ...
    @property
    def body_from_api(self) -> bool: ...
    @property
    def target_type(self) -> str | None: ...
    @property
    def target_id(self) -> int | None: ...


@dataclass(frozen=True)
class Envelope:
    """Who sent a delivery, what it is, and how its body is encoded: every field but the body."""

    delivery_id: str
    # X-GitHub-Hook-ID; 0 when absent (the journal key is (delivery_id, hook_id)).
    hook_id: int
    event: str
    # The body's Content-Type as sent ("" when none).
    content_type: str
    # What the hook is installed on (X-GitHub-Hook-Installation-Target-Type/-ID), when sent.
    hook_target: HookTarget | None = None
    # When it first arrived, if not now (a spooled delivery drained later, a replay).
    received_at: datetime | None = None
    # The body is GitHub's API JSON of the delivery (`recover --fetch`, backfill), not bytes it signed.
    body_from_api: bool = False
    # The digest first journaled (replay keeps it); None: the body's own.
    payload_sha256: str | None = None

    @classmethod
    def from_headers(cls, headers: HeaderLookup) -> Envelope:
        """The envelope of a delivery from its HTTP headers.

        Looked up by name, not copied: a WSGI request's headers are a view of its
        environ, and walking all of them tripled this function's cost.

        Raises BadHeaders when X-GitHub-Event or X-GitHub-Delivery is missing, or a
        header is not GitHub's form: WSGI gives header values as latin-1 text, and
        GitHub's are ASCII (an event name, a GUID, digits), each sent once; anything else
        is refused, never stored as mangled text. The hook target is kept only in GitHub's form.
        """
        event = (headers.get("X-GitHub-Event") or "").strip()
        delivery_id = (headers.get("X-GitHub-Delivery") or "").strip()
        raw_hook = (headers.get("X-GitHub-Hook-ID") or "").strip()
        if not event or not delivery_id:
            raise BadHeaders("X-GitHub-Event and X-GitHub-Delivery are required", event=event, delivery_id=delivery_id)
        hook_id = header_number(raw_hook) if raw_hook else 0
        if (
            len(event) > MAX_EVENT
            or len(delivery_id) > MAX_DELIVERY_ID
            or hook_id is None
            or not (event + delivery_id).isascii()
            # A header sent twice, as the WSGI server joins it: no event name or GUID holds a comma.
            or "," in event + delivery_id
        ):
            raise BadHeaders("malformed X-GitHub-* header", event=event, delivery_id=delivery_id)
        return cls(
            delivery_id=delivery_id,
            hook_id=hook_id,
            event=event,
            content_type=headers.get("Content-Type") or "",
            hook_target=_target_headers(headers),
        )

    @classmethod
    def from_api(
        cls, *, delivery_id: str, event: str, hook_id: int = 0, hook_target: HookTarget | None = None
    ) -> Envelope:
        """The envelope of a body that is GitHub's REST JSON (a backfill snapshot; hook 0: no hook sent it)."""
        return cls(
            delivery_id=delivery_id,
            hook_id=hook_id,
            event=event,
            content_type=API_CONTENT_TYPE,
            hook_target=hook_target,
            body_from_api=True,
        )

    @classmethod
    def from_shown(cls, headers: Any, *, delivery_id: str, hook_id: int, event: str) -> Envelope:
        """The envelope of a delivery GitHub's API shows (`GET …/deliveries/{id}`), its payload as the body.

        The GUID and hook come from the log entry; the event and the hook target from the
        request headers GitHub shows, when they are GitHub's form (else the log's event).
        """
        by_name = Caseless(headers)
        shown = (by_name.get("X-GitHub-Event") or "").strip()
        fits = 0 < len(shown) <= MAX_EVENT and shown.isascii()
        return cls.from_api(
            delivery_id=delivery_id,
            event=shown if fits else event,
            hook_id=hook_id,
            hook_target=_target_headers(by_name),
        )

    @classmethod
    def from_journal(cls, row: JournalRow) -> Envelope:
        """The envelope of a journaled delivery, with its hook's target when the hook is recorded."""
        return cls(
            delivery_id=row.delivery_id,
            hook_id=row.hook_id,
            event=row.event,
            content_type=row.content_type or "",
            hook_target=None if row.target_type is None else HookTarget(row.target_type, row.target_id),
            received_at=row.received_at,
            body_from_api=bool(row.body_from_api),
            payload_sha256=row.payload_sha256,
        )

    def spool_header(self, arrived_ns: int) -> bytes:
        """The spool file's header line (no newline): every field, `received_ns` the arrival unless already known."""
        received_ns = arrived_ns if self.received_at is None else _ns(self.received_at)
        target = self.hook_target
        return json.dumps(
            {
                "delivery_id": self.delivery_id,
                "hook_id": self.hook_id,
                "event": self.event,
                "content_type": self.content_type,
                "received_ns": received_ns,
                "target_type": None if target is None else target.type,
                "target_id": None if target is None else target.id,
                "body_from_api": self.body_from_api,
                "payload_sha256": self.payload_sha256,
            }
        ).encode()

    @classmethod
    def from_spool_header(cls, line: bytes) -> Envelope:
        """Decode a spool file's header line, of this version or an earlier one.

        Earlier files lack the later keys: `received_ns` (the first format), and the
        hook target, `body_from_api`, `payload_sha256` (before this codec). Raises
        ValueError (or KeyError, TypeError) when the line is not a spooled delivery's.
        """
        meta = json.loads(line)
        if not isinstance(meta, dict):
            # Not a mapping: .get would raise AttributeError, which the drain does not set aside.
            raise TypeError("not a JSON object")
        received_ns = meta.get("received_ns")
        target_type = meta.get("target_type")
        target_id = meta.get("target_id")
        if target_type is not None and not isinstance(target_type, str):
            raise TypeError("target_type")
        digest = meta.get("payload_sha256")
        return cls(
            delivery_id=_stored_text(meta["delivery_id"]),
            hook_id=_integer(meta["hook_id"]),
            event=_stored_text(meta["event"]),
            content_type=_stored_text(meta["content_type"]),
            hook_target=None
            if target_type is None
            else HookTarget(_stored_text(target_type), _optional_integer(target_id)),
            received_at=None if received_ns is None else _moment(_integer(received_ns)),
            body_from_api=meta.get("body_from_api") is True,
            payload_sha256=None if digest is None else _stored_text(digest),
        )


def _target_headers(headers: HeaderLookup) -> HookTarget | None:
    return target_of(
        headers.get("X-GitHub-Hook-Installation-Target-Type"), headers.get("X-GitHub-Hook-Installation-Target-ID")
    )


def _stored_text(value: Any) -> str:
    """A header field as the spool wrote it: text a column stores (no NUL, no lone surrogate), as the view took it.

    ValueError (UnicodeEncodeError for a lone surrogate) otherwise: a file no version wrote.
    """
    text = str(value)
    if "\x00" in text:
        raise ValueError("a NUL in a header field")
    text.encode("utf-8")
    return text


def _integer(value: Any) -> int:
    """A JSON integer (every version wrote ids and times as integers; `Infinity` or `true` is not one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"not an integer: {type(value).__name__}")
    return value


def _optional_integer(value: Any) -> int | None:
    return None if value is None else _integer(value)


def _moment(ns: int) -> datetime:
    """The UTC time `ns` nanoseconds after the epoch; ValueError past what a datetime holds."""
    try:
        return _EPOCH + timedelta(microseconds=ns // 1000)
    except OverflowError:  # not a ValueError: said as one, so the spool sets the file aside
        raise ValueError("received_ns out of range") from None


def _ns(moment: datetime) -> int:
    """Nanoseconds since the epoch, exact to the microsecond a datetime holds (naive: UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000
