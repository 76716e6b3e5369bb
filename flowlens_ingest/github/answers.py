"""Reading GitHub's answers, with no I/O of its own: what one HTTP exchange brought back and what it means.

`Answer` (one response, its body already read within its byte cap), `body_decoder` (the chunks of a
body decoded within that cap), `file_entries` (a file list's JSON array read one item at a time),
`rate_limit_of` (the primary rate-limit headers) and `raise_for` (the typed error an unsuccessful
answer means, with the wait a rate limit asks for).

GitHub's times (`x-ratelimit-reset`, a `retry-after` date) are read against GitHub's own clock, its
`Date` header: how long GitHub asks us to wait does not depend on how far our clock is from its.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any, NoReturn

import httpx

from flowlens_ingest.events.parse import MAX_DEPTH, too_deep
from flowlens_ingest.github.errors import Forbidden, GitHubError, NotFound, RateLimited, Transient, Unauthorized

# GitHub's advice when a secondary limit comes without `retry-after`: wait at least a minute.
SECONDARY_DEFAULT_WAIT = 60.0
# GitHub's primary window is an hour: a reset or `retry-after` further ahead is not believable, and
# would park the job and pause every claim for nothing. A reset already past by GitHub's own clock
# waits a second, not a pause, and not a retry loop either.
MAX_RATE_WAIT_S = 3600.0
MIN_RATE_WAIT_S = 1.0
_MESSAGE_CHARS = 200
# JSON's whitespace, between the items of a page.
_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# An answer nested deeper than this is refused, nothing built from it: twice what a delivery may be
# (parse.MAX_DEPTH), where a delivery's payload sits two levels down in its log entry; far deeper
# than any answer GitHub gives, and shallow enough to be written out again as JSON (backfill,
# `recover --fetch`), where past Python's recursion limit it could not be.
MAX_ANSWER_DEPTH = 2 * MAX_DEPTH


@dataclass(frozen=True)
class Answer:
    """One response: its status, headers, `Link: rel="next"` and body (decoded, cut at the byte cap when `cut`)."""

    status_code: int
    headers: httpx.Headers
    next_url: str | None
    body: bytes
    cut: bool


@dataclass(frozen=True)
class RateLimit:
    """The primary rate-limit headers of the latest response (None where absent, e.g. on GHES with limits off)."""

    remaining: int | None
    # When the window resets, on our clock: GitHub's epoch moved by how far its clock is from ours.
    reset: float | None
    limit: int | None


def _finite(value: str) -> float | None:
    """A header's number; None when it is not one, or not finite (`nan`, `inf`)."""
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _header_number(headers: httpx.Headers, name: str) -> float | None:
    value = headers.get(name)
    return None if value is None else _finite(value)


def _http_date(value: str) -> float | None:
    """An HTTP date (`Sun, 06 Dec 2026 10:00:00 GMT`) as epoch seconds; None when unreadable."""
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
        # A date without a zone ("-0000") is GMT in HTTP, never local time.
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def github_now(headers: httpx.Headers, now: float) -> float:
    """GitHub's clock when it answered, by its `Date` header; our own `now` when it sent none we can read."""
    value = headers.get("date")
    when = None if value is None else _http_date(value)
    return now if when is None else when


def rate_limit_of(headers: httpx.Headers, now: float) -> RateLimit | None:
    """The primary rate-limit headers of an answer received at `now` (our clock); None when it carries none."""
    remaining = _header_number(headers, "x-ratelimit-remaining")
    limit = _header_number(headers, "x-ratelimit-limit")
    if remaining is None and limit is None:
        # An answer from a proxy or load balancer (a bare 502) says nothing of the budget.
        return None
    reset = _header_number(headers, "x-ratelimit-reset")
    return RateLimit(
        remaining=None if remaining is None else int(remaining),
        reset=None if reset is None else now + (reset - github_now(headers, now)),
        limit=None if limit is None else int(limit),
    )


def _retry_after_seconds(value: str, headers: httpx.Headers, now: float) -> float | None:
    """`retry-after` in seconds: GitHub sends an integer, HTTP also allows a date (read on GitHub's clock). None if unreadable."""
    seconds = _finite(value)
    if seconds is not None:
        return seconds
    when = _http_date(value)
    return None if when is None else when - github_now(headers, now)


class TooDeep(ValueError):
    """A JSON answer nested past MAX_ANSWER_DEPTH, or past what Python's parser recurses into."""


def json_of(data: bytes | str) -> Any:
    """GitHub's JSON text as Python; ValueError when it is not JSON, TooDeep when nested too deep to use.

    Its size is bounded by the byte cap of the answer it came in. Nesting past what Python's parser
    recurses into (RecursionError, not a ValueError) is refused like any other unreadable answer.
    """
    try:
        value = json.loads(data)
    except RecursionError:
        raise TooDeep("GitHub's answer nested deeper than JSON is read") from None
    if too_deep(value, MAX_ANSWER_DEPTH):
        raise TooDeep(f"GitHub's answer nested deeper than {MAX_ANSWER_DEPTH} levels")
    return value


def _retry_at(now: float, wait: float) -> float:
    """`now + wait`, the wait held between MIN_RATE_WAIT_S and MAX_RATE_WAIT_S whatever the header said."""
    return now + min(max(wait, MIN_RATE_WAIT_S), MAX_RATE_WAIT_S)


def _message(answer: Answer) -> str:
    """GitHub's `message` of an error answer, shortened; empty when the body says none."""
    try:
        body = json_of(answer.body)
    except ValueError:
        return ""
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:_MESSAGE_CHARS]
    return ""


# What httpx follows (a 304 is no redirect: an answer, and no limit).
REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _none_left(headers: httpx.Headers) -> bool:
    """The primary budget is spent: `x-ratelimit-remaining: 0`."""
    remaining: str = headers.get("x-ratelimit-remaining", "")
    return remaining.strip() == "0"


def says_wait(headers: httpx.Headers) -> bool:
    """Whether an answer's headers ask for a wait before the next request: no request left, or `retry-after`."""
    return _none_left(headers) or "retry-after" in headers


def rate_limited(answer: Answer, now: float) -> RateLimited | None:
    """The rate limit a 403 or 429 answer means (primary or secondary), with its `retry_at` from `now`; else None.

    A redirect that says wait (not followed, client.py) is one too: following it would be a request.
    """
    limited = rate_limited_by_head(answer.status_code, answer.headers, now)
    if limited is not None or answer.status_code != 403:
        return limited
    message = _message(answer).lower()
    if "secondary rate limit" in message or "abuse detection" in message:
        return RateLimited(_retry_at(now, SECONDARY_DEFAULT_WAIT), "secondary", status=403)
    if "rate limit" in message:
        # "API rate limit exceeded for …" with its headers gone (a proxy stripped them): still the
        # primary limit, and no reset to wait for, so GitHub's minute.
        return RateLimited(_retry_at(now, SECONDARY_DEFAULT_WAIT), "primary", status=403)
    return None


def rate_limited_by_head(status: int, headers: httpx.Headers, now: float) -> RateLimited | None:
    """The wait the status line and headers alone say (all but a 403 that names it only in its body); else None.

    A rate limit (403, 429, a redirect that says wait), or a 5xx with `retry-after` (`unavailable`).

    Known before the body is read: a body that then fails to arrive does not lose the wait.
    """
    unavailable = status >= 500 and "retry-after" in headers
    if status not in (403, 429) and not unavailable and not (status in REDIRECTS and says_wait(headers)):
        return None
    retry_after = headers.get("retry-after")
    asked = None
    if retry_after is not None:
        asked = _retry_after_seconds(retry_after, headers, now)
        if asked is None:
            # Present but unreadable ("soon"): still GitHub asking us to wait, so we wait its minute.
            asked = SECONDARY_DEFAULT_WAIT
    if _none_left(headers):
        reset = _header_number(headers, "x-ratelimit-reset")
        wait = SECONDARY_DEFAULT_WAIT if reset is None else reset - github_now(headers, now)
        # Both said: the longer holds.
        return RateLimited(_retry_at(now, wait if asked is None else max(wait, asked)), "primary", status=status)
    if asked is not None:
        # A 5xx with `retry-after` is GitHub (or its front) saying when to come back: a wait like a limit's.
        return RateLimited(_retry_at(now, asked), "unavailable" if unavailable else "secondary", status=status)
    if status == 429:
        return RateLimited(_retry_at(now, SECONDARY_DEFAULT_WAIT), "secondary", status=status)
    return None


def raise_for(answer: Answer, now: float) -> NoReturn:
    """Turn an unsuccessful answer into the matching `GitHubError`; a rate limit's `retry_at` counts from `now`."""
    status = answer.status_code
    limited = rate_limited(answer, now)
    if limited is not None:
        raise limited
    if status == 403:
        raise Forbidden(f"GitHub refused access (403): {_message(answer) or 'no message'}", status=status)
    if status in (404, 410):
        raise NotFound(f"GitHub answered {status}: {_message(answer) or 'not found'}", status=status)
    if status == 401:
        raise Unauthorized("GitHub rejected the credential (401)", status=status)
    if status >= 500:
        raise Transient("server_error", f"GitHub answered {status}", status=status)
    raise GitHubError(
        f"GitHub answered {status}: {_message(answer) or 'unexpected status'}",
        reason="unexpected_status",
        status=status,
    )


def body_decoder(encoding: str | None) -> Callable[[bytes, int], bytes]:
    """Decode a body's chunks into at most `limit` bytes each: identity, or gzip (the one encoding we accept).

    Decoding here rather than in httpx keeps a gzip bomb to the byte cap, and lets the deadline be
    checked on every chunk the network delivers, even one that decodes to nothing.
    """
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return lambda data, limit: data[:limit]
    if encoding == "gzip":
        inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        return inflater.decompress
    raise Transient("bad_encoding", "GitHub answered in an encoding we did not ask for")


def _skip_space(text: str, index: int) -> int:
    """The index of the first character at or after `index` that is not JSON whitespace."""
    match = _SPACE.match(text, index)
    return match.end() if match else index


def file_entries(answer: Answer, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """The file entries (objects) of a page, at most `limit`; and whether they are all of the page's.

    The JSON array is read one item at a time, so a page far longer than `limit` (a server
    ignoring `per_page`) never becomes that many objects in memory. A body cut at the byte cap
    ends inside an item: the items before it are whole, and kept.
    """
    # A cut body may also end inside a UTF-8 character: that item is incomplete, and dropped, anyway.
    try:
        text = answer.body.decode("utf-8", "replace" if answer.cut else "strict")
    except UnicodeDecodeError:
        raise Transient("bad_json", "GitHub's file list was not UTF-8", status=200) from None
    entries: list[dict[str, Any]] = []
    index = _skip_space(text, 0)
    if not text.startswith("[", index):
        raise Transient("bad_json", "GitHub's file list was not a JSON array", status=200)
    index = _skip_space(text, index + 1)
    if text.startswith("]", index):
        return entries, True
    while True:
        try:
            item, index = _DECODER.raw_decode(text, index)
        except json.JSONDecodeError:
            if answer.cut:
                return entries, False
            raise Transient("bad_json", "GitHub's file list was not JSON", status=200) from None
        except RecursionError:
            raise Transient("too_deep", "GitHub's file list nested deeper than JSON is read", status=200) from None
        # Anything but an object is noise from a misbehaving server: skipped, not counted.
        if isinstance(item, dict):
            if len(entries) == limit:
                return entries, False
            entries.append(item)
        index = _skip_space(text, index)
        if text.startswith(",", index):
            index = _skip_space(text, index + 1)
        elif text.startswith("]", index):
            return entries, True
        elif answer.cut and index == len(text):
            return entries, False
        else:
            raise Transient("bad_json", "GitHub's file list was not JSON", status=200)
