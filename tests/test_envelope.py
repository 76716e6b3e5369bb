"""The delivery codec: one Envelope from GitHub's headers, a spool line, a journal row, a shown delivery or a snapshot."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from werkzeug.datastructures import Headers

from flowlens_ingest.events.envelope import API_CONTENT_TYPE, BadHeaders, Caseless, Envelope
from flowlens_ingest.events.hooks import HookTarget

# What GitHub sends with a repository hook's delivery (https://docs.github.com/en/webhooks/webhook-events-and-payloads#delivery-headers).
HEADERS = {
    "Content-Type": "application/json",
    "User-Agent": "GitHub-Hookshot/044aadd",
    "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    "X-GitHub-Event": "pull_request",
    "X-GitHub-Hook-ID": "292430182",
    "X-GitHub-Hook-Installation-Target-Type": "repository",
    "X-GitHub-Hook-Installation-Target-ID": "79929171",
}


def test_the_headers_give_every_field():
    envelope = Envelope.from_headers(Headers(HEADERS))
    assert envelope == Envelope(
        delivery_id="72d3162e-cc78-11e3-81ab-4c9367dc0958",
        hook_id=292430182,
        event="pull_request",
        content_type="application/json",
        hook_target=HookTarget("repository", 79929171),
    )
    assert (envelope.received_at, envelope.body_from_api, envelope.payload_sha256) == (None, False, None)


def test_header_names_are_case_insensitive_and_values_trimmed():
    lowered = {name.lower(): f" {value} " for name, value in HEADERS.items()}
    assert Envelope.from_headers(Headers(lowered)) == dataclasses.replace(
        Envelope.from_headers(Headers(HEADERS)), content_type=" application/json "
    )


def test_without_hook_headers_the_hook_is_0_and_no_target():
    bare = {k: v for k, v in HEADERS.items() if "Hook-" not in k}
    envelope = Envelope.from_headers(Headers(bare))
    assert (envelope.hook_id, envelope.hook_target) == (0, None)


def test_without_a_content_type_it_is_empty():
    assert Envelope.from_headers(Headers({k: v for k, v in HEADERS.items() if k != "Content-Type"})).content_type == ""


@pytest.mark.parametrize("missing", ["X-GitHub-Event", "X-GitHub-Delivery"])
def test_a_missing_event_or_delivery_is_refused(missing):
    headers = dict(HEADERS, **{missing: "  "})
    with pytest.raises(BadHeaders, match="X-GitHub-Event and X-GitHub-Delivery are required"):
        Envelope.from_headers(Headers(headers))
    with pytest.raises(BadHeaders):
        Envelope.from_headers(Headers({k: v for k, v in HEADERS.items() if k != missing}))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-GitHub-Event", "pull_r\u00e9quest"),  # WSGI gives latin-1 text: never stored mangled
        ("X-GitHub-Delivery", "\u00ff" * 8),
        ("X-GitHub-Event", "e" * 101),
        ("X-GitHub-Delivery", "d" * 201),
        ("X-GitHub-Hook-ID", "12x"),
        ("X-GitHub-Hook-ID", "\u00b2"),  # a digit to str.isdigit(), not to int()
        ("X-GitHub-Hook-ID", "-5"),
        ("X-GitHub-Hook-ID", "9" * 19),  # past a BIGINT
    ],
)
def test_a_header_not_in_githubs_form_is_refused_naming_what_was_sent(name, value):
    with pytest.raises(BadHeaders, match="malformed X-GitHub-\\* header") as refused:
        Envelope.from_headers(Headers(dict(HEADERS, **{name: value})))
    # The refusal's log line names what came, cut short by the view.
    assert (refused.value.event, refused.value.delivery_id) == (
        dict(HEADERS, **{name: value})["X-GitHub-Event"],
        dict(HEADERS, **{name: value})["X-GitHub-Delivery"],
    )


@pytest.mark.parametrize(
    ("kind", "raw_id", "expected"),
    [
        ("organization", "4", HookTarget("organization", 4)),
        ("integration", "", HookTarget("integration", None)),
        ("integration", "12a", HookTarget("integration", None)),
        ("Repository", "4", None),
        ("repo sitory", "4", None),
        ("", "4", None),
    ],
)
def test_a_hook_target_is_kept_only_in_githubs_form(kind, raw_id, expected):
    headers = dict(
        HEADERS,
        **{"X-GitHub-Hook-Installation-Target-Type": kind, "X-GitHub-Hook-Installation-Target-ID": raw_id},
    )
    assert Envelope.from_headers(Headers(headers)).hook_target == expected


def test_a_plain_mapping_is_read_caseless():
    # GitHub shows a delivery's request headers as a JSON object; any case of a name is the header.
    shown = {name.upper(): value for name, value in HEADERS.items()} | {"X-Other": 5, 7: "seven"}
    assert Envelope.from_headers(Caseless(shown)) == Envelope.from_headers(Headers(HEADERS))
    assert Caseless(None).get("X-GitHub-Event") is None


# --- the spool's header line ------------------------------------------------------------

ARRIVED_NS = 1_764_982_800_123_456_789


def test_the_spool_line_keeps_every_field():
    envelope = Envelope.from_headers(Headers(HEADERS))
    line = envelope.spool_header(ARRIVED_NS)
    assert b"\n" not in line and line.isascii()
    decoded = Envelope.from_spool_header(line)
    # Arrival is kept to the microsecond, the precision of the journal's received_at.
    assert decoded == dataclasses.replace(envelope, received_at=datetime(2025, 12, 6, 1, 0, 0, 123456, tzinfo=UTC))
    every = Envelope(
        "d-1",
        hook_id=7,
        event="check_run",
        content_type="application/x-www-form-urlencoded",
        hook_target=HookTarget("integration", None),
        received_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        body_from_api=True,
        payload_sha256="ab" * 32,
    )
    # A delivery that already knows when it arrived keeps that time, not the spool's clock.
    assert Envelope.from_spool_header(every.spool_header(ARRIVED_NS)) == every


def test_each_field_of_an_envelope_is_in_the_spool_line():
    # A field added to Envelope without its spool key would be dropped by the spool again.
    keys = set(json.loads(Envelope.from_headers(Headers(HEADERS)).spool_header(ARRIVED_NS)))
    encoded = {"received_at": "received_ns", "hook_target": "target_type"}
    assert {encoded.get(f.name, f.name) for f in dataclasses.fields(Envelope)} <= keys


# Header lines exactly as earlier versions' Spool.put wrote them (json.dumps, default separators).
FIRST_FORMAT = b'{"delivery_id": "d-0", "hook_id": 0, "event": "ping", "content_type": "application/json"}'
BEFORE_CODEC = (
    b'{"delivery_id": "d-1", "hook_id": 123456, "event": "pull_request", "content_type":'
    b' "application/json", "received_ns": 1764982800123456789}'
)


def test_lines_of_earlier_versions_decode_with_the_later_fields_defaulted():
    assert Envelope.from_spool_header(FIRST_FORMAT) == Envelope("d-0", 0, "ping", "application/json")
    assert Envelope.from_spool_header(BEFORE_CODEC) == Envelope(
        "d-1",
        123456,
        "pull_request",
        "application/json",
        received_at=datetime(2025, 12, 6, 1, 0, 0, 123456, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"hook_id": 0, "event": "ping", "content_type": "application/json"}',
        b'{"delivery_id": "d", "hook_id": "x", "event": "ping", "content_type": "application/json"}',
        b'{"delivery_id": "d", "hook_id": Infinity, "event": "ping", "content_type": "application/json"}',
        b'{"delivery_id": "d", "hook_id": 1.5, "event": "ping", "content_type": "application/json"}',
        b'{"delivery_id": "d", "hook_id": 0, "event": "ping", "content_type": "", "received_ns": "soon"}',
        b'{"delivery_id": "d", "hook_id": 0, "event": "ping", "content_type": "", "received_ns": 1e400}',
        b'{"delivery_id": "d", "hook_id": 0, "event": "ping", "content_type": "", "received_ns": 10000000000000000000000000000}',
        b'{"delivery_id": "d", "hook_id": 0, "event": "ping", "content_type": "", "target_type": 5}',
        (
            b'{"delivery_id": "d", "hook_id": 0, "event": "ping", "content_type": "",'
            b' "target_type": "repository", "target_id": "5"}'
        ),
    ],
)
def test_a_line_that_is_not_a_spooled_deliverys_raises(line):
    with pytest.raises((ValueError, KeyError, TypeError)):
        Envelope.from_spool_header(line)


# --- the journal, GitHub's shown delivery, a snapshot ---------------------------------


def journal_row(**overrides: object) -> SimpleNamespace:
    """A journal row as replay selects it, with the recorded hook's target columns."""
    row = {
        "delivery_id": "d-1",
        "hook_id": 42,
        "event": "pull_request",
        "content_type": "application/json",
        "payload_sha256": "cd" * 32,
        "received_at": datetime(2026, 12, 1, tzinfo=UTC),
        "body_from_api": False,
        "target_type": "organization",
        "target_id": 9,
    }
    return SimpleNamespace(**{**row, **overrides})


def test_a_journal_row_gives_every_field_the_journal_and_the_hooks_table_hold():
    assert Envelope.from_journal(journal_row()) == Envelope(
        "d-1",
        42,
        "pull_request",
        "application/json",
        hook_target=HookTarget("organization", 9),
        received_at=datetime(2026, 12, 1, tzinfo=UTC),
        payload_sha256="cd" * 32,
    )
    unrecorded = Envelope.from_journal(journal_row(target_type=None, target_id=None, content_type=None))
    assert (unrecorded.hook_target, unrecorded.content_type) == (None, "")


def test_a_shown_delivery_takes_its_event_and_target_from_the_headers_github_shows():
    shown = {"X-GitHub-Event": "check_run", "X-GitHub-Hook-Installation-Target-Type": "integration"}
    envelope = Envelope.from_shown(shown, delivery_id="g-1", hook_id=5, event="from-the-log")
    assert envelope == Envelope(
        "g-1", 5, "check_run", API_CONTENT_TYPE, hook_target=HookTarget("integration", None), body_from_api=True
    )


@pytest.mark.parametrize("headers", [None, [], {}, {"X-GitHub-Event": ""}, {"x-github-event": "\u00e9v\u00e9nement"}])
def test_a_shown_delivery_without_githubs_event_keeps_the_logs(headers):
    envelope = Envelope.from_shown(headers, delivery_id="g-1", hook_id=5, event="push")
    assert (envelope.event, envelope.hook_target, envelope.body_from_api) == ("push", None, True)


def test_a_snapshot_is_the_apis_json_from_no_hook():
    assert Envelope.from_api(delivery_id="snap-1", event="status") == Envelope(
        "snap-1", 0, "status", "application/json", body_from_api=True
    )
