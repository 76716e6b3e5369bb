"""Delivery.parse: one parse of an envelope and its body, shared by the view, the drainer, replay, recover and backfill."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import pytest

from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.events.envelope import Envelope
from flowlens_ingest.events.hooks import HookTarget
from flowlens_ingest.events.parse import BadPayload, UnsupportedMediaType
from flowlens_ingest.store import hooks as store_hooks

from .helpers import PAYLOADS

OPENED_BODY = (PAYLOADS / "pull_request" / "opened.payload.json").read_bytes()
OPENED = json.loads(OPENED_BODY)


def delivery_of(body: bytes, content_type: str | None = "application/json", **kwargs: Any) -> Delivery:
    """A delivery of `body` with fixed headers."""
    envelope = Envelope("d-1", hook_id=123456, event="pull_request", content_type=content_type or "", **kwargs)
    return Delivery.parse(envelope, body)


def test_a_json_body_is_parsed_and_kept_as_received():
    delivery = delivery_of(OPENED_BODY, "application/json; charset=utf-8")
    assert (delivery.delivery_id, delivery.hook_id, delivery.event) == ("d-1", 123456, "pull_request")
    assert delivery.payload == OPENED
    assert (delivery.body, delivery.content_type) == (OPENED_BODY, "application/json; charset=utf-8")
    assert delivery.payload_sha256 == hashlib.sha256(OPENED_BODY).hexdigest()


def test_a_form_body_is_parsed_from_its_payload_field_and_hashed_as_sent():
    text = json.dumps({"action": "created", "zen": "caf\u00e9"})
    body = urlencode({"payload": text}).encode()
    delivery = delivery_of(body, "application/x-www-form-urlencoded")
    assert delivery.payload == {"action": "created", "zen": "caf\u00e9"}
    # The journal keeps the bytes the signature covered, the form encoding included.
    assert (delivery.body, delivery.content_type) == (body, "application/x-www-form-urlencoded")
    assert delivery.payload_sha256 == hashlib.sha256(body).hexdigest()
    assert delivery.payload_sha256 != hashlib.sha256(text.encode()).hexdigest()


def test_a_given_payload_sha256_is_kept():
    # Replay passes the digest first journaled, whatever the bytes it parses now.
    first = "ab" * 32
    assert delivery_of(OPENED_BODY, payload_sha256=first).payload_sha256 == first


def test_a_body_it_cannot_parse_raises_what_the_view_answers_with():
    with pytest.raises(UnsupportedMediaType):
        delivery_of(OPENED_BODY, "text/plain")
    with pytest.raises(BadPayload):
        delivery_of(b"[1, 2]")
    with pytest.raises(UnsupportedMediaType):
        delivery_of(OPENED_BODY, None)


def test_a_delivery_is_frozen():
    delivery = delivery_of(b'{"zen": "ok"}')
    with pytest.raises(dataclasses.FrozenInstanceError):
        delivery.event = "ping"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"action": "opened"}, "opened"),
        ({"zen": "no action"}, None),
        ({"action": None}, None),
        ({"action": 5}, None),
        ({"action": ["opened"]}, None),
        ({"action": {"name": "opened"}}, None),
    ],
)
def test_action_is_the_payloads_action_when_it_is_a_string(payload, expected):
    assert delivery_of(json.dumps(payload).encode()).action == expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"repository": {"id": 1296269}}, 1296269),
        ({"repository": {"id": 0}}, 0),
        ({"repository": {"id": 2**63 - 1}}, 2**63 - 1),
        ({"repository": {"id": -(2**63)}}, -(2**63)),
        ({"zen": "no repository"}, None),
        ({"repository": None}, None),
        ({"repository": [1296269]}, None),
        ({"repository": {"name": "Hello-World"}}, None),
        ({"repository": {"id": "1296269"}}, None),
        ({"repository": {"id": 1296269.0}}, None),
        ({"repository": {"id": True}}, None),
    ],
)
def test_repository_github_id_is_an_id_a_bigint_column_can_hold(payload, expected):
    assert delivery_of(json.dumps(payload).encode()).repository_github_id == expected


def test_the_sample_names_its_action_and_repository():
    delivery = delivery_of(OPENED_BODY)
    assert delivery.action == "opened"
    assert delivery.repository_github_id == OPENED["repository"]["id"]


@pytest.mark.parametrize("rid", [2**63, -(2**63) - 1])
def test_repository_github_id_outside_bigint_is_none(rid):
    # The parser reads such numbers as null; a delivery built otherwise still never names one.
    delivery = Delivery(
        envelope=Envelope("d-1", hook_id=0, event="push", content_type="application/json"),
        payload={"repository": {"id": rid}},
        payload_sha256="0" * 64,
        body=b"",
    )
    assert delivery.repository_github_id is None


def test_the_envelopes_fields_are_the_deliverys():
    target = HookTarget("repository", 1296269)
    envelope = Envelope(
        "d-9",
        hook_id=42,
        event="pull_request",
        content_type="application/json",
        hook_target=target,
        received_at=datetime(2026, 12, 6, 1, 2, 3, 456789, tzinfo=UTC),
        body_from_api=True,
    )
    delivery = Delivery.parse(envelope, OPENED_BODY)
    assert delivery.envelope is envelope
    assert (delivery.delivery_id, delivery.hook_id, delivery.event, delivery.content_type) == (
        "d-9",
        42,
        "pull_request",
        "application/json",
    )
    assert (delivery.hook_target, delivery.received_at, delivery.body_from_api) == (
        target,
        envelope.received_at,
        True,
    )
    assert delivery.hook_path == "repos/Codertocat/Hello-World/hooks/42"


def test_the_hooks_a_process_remembers_are_bounded(monkeypatch):
    # The hook headers are not signed: a signed body replayed with invented hook ids must not grow a
    # worker's memory without end. Past the bound it forgets, and a hook costs its statement again.
    monkeypatch.setattr(store_hooks, "MAX_REMEMBERED", 3)
    recorded = store_hooks.RecordedHooks()

    def with_hook(hook_id: int) -> Delivery:
        envelope = Envelope(
            f"d-{hook_id}",
            hook_id=hook_id,
            event="pull_request",
            content_type="application/json",
            hook_target=HookTarget("repository", 1296269),
        )
        return Delivery.parse(envelope, OPENED_BODY)

    first = with_hook(1)
    recorded.recorded(first)
    assert recorded.statement(first) is None  # known: no statement
    for hook_id in range(2, 12):
        recorded.recorded(with_hook(hook_id))
    assert recorded.statement(first) is not None  # forgotten: recorded again (DO NOTHING) when it comes
