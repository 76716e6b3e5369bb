"""The JSON answers of every route: small objects, written one way, never a stack trace or a payload."""

from __future__ import annotations

import json
from collections.abc import Mapping

from flask import Response

# Keys sorted, compact, a newline at the end: as Flask's jsonify writes them, by one encoder
# built once (jsonify looks up the app's JSON provider and builds one on every call).
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def answer(body: Mapping[str, object], status: int = 200, **headers: str) -> Response:
    """A JSON answer with this status and these extra headers."""
    return Response(_ENCODE(body) + "\n", status, headers or None, mimetype="application/json")


def error(status: int, message: str, **headers: str) -> Response:
    """A JSON error answer: `{"error": message}`."""
    return answer({"error": message}, status, **headers)
