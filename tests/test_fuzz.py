"""Fuzzing: thousands of bodies and mutated GitHub payloads through the parser, the mappers and
the whole service on a real database. Nothing may crash, and no answer may be a 5xx.

Plus the awkward values PostgreSQL cannot store as they are, one by one, each with
the answer it gets: 400 (not valid input) or stored faithfully.

The example counts are CI's (HYPOTHESIS_PROFILE=ci); the default `dev` profile runs
about a tenth of them (helpers.examples).
"""

from __future__ import annotations

import copy
import json
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowlens_ingest.events.mappers import MAPPERS, Changes, MappingError, map_delivery
from flowlens_ingest.events.parse import BadPayload, UnsupportedMediaType, json_text, loads
from flowlens_ingest.store.schema import (
    ci_checks,
    pipeline_runs,
    pr_reviews,
    pull_requests,
    repositories,
    webhook_deliveries,
)

from .helpers import PAYLOADS, examples, github_headers, load_payload, make_settings, rows

SAMPLES = [(p.parent.name, json.loads(p.read_text())) for p in sorted(PAYLOADS.glob("*/*.json"))]
EVENTS = [*sorted(MAPPERS), "ping", "sponsorship"]
OPENED = load_payload("pull_request/opened.payload.json")
CHECK = load_payload("check_run/completed.payload.json")

storable_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
awkward_text = st.one_of(
    storable_text,
    st.text(max_size=10),  # U+0000 included
    st.sampled_from(
        [
            "",
            " ",
            "2019-05-15T15:20:33Z",
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-14:00",
            "open",
            "closed",
            "completed",
            "failure",
            "x" * 1001,
            "\u202e",
            "\U0001f600",
            "null",
        ]
    ),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**63 - 1, -(2**63)]),
    st.floats(allow_nan=False, allow_infinity=False),
    awkward_text,
)
# Any instant a payload could name, in any offset GitHub's ISO 8601 strings allow.
timestamps = st.builds(
    lambda moment, minutes: moment.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat(),
    st.datetimes() | st.sampled_from([datetime.min, datetime.max]),
    st.integers(min_value=-14 * 60, max_value=14 * 60),
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(storable_text, children, max_size=4),
    max_leaves=12,
)


def parse(content_type: str | None, body: bytes) -> dict:
    """A body decoded as the view decodes it."""
    return loads(json_text(content_type, body))


def mutate(data: st.DataObject, payload: dict[str, Any]) -> dict[str, Any]:
    """A copy of `payload` with a few values, anywhere in it, replaced or removed."""
    payload = copy.deepcopy(payload)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4), label="mutations")):
        times = sorted(time_slots(payload), key=repr)
        if times and data.draw(st.integers(0, 3)) == 0:
            holder, name = data.draw(st.sampled_from(times))
            holder[name] = data.draw(timestamps, label="timestamp")
            continue
        parent: Any = None
        key: Any = None
        current: Any = payload
        # Walk down a random path; stop at a random depth.
        while (isinstance(current, dict) and current) or (isinstance(current, list) and current):
            if parent is not None and data.draw(st.integers(0, 2)) == 0:
                break
            if isinstance(current, dict):
                step = data.draw(st.sampled_from(sorted(current)))
            else:
                step = data.draw(st.integers(0, len(current) - 1))
            parent, key, current = current, step, current[step]
        if parent is None:
            continue
        if isinstance(parent, dict) and data.draw(st.integers(0, 4)) == 0:
            del parent[key]
        else:
            parent[key] = data.draw(json_values, label="value")
    return payload


def time_slots(value: Any) -> list[tuple[dict[str, Any], str]]:
    """Every (object, key) of a payload whose key names a time, like `updated_at`."""
    found: list[tuple[dict[str, Any], str]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found += [(item, k) for k in item if k.endswith("_at")]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A GitHub sample, mutated, usually under its own event."""
    event, payload = draw(st.sampled_from(SAMPLES))
    if draw(st.integers(0, 5)) == 0:
        event = draw(st.sampled_from(EVENTS))
    return event, mutate(draw(st.data()), payload)


@settings(max_examples=examples(3000), deadline=None)
@given(
    st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain", None]),
)
def test_parser_refuses_cleanly_or_returns_an_object(body, content_type):
    try:
        parsed = parse(content_type, body)
    except (BadPayload, UnsupportedMediaType):
        return
    assert isinstance(parsed, dict)


@settings(max_examples=examples(2000), deadline=None)
@given(json_values.filter(lambda v: isinstance(v, dict)) | json_values.map(lambda v: {"wrapped": v}))
def test_parser_round_trips_every_storable_object(value):
    body = json.dumps(value).encode()
    # What PostgreSQL cannot store (U+0000) comes back as U+FFFD, never refused.
    assert parse("application/json", body) == json.loads(body.decode().replace("\\u0000", "\\ufffd"))


@settings(max_examples=examples(4000), deadline=None)
@given(deliveries())
def test_mappers_map_or_raise_mapping_error_on_any_shape(delivery):
    event, payload = delivery
    try:
        changes = map_delivery(event, payload)
    except MappingError:
        return
    assert isinstance(changes, Changes)


@pytest.fixture(scope="module")
def fuzz_client(engine, database_url, tmp_path_factory):
    """One app for the whole module: hypothesis runs many examples per test function."""
    from flowlens_ingest.web.app import create_app
    from flowlens_ingest.web.services import services

    app = create_app(make_settings(database_url, tmp_path_factory.mktemp("fuzz")))
    yield app.test_client()
    services(app).database.dispose()


@settings(max_examples=examples(1500), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(delivery=deliveries())
def test_service_answers_any_signed_payload_without_5xx(db, fuzz_client, delivery):
    event, payload = delivery
    delivery_id = str(uuid.uuid4())
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8", "surrogatepass")
    with db.connect() as conn:
        started = conn.execute(sa.select(sa.func.clock_timestamp())).scalar()
    response = fuzz_client.post("/webhook", data=body, headers=github_headers(body, event, delivery=delivery_id))
    assert response.status_code in (200, 202, 400), response.get_data(as_text=True)
    answer = response.get_json()
    with db.connect() as conn:
        entry = conn.execute(
            sa.select(webhook_deliveries.c.outcome, webhook_deliveries.c.body).where(
                webhook_deliveries.c.delivery_id == delivery_id
            )
        ).first()
    if response.status_code == 400:
        assert entry is None and set(answer) == {"error"}
        return
    # Answered 2xx only once durably journaled, with the exact bytes the signature covered.
    assert entry is not None
    assert bytes(entry.body) == body
    assert (response.status_code == 202) == (answer["outcome"] == "failed")
    # Every row it wrote can be read back by a Python poller (psycopg2 converts each column).
    with db.connect() as conn:
        for table in (repositories, pull_requests, pipeline_runs, ci_checks, pr_reviews):
            conn.execute(sa.select(table).where(table.c.updated_at >= started)).all()
    assert entry.outcome == ("stale" if answer["outcome"] == "stale" else answer["outcome"])


# --- awkward values, one decision each ------------------------------------------------------


def post(client, payload: dict | bytes, event: str):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return client.post("/webhook", data=body, headers=github_headers(body, event))


def with_pr(**fields: Any) -> dict:
    payload = copy.deepcopy(OPENED)
    payload["pull_request"].update(fields)
    return payload


def with_repo(**fields: Any) -> dict:
    payload = copy.deepcopy(OPENED)
    payload["repository"].update(fields)
    return payload


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"x": NaN}', id="nan"),
        pytest.param(b'{"x": -Infinity}', id="infinity"),
        pytest.param(b'{"x": ' + b"[" * 65 + b"]" * 65 + b"}", id="nesting-66"),
        pytest.param(b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", id="nesting-200000"),
        pytest.param('{"x": "caf\u00e9"}'.encode("latin-1"), id="not-utf8"),
        pytest.param(b"[1, 2, 3]", id="not-an-object"),
    ],
)
def test_what_is_not_a_json_object_is_400(client, db, body):
    response = post(client, body, "pull_request")
    assert response.status_code == 400 and set(response.get_json()) == {"error"}
    assert rows(db, webhook_deliveries) == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"zen": "a\\u0000b"}', id="nul-in-string"),
        pytest.param(b'{"a\\u0000": 1}', id="nul-in-key"),
        pytest.param(b'{"zen": "\\udc00"}', id="lone-surrogate"),
        pytest.param(b'{"id": 9223372036854775808}', id="above-bigint"),
        pytest.param(b'{"id": -9223372036854775809}', id="below-bigint"),
        pytest.param(b'{"id": 1' + b"0" * 5000 + b"}", id="5000-digit-integer"),
        pytest.param(b'{"x": 1e400}', id="float-overflow"),
        pytest.param(b'{"x": 1e-20000}', id="float-underflow"),
        pytest.param(b'{"x": 0.' + b"0" * 16500 + b"1}", id="16500-zeros"),
    ],
)
def test_signed_values_postgresql_cannot_store_are_journaled_byte_exact_not_refused(client, db, body):
    response = post(client, body, "ping")
    assert (response.status_code, response.get_json()["outcome"]) == (200, "ignored")
    (entry,) = rows(db, webhook_deliveries)
    assert bytes(entry["body"]) == body


def test_a_pr_with_nul_surrogates_and_huge_numbers_is_applied_with_them_replaced(client, db):
    payload = copy.deepcopy(OPENED)
    payload["pull_request"]["labels"] = [{"name": "bug\u0000", "color": "f00"}]
    text = json.dumps(payload)
    text = text.replace('"additions": 1,', '"additions": 99999999999999999999999,')
    text = text.replace('"deletions": 1,', '"deletions": 1e-20000,')
    text = text.replace('"title": "Update the README with new information."', '"title": "nul \\u0000 and \\ud800"')
    assert "99999999999999999999999" in text and "1e-20000" in text and "\\u0000 and" in text
    response = post(client, text.encode(), "pull_request")
    assert (response.status_code, response.get_json()["outcome"]) == (200, "applied")
    (pr,) = rows(db, pull_requests, "title", "additions", "deletions", "labels")
    assert pr == {
        "title": "nul \ufffd and \ufffd",
        "additions": None,
        "deletions": None,
        "labels": [{"name": "bug\ufffd", "color": "f00"}],
    }
    (entry,) = rows(db, webhook_deliveries)
    assert bytes(entry["body"]) == text.encode()


def test_a_check_run_whose_output_holds_nul_counts_towards_the_build(client, db):
    assert post(client, OPENED, "pull_request").status_code == 200
    check = copy.deepcopy(CHECK)
    check["check_run"]["head_sha"] = OPENED["pull_request"]["head"]["sha"]
    check["check_run"]["pull_requests"] = []
    check["check_run"]["output"] = {"title": "diff", "summary": "@@ -1 +1 @@\u0000", "text": "\u0000" * 3}
    check["repository"] = OPENED["repository"]
    body = json.dumps(check).encode()
    assert b"\\u0000" in body  # json.dumps writes U+0000 as the escape GitHub sends
    response = post(client, body, "check_run")
    assert (response.status_code, response.get_json()["outcome"]) == (200, "applied")
    (pipeline,) = rows(db, pipeline_runs, "status_build")
    assert pipeline["status_build"] == ("passed" if CHECK["check_run"]["conclusion"] == "success" else "failed")


@pytest.mark.parametrize(
    ("payload", "event", "check"),
    [
        pytest.param(
            with_pr(body="\U0001f600 " + "long body " * 500_000),
            "pull_request",
            lambda db: len(rows(db, pull_requests, "description")[0]["description"]) == 2 + 10 * 500_000,
            id="5MB-string",
        ),
        pytest.param(
            with_pr(title="\u202e\u00e9\U0001f600\t\n\\\"'"),
            "pull_request",
            lambda db: rows(db, pull_requests, "title")[0]["title"] == "\u202e\u00e9\U0001f600\t\n\\\"'",
            id="unicode-controls-astral",
        ),
        pytest.param(
            with_repo(id=2**63 - 1),
            "pull_request",
            lambda db: rows(db, repositories, "github_id")[0]["github_id"] == 2**63 - 1,
            id="bigint-max-id",
        ),
        pytest.param(
            dict(
                OPENED,
                extra={"f": 1e308, "g": -0.0, "h": 1e-320, "i": 2**63 - 1, "deep": json.loads("[" * 62 + "]" * 62)},
            ),
            "pull_request",
            lambda db: journaled_payload(db)["extra"]["f"] == Decimal("1e308"),
            id="extreme-numbers-and-depth-64",
        ),
    ],
)
def test_awkward_but_valid_values_are_stored_faithfully(client, db, payload, event, check):
    response = post(client, payload, event)
    assert (response.status_code, response.get_json()["outcome"]) == (200, "applied")
    assert journaled_payload(db) == json.loads(json.dumps(payload), parse_float=Decimal)
    assert check(db)


def journaled_payload(db) -> Any:
    """The journal's bytes, parsed with exact decimals."""
    with db.connect() as conn:
        (body,) = conn.execute(sa.select(webhook_deliveries.c.body)).scalars().all()
    return json.loads(bytes(body), parse_float=Decimal)


def test_a_count_no_column_holds_is_stored_as_null_and_the_pr_applied(client, db):
    response = post(client, with_pr(additions=-5, deletions=2**40), "pull_request")
    assert (response.status_code, response.get_json()["outcome"]) == (200, "applied")
    assert rows(db, pull_requests, "additions", "deletions") == [{"additions": None, "deletions": None}]


@pytest.mark.parametrize(
    ("payload", "event"),
    [
        pytest.param(with_repo(name="r" * 1001), "pull_request", id="indexed-repository-name-over-1000"),
        pytest.param(with_pr(number=2**40), "pull_request", id="pr-number-beyond-integer"),
        pytest.param(with_pr(updated_at="next tuesday"), "pull_request", id="timestamp-not-iso"),
        # PostgreSQL would take these, but no Python reader (the poller) could load the row back.
        pytest.param(with_pr(updated_at="0001-01-01T00:00:00+14:00"), "pull_request", id="timestamp-before-year-1-utc"),
        pytest.param(with_pr(closed_at="9999-12-31T23:59:59-14:00"), "pull_request", id="timestamp-after-9999-utc"),
        pytest.param(with_pr(title=["not", "a", "string"]), "pull_request", id="title-array"),
        pytest.param(
            dict(CHECK, check_run=dict(CHECK["check_run"], name="c" * 5000)), "check_run", id="indexed-check-name"
        ),
        pytest.param(dict(CHECK, check_run=dict(CHECK["check_run"], head_sha=7)), "check_run", id="head-sha-number"),
    ],
)
def test_unmappable_values_are_202_failed_journaled_with_their_payload(client, db, payload, event):
    response = post(client, payload, event)
    assert (response.status_code, response.get_json()["outcome"]) == (202, "failed")
    (entry,) = rows(db, webhook_deliveries, "outcome", "error")
    assert entry["outcome"] == "failed" and entry["error"]
    assert journaled_payload(db) == json.loads(json.dumps(payload), parse_float=Decimal)
    for table in (repositories, pull_requests, ci_checks):
        assert rows(db, table) == []
