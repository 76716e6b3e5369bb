import json
from pathlib import Path
from urllib.parse import urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.memory import large_push
from flowlens_ingest.events import parse as parse_module
from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.events.envelope import Envelope
from flowlens_ingest.events.parse import MAX_DEPTH, BadPayload, UnsupportedMediaType, json_text, loads


def parse(content_type: str | None, body: bytes) -> dict:
    """A body decoded as the view decodes it."""
    return loads(json_text(content_type, body))


def test_json_object_is_parsed():
    assert parse("application/json; charset=utf-8", b'{"zen": "ok"}') == {"zen": "ok"}


def test_form_encoded_payload_field_is_parsed():
    body = urlencode({"payload": json.dumps({"zen": "caf\u00e9"})}).encode()
    assert parse("application/x-www-form-urlencoded", body) == {"zen": "caf\u00e9"}


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", None, "multipart/form-data"])
def test_other_content_types_are_unsupported(content_type):
    with pytest.raises(UnsupportedMediaType):
        parse(content_type, b"{}")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'"just a string"',
        b"\xff\xfe{}",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": 1} trailing',
    ],
)
def test_what_is_not_a_json_object_is_refused(body):
    with pytest.raises(BadPayload):
        parse("application/json", body)


@pytest.mark.parametrize(
    ("body", "parsed"),
    [
        # GitHub really sends U+0000 (diff hunks, check output): kept as U+FFFD, never refused.
        (b'{"a": "nul \\u0000 inside"}', {"a": "nul \ufffd inside"}),
        (b'{"a": "lone \\ud800 surrogate"}', {"a": "lone \ufffd surrogate"}),
        (b'{"a": "lone \\uDC00"}', {"a": "lone \ufffd"}),
        (b'{"a\\u0000": {"b": ["\\u0000"]}}', {"a\ufffd": {"b": ["\ufffd"]}}),
        # A pair stays the character it encodes.
        (b'{"a": "\\ud83d\\ude00"}', {"a": "\U0001f600"}),
        # Numbers no column could hold read as null.
        (b'{"a": 1e999, "b": -1e999}', {"a": None, "b": None}),
        # Too small for a double: not zero, so not 0.0 either (a mapped integer column gets NULL).
        (
            b'{"a": 1e-20000, "b": -2.5E-400, "c": 0.0, "d": 0e-20000, "e": 5e-324}',
            {"a": None, "b": None, "c": 0.0, "d": 0.0, "e": 5e-324},
        ),
        (b'{"a": 0.' + b"0" * 16500 + b"1}", {"a": None}),
        (b'{"a": 123456789012345678901234567890}', {"a": None}),
        (b'{"a": 9223372036854775808, "b": -9223372036854775809}', {"a": None, "b": None}),
    ],
)
def test_what_postgresql_cannot_store_is_made_storable_not_refused(body, parsed):
    assert parse("application/json", body) == parsed


def test_nesting_is_bounded_without_recursion_errors():
    ok = "[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2)
    assert parse("application/json", f'{{"a": {ok}}}'.encode())
    deep = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    with pytest.raises(BadPayload):
        parse("application/json", f'{{"a": {deep}}}'.encode())
    very_deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(BadPayload):
        parse("application/json", f'{{"a": {very_deep}}}'.encode())


def test_bigint_edges_are_kept_exactly():
    body = b'{"max": 9223372036854775807, "min": -9223372036854775808, "f": 1.5}'
    assert parse("application/json", body) == {"max": 2**63 - 1, "min": -(2**63), "f": 1.5}


@pytest.mark.parametrize(
    "body",
    [b"payload=%7B%7D&payload=%7B%7D", b"other=1", b"payload=%ff", b"payload=%5B%5D"],
)
def test_bad_form_bodies_are_refused(body):
    with pytest.raises(BadPayload):
        parse("application/x-www-form-urlencoded", body)


def test_a_form_body_of_countless_fields_is_refused_before_any_is_built():
    body = b"a=&" * 5_000_000 + b"payload=%7B%7D"
    with pytest.raises(BadPayload, match="more than 100 fields"):
        parse("application/x-www-form-urlencoded", body)
    # A real one, with a field or two beside GitHub's, still parses.
    assert parse("application/x-www-form-urlencoded", b"a=1&b=2&payload=%7B%7D") == {}


def _outcome(read, text: str):
    try:
        return ("parsed", read(text))
    except BadPayload as exc:
        return ("refused", str(exc))


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_EDGES = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "1e19",
    "-1e19",
    "18446744073709551615",
    "-18446744073709551616",
    "9" * 5000,
    '"\\ud800"',
    '"\\udd1e\\ud834"',
    '"\\u0000"',
    "1.0",
    "-0",
    "0.1",
    "5e-324",
    "1e-20000",
    "-0.0",
    "[" * 70 + "]" * 70,
    "[" * 2000 + "]" * 2000,
    '"\\x41"',
    "01",
    "+1",
    ".5",
    "1.",
    '"a\tb"',
]


@given(value=_JSON_VALUES, edge=st.sampled_from(_EDGES), cut=st.integers(min_value=0, max_value=200))
def test_orjson_and_the_stdlib_path_read_every_body_alike(value, edge, cut):
    """parse.loads answers with orjson only where the stdlib path would answer the same."""
    texts = [
        json.dumps({"v": value}),
        json.dumps({"v": value}, ensure_ascii=False),
        '{"v": ' + edge + "}",
        '{"k": [1, ' + edge + ', {"x": ' + edge + "}]}",
        json.dumps({"v": value})[:cut],
        json.dumps([value]),
    ]
    for text in texts:
        assert _outcome(parse_module.loads, text) == _outcome(parse_module._loads_stdlib, text), text[:200]


# --- how many elements a document may hold (parse.MAX_ELEMENTS) -----------------------------

PAYLOADS = Path(__file__).parent / "payloads"


def elements(value: object) -> int:
    """The values and containers a parsed document really holds (the root included)."""
    if isinstance(value, dict):
        return 1 + sum(elements(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(elements(v) for v in value)
    return 1


@pytest.mark.parametrize("path", sorted(PAYLOADS.rglob("*.json")), ids=lambda p: str(p.relative_to(PAYLOADS)))
def test_the_element_count_bounds_every_real_payload_from_above(path):
    text = path.read_text()
    counted = parse_module.count_elements(text)
    assert counted >= elements(json.loads(text))
    # Far from the limit: at this density GitHub's 25 MB cap stays under half of it.
    assert counted * (25 * 1024 * 1024 // len(text)) < parse_module.MAX_ELEMENTS / 2


def test_the_largest_push_github_sends_parses():
    # GitHub lists at most 2,048 commits in a push; each here modifies enough files to
    # bring the body to GitHub's 25 MB cap (bench/memory.py builds the same).
    body = large_push(25 * 1024 * 1024 - 200_000)
    assert len(body) > 24 * 1024 * 1024
    payload = parse("application/json", body)
    assert len(payload["commits"]) == 2048


@pytest.mark.parametrize(
    "body",
    [
        # 8.6 million empty lists (26 MB of text) cost 1.4 GB once parsed.
        b'{"a": [' + b"[]," * 2_999_999 + b"[]]}",
        b'{"a": [' + b"0," * 2_999_999 + b"0]}",
        b'{"a": [' + b"{}," * 2_999_999 + b"{}]}",
    ],
    ids=["lists", "numbers", "objects"],
)
def test_a_document_with_absurdly_many_elements_is_refused_before_parsing(body):
    with pytest.raises(parse_module.TooManyElements, match="more than the 2,000,000"):
        parse("application/json", body)


def test_the_limit_is_on_elements_not_on_size():
    # As many bytes as the refused documents above, in long strings: parsed.
    body = b'{"a": [' + b",".join([b'"' + b"x" * 400 + b'"'] * 60_000) + b"]}"
    assert len(parse("application/json", body)["a"]) == 60_000
    # Just at the limit: parsed.
    at_limit = b"{" + b'"a":[' + b"0," * (parse_module.MAX_ELEMENTS - 3) + b"0]}"
    assert parse_module.count_elements(at_limit.decode()) == parse_module.MAX_ELEMENTS
    assert len(parse("application/json", at_limit)["a"]) == parse_module.MAX_ELEMENTS - 2


def test_a_delivery_too_large_to_parse_keeps_its_bytes_and_says_why():
    body = b'{"action": "opened", "a": [' + b"[]," * 2_999_999 + b"[]]}"
    delivery = Delivery.parse(Envelope("d", hook_id=1, event="pull_request", content_type="application/json"), body)
    assert delivery.payload == {} and delivery.body == body and delivery.action is None
    assert delivery.unparsed is not None and "up to 6,000,003 JSON elements" in delivery.unparsed
