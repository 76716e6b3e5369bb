"""Raw request body to a JSON object, refusing what PostgreSQL could not store faithfully.

GitHub sends `application/json`, or `application/x-www-form-urlencoded` with the
JSON in a `payload` field, depending on the hook's content type setting.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"

MAX_DEPTH = 64
# BIGINT is the widest integer column; GitHub ids fit comfortably below it.
MAX_INT = 2**63 - 1


class UnsupportedMediaType(Exception):
    """The content type is neither JSON nor GitHub's form encoding."""


class BadPayload(Exception):
    """The body is not a JSON object this service can store; the message is safe to show."""


def media_type(content_type: str | None) -> str:
    """The bare media type of a Content-Type header, lower case."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _reject_constant(name: str) -> None:
    raise BadPayload(f"non-standard JSON constant {name}")


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise BadPayload("number out of range")
    return value


def _parse_int(text: str) -> int:
    # Python would happily build a 4000-digit integer; PostgreSQL columns would not.
    if len(text) > 20:
        raise BadPayload("number out of range")
    value = int(text)
    if not -MAX_INT - 1 <= value <= MAX_INT:
        raise BadPayload("number out of range")
    return value


def _check_strings(value: Any) -> None:
    """Reject strings (values or keys) PostgreSQL cannot hold."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                _check_text(key)
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            _check_text(item)


def _check_text(text: str) -> None:
    # PostgreSQL text and jsonb cannot store U+0000, and lone surrogates are not UTF-8.
    if "\x00" in text:
        raise BadPayload("string contains U+0000, which PostgreSQL cannot store")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadPayload("string contains an unpaired surrogate") from None


def depth(value: Any) -> int:
    """How deeply containers nest in a parsed JSON value (an object of scalars is 1)."""
    deepest = 0
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def loads(text: str) -> dict[str, Any]:
    """Parse JSON text into a dict, or raise BadPayload."""
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
    if depth(value) > MAX_DEPTH:
        raise BadPayload(f"nested deeper than {MAX_DEPTH} levels")
    # Only a \u escape can put U+0000 or a lone surrogate in a string: raw control
    # characters are invalid JSON, and the text itself came from strict UTF-8. So
    # the walk over every string runs only for the rare body that has escapes.
    if "\\u" in text:
        _check_strings(value)
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
        try:
            fields = parse_qs(body.decode("ascii"), strict_parsing=False, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise BadPayload("form body is not valid URL encoding") from None
        values = fields.get("payload")
        if not values or len(values) != 1:
            raise BadPayload("form body needs exactly one 'payload' field")
        return values[0]
    raise UnsupportedMediaType(kind or "none")
