"""Raw request body to a JSON object that PostgreSQL can store.

GitHub sends `application/json`, or `application/x-www-form-urlencoded` with the
JSON in a `payload` field, depending on the hook's content type setting.

Genuine deliveries hold what PostgreSQL's `text` and `jsonb` refuse: GitHub sends
`\u0000` in diff hunks and check output. Such a delivery is not refused: in the
parsed object, U+0000 and unpaired surrogates become U+FFFD and numbers no column
could hold become None (NULL in the mapped columns). The journal keeps the exact
bytes. Only what is not a JSON object, or is absurdly deep, is refused.

A signed document with more elements than any GitHub payload could hold is not
parsed at all (`TooManyElements`): it is journaled as failed with its exact bytes
(Delivery.parse, ingest), not built into gigabytes of Python objects.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs

import orjson

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"

MAX_DEPTH = 64
# BIGINT is the widest integer column; GitHub ids fit comfortably below it.
MAX_INT = 2**63 - 1


# At most this many elements (values and containers) in one document, counted before parsing
# as the `[`, `{` and `,` characters of its text (strings' too: an overcount, so the bound
# only errs towards refusing). Parsing builds at most about 64 bytes of objects per
# element whatever the document (an empty list is 56, a dict 64), so this caps what one
# parse can build near 130 MB, where 8.6 million `[]` in 26 MB of text cost 1.4 GB. Real
# payloads are far from it: GitHub's samples (tests/payloads/) have one such character
# every 34-45 bytes, so a 25 MB delivery of them counts about 700,000; it would take one
# every 12.5 bytes across the whole 25 MB to reach the limit.
MAX_ELEMENTS = 2_000_000
# GitHub's form encoding holds one field, `payload`. A signed body of millions of empty fields
# (`a=&a=&…`) would have the standard library build a string for each before anything is refused:
# past this many it is refused as it stands, nothing built.
MAX_FORM_FIELDS = 100
# Past this much text the standard library parses (loads): orjson first builds a
# document of its own, about 12 times the text (240 MB for a 20 MB push), then the
# objects; the stdlib builds the objects directly (50 MB for the same push), as fast
# for such a document. Ordinary deliveries, far smaller, keep orjson's speed.
ORJSON_MAX_CHARS = 1024 * 1024


class TooManyElements(Exception):
    """The document holds more elements than MAX_ELEMENTS: signed, but not worth parsing."""


class UnsupportedMediaType(Exception):
    """The content type is neither JSON nor GitHub's form encoding."""


class BadPayload(Exception):
    """The body is not a JSON object this service can store; the message is safe to show."""


def media_type(content_type: str | None) -> str:
    """The bare media type of a Content-Type header, lower case."""
    return (content_type or "").split(";", 1)[0].strip().lower()


# What no Content-Type GitHub sends holds (a tab may separate its parameters).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")


def supported(content_type: str | None, content_encoding: str | None = None) -> bool:
    """Whether a request body so labelled is one GitHub sends: JSON or its form encoding, named in ASCII, no content coding."""
    text = content_type or ""
    return (
        media_type(text) in (JSON, FORM)
        and text.isascii()
        and not _CONTROL.search(text)
        and (content_encoding or "").strip().lower() in ("", "identity")
    )


def _reject_constant(name: str) -> None:
    raise BadPayload(f"non-standard JSON constant {name}")


_NONZERO_DIGIT = re.compile("[1-9]")


def _parse_float(text: str) -> float | None:
    value = float(text)
    # Beyond a double (1e999): no column can hold it.
    if value in (float("inf"), float("-inf")):
        return None
    # Below the smallest double (1e-20000) a number that is not zero reads as 0.0: not what it says either.
    if value == 0.0 and _NONZERO_DIGIT.search(text.partition("e")[0].partition("E")[0]):
        return None
    return value


def _parse_int(text: str) -> int | None:
    # Python would happily build a 4000-digit integer; no PostgreSQL column would hold it.
    if len(text) > 20:
        return None
    value = int(text)
    return value if -MAX_INT - 1 <= value <= MAX_INT else None


REPLACEMENT = "\ufffd"
# The JSON escapes of U+0000 and of surrogates (U+D800-U+DFFF).
_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


def storable(text: str) -> str:
    """`text` with U+0000 and unpaired surrogates replaced by U+FFFD: what PostgreSQL's text and jsonb take."""
    if "\x00" in text:
        text = text.replace("\x00", REPLACEMENT)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join(REPLACEMENT if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def _clean(value: Any) -> Any:
    """`value` with every string (keys too) made storable; nesting is bounded by MAX_DEPTH."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, dict):
        return {storable(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


_BIGINT_LOW, _BIGINT_HIGH = -MAX_INT - 1, MAX_INT
# orjson reads an integer beyond 64 bits as a float: a float this large may have been one. And a float
# zero may be a number too small for a double (1e-20000), which the stdlib path makes None.
_FLOAT_AMBIGUOUS = float(2**63)


def _scan(value: Any, limit: int) -> tuple[int, bool]:
    """How deeply containers nest in a parsed value (an object of scalars is 1), and whether
    it holds a number the stdlib path reads otherwise.

    One walk over every container for both, stopping as soon as `limit` is passed: the
    nesting bound, and any integer beyond BIGINT, float beyond 2**63 or float zero (the stdlib
    path makes the first None, the second may be an integer orjson turned into a float, and the
    third a number below the smallest double, which the stdlib path makes None).
    Written for speed (every delivery pays it): exact type checks (both parsers make
    only dicts and lists), no generator.
    """
    deepest = 0
    unusual = False
    stack = [(value, 1)] if type(value) in (dict, list) else []
    pop, push = stack.pop, stack.append
    while stack:
        item, level = pop()
        if level > deepest:
            deepest = level
            if deepest > limit:
                return deepest, unusual
        for child in item.values() if type(item) is dict else item:
            kind = type(child)
            if kind is dict or kind is list:
                push((child, level + 1))
            elif kind is int:
                if not _BIGINT_LOW <= child <= _BIGINT_HIGH:
                    unusual = True
            elif kind is float and (child == 0.0 or not -_FLOAT_AMBIGUOUS < child < _FLOAT_AMBIGUOUS):
                unusual = True
    return deepest, unusual


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether a parsed value's containers nest deeper than `limit` (the bound a delivery is held to)."""
    return _scan(value, limit)[0] > limit


def count_elements(text: str) -> int:
    """An upper bound on the values and containers in JSON `text`: its `[`, `{` and `,` characters, plus one.

    Every value but the first of a container follows a comma, and every container opens
    with a bracket: a value-free count, in C (str.count), with nothing built.
    """
    return text.count("[") + text.count("{") + text.count(",") + 1


def check_elements(text: str, limit: int = MAX_ELEMENTS) -> None:
    """Raise TooManyElements when `text` may hold more than `limit` elements."""
    # Each element takes at least one character: shorter text cannot pass the limit.
    if len(text) > limit and (count := count_elements(text)) > limit:
        raise TooManyElements(
            f"payload not parsed: up to {count:,} JSON elements, more than the {limit:,} any GitHub payload holds"
        )


def loads(text: str) -> dict[str, Any]:
    """Parse JSON text into a dict, or raise BadPayload; TooManyElements past MAX_ELEMENTS.

    orjson first (below ORJSON_MAX_CHARS): it parses a GitHub payload in a third of the stdlib's time. What it
    refuses (NaN, Infinity, 1e999, lone surrogates, nesting past 1,024) and what it
    reads otherwise (integers beyond 64 bits become floats) goes through the stdlib
    path below, which decides exactly as it always did: orjson only ever answers for
    a body both read alike (tests/test_parse.py compares them).
    """
    check_elements(text)
    if len(text) > ORJSON_MAX_CHARS:
        return _loads_stdlib(text)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _loads_stdlib(text)
    if type(value) is not dict:
        return _loads_stdlib(text)
    deepest, unusual = _scan(value, MAX_DEPTH)
    if deepest > MAX_DEPTH:
        raise BadPayload(f"nested deeper than {MAX_DEPTH} levels")
    if unusual:
        return _loads_stdlib(text)
    return _storable_strings(text, value)


def _loads_stdlib(text: str) -> dict[str, Any]:
    """Parse JSON text into a dict with the standard library, or raise BadPayload."""
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_parse_float,
            parse_int=_parse_int,
        )
    except RecursionError:
        raise BadPayload(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:
        raise BadPayload("body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadPayload("body is not a JSON object")
    if _scan(value, MAX_DEPTH)[0] > MAX_DEPTH:
        raise BadPayload(f"nested deeper than {MAX_DEPTH} levels")
    return _storable_strings(text, value)


def _storable_strings(text: str, value: dict[str, Any]) -> dict[str, Any]:
    # Only a \u escape can put U+0000 or a lone surrogate in a string: raw control
    # characters are invalid JSON, and the text itself came from strict UTF-8. So
    # the walk over every string runs only for the bodies that have such escapes.
    if _UNSTORABLE_ESCAPE.search(text):
        cleaned: dict[str, Any] = _clean(value)
        return cleaned
    return value


def json_text(content_type: str | None, body: bytes) -> str:
    """The JSON text a webhook body carries, according to its content type."""
    kind = media_type(content_type)
    if kind == JSON:
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadPayload("body is not UTF-8") from None
    if kind == FORM:
        if body.count(b"&") >= MAX_FORM_FIELDS:
            raise BadPayload(f"form body has more than {MAX_FORM_FIELDS} fields; GitHub sends one, 'payload'")
        try:
            fields = parse_qs(body.decode("ascii"), strict_parsing=False, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise BadPayload("form body is not valid URL encoding") from None
        values = fields.get("payload")
        if not values or len(values) != 1:
            raise BadPayload("form body needs exactly one 'payload' field")
        return values[0]
    raise UnsupportedMediaType(kind or "none")
