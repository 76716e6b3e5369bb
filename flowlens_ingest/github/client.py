"""A small client of GitHub's REST API: a pull request's file list, with App or token authentication.

It never sleeps and never retries a failed request by itself (except one re-mint of a rejected
installation token): rate limits and server errors come back as typed exceptions carrying what the
caller needs to reschedule its job. No secret (token, JWT, private key) ever goes into a log line
or an exception message.

Every request is bounded, whatever the server does: a deadline for the whole exchange, a byte cap
on each answer (checked as it streams in), and at most 3,000 file entries ever held. A list cut by
one of these says so (`FilesPage.truncated`).
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, NoReturn, Self
from urllib.parse import quote, urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from flowlens_ingest.github.files import MAX_FILES

DEFAULT_API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
PER_PAGE = 100
# With `per_page=100`, 30 pages hold GitHub's 3,000 files; the higher bound only guards against
# a server that ignores `per_page` or links pages in a loop.
MAX_PAGES = 100
# Each request: connected within 5 s, never silent for more than 10 s (GitHub itself ends a request
# it takes more than 10 s to process: https://docs.github.com/en/rest/using-the-rest-api/troubleshooting-the-rest-api#timeouts),
# and the whole exchange, answer included, over within 30 s. httpx's timeouts are per socket
# operation: a server trickling a byte at a time never trips them, the deadline does.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
REQUEST_DEADLINE_S = 30.0
# An answer is read up to 16 MiB. A page holds at most 100 entries, and GitHub cuts a pull
# request's diff at 1 MB of raw diff data (500 KB for one file) "for both GitHub and the API":
# https://docs.github.com/en/repositories/creating-and-managing-repositories/repository-limits#diff-limits
# so a real page, patches and metadata, stays within a few MiB. A longer one is cut there.
MAX_PAGE_BYTES = 16 * 1024 * 1024
# A whole list is read up to 32 MiB: 3,000 entries of metadata are ~2.5 MB, plus the same 1 MB of
# patches. This bounds what the pages before the last hold in memory (100 pages of 16 MiB would not).
MAX_LIST_BYTES = 32 * 1024 * 1024
# Redirects (renamed or transferred repositories) are followed by hand, so a redirect's own body is
# never read: httpx would read it whole, without a cap.
MAX_REDIRECTS = 5
# Re-mint an installation token this long before GitHub says it expires, so a token never
# expires between our check and GitHub's.
TOKEN_REFRESH_MARGIN = 300.0
# Backdated against clock drift between us and GitHub; 540 s ahead keeps the whole JWT
# lifetime within GitHub's 10-minute limit.
JWT_BACKDATE = 60
JWT_LIFETIME = 540
# GitHub's advice when a secondary limit comes without `retry-after`: wait at least a minute.
SECONDARY_DEFAULT_WAIT = 60.0
# GitHub's primary window is an hour: a reset or `retry-after` further ahead is not believable, and
# would park the job and pause every claim for nothing. A reset already past (our clock ahead of
# GitHub's) waits a second, not a pause, and not a retry loop either.
MAX_RATE_WAIT_S = 3600.0
MIN_RATE_WAIT_S = 1.0
_MESSAGE_CHARS = 200
# JSON's whitespace, between the items of a page.
_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class GitHubError(Exception):
    """A failed call to GitHub; `reason` is a short, bounded label for metrics and logs."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.status = status


class RateLimited(GitHubError):
    """GitHub asked us to wait: retry no earlier than `retry_at` (epoch seconds)."""

    def __init__(self, retry_at: float, reason: Literal["primary", "secondary"], *, status: int | None = None) -> None:
        super().__init__(f"GitHub {reason} rate limit: retry at {retry_at:.0f}", reason=reason, status=status)
        self.retry_at = retry_at


class NotFound(GitHubError):
    """The repository or pull request does not exist, or is gone (404, 410)."""

    reason = "not_found"


class Forbidden(GitHubError):
    """No access: GitHub refused (403 without a rate-limit sign) or we hold no credential for the repository."""

    reason = "forbidden"


class Transient(GitHubError):
    """A failure worth retrying later: 5xx, timeout, connection error, unreadable answer."""

    def __init__(self, reason: str, message: str | None = None, *, status: int | None = None) -> None:
        super().__init__(message or f"GitHub request failed: {reason}", reason=reason, status=status)


class Unauthorized(GitHubError):
    """GitHub rejected our credential (a bad token, or an installation token refused even after a re-mint)."""

    reason = "unauthorized"


@dataclass(frozen=True)
class RateLimit:
    """The primary rate-limit headers of the latest response (None where absent, e.g. on GHES with limits off)."""

    remaining: int | None
    reset: float | None
    limit: int | None


@dataclass(frozen=True)
class FilesPage:
    """A pull request's file entries (every page), or `not_modified` when the ETag still matched.

    `truncated`: the list was cut while reading (more than 3,000 entries, an answer over the byte
    cap, the page limit), so it is not the whole list.
    """

    entries: list[dict[str, Any]]
    etag: str | None
    not_modified: bool
    requests: int
    truncated: bool = False


@dataclass(frozen=True)
class _Answer:
    """One response: its status, headers, `Link: rel="next"` and body (decoded, cut at the byte cap when `cut`)."""

    status_code: int
    headers: httpx.Headers
    next_url: str | None
    body: bytes
    cut: bool


@dataclass(frozen=True)
class _CachedToken:
    token: str
    expires_at: float


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


def _retry_after_seconds(value: str, now: float) -> float | None:
    """`retry-after` as seconds from `now`: GitHub sends an integer, HTTP also allows a date. None if unreadable."""
    seconds = _finite(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
        return when.timestamp() - now
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def _retry_at(now: float, wait: float) -> float:
    """`now + wait`, the wait held between MIN_RATE_WAIT_S and MAX_RATE_WAIT_S whatever the header said."""
    return now + min(max(wait, MIN_RATE_WAIT_S), MAX_RATE_WAIT_S)


def _message(answer: _Answer) -> str:
    """GitHub's `message` of an error answer, shortened; empty when the body says none."""
    try:
        body = json.loads(answer.body)
    except ValueError:
        return ""
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:_MESSAGE_CHARS]
    return ""


def _decoder(encoding: str | None) -> Callable[[bytes, int], bytes]:
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


def _entries(answer: _Answer, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """The file entries (objects) of a page, at most `limit`; and whether they are all of the page's.

    The JSON array is read one item at a time, so a page far longer than `limit` (a server
    ignoring `per_page`) never becomes that many objects in memory. A body cut at the byte cap
    ends inside an item: the items before it are whole, and kept.
    """
    # A cut body may also end inside a UTF-8 character: that item is incomplete, and dropped, anyway.
    text = answer.body.decode("utf-8", "replace" if answer.cut else "strict")
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


def _load_app_key(private_key: str) -> RSAPrivateKey:
    # Keys pasted into one-line environment variables often arrive with literal `\n`.
    if "\n" not in private_key.strip() and "\\n" in private_key:
        private_key = private_key.replace("\\n", "\n")
    try:
        key = load_pem_private_key(private_key.strip().encode(), password=None)
    except (ValueError, TypeError):
        # `from None`: whatever the parser says stays out of tracebacks next to the key.
        raise ValueError("the GitHub App private key is not a readable unencrypted PEM key") from None
    if isinstance(key, RSAPrivateKey):
        return key
    # GitHub Apps sign with RS256: an EC or Ed25519 key is a configuration mistake, not a type error.
    raise ValueError("the GitHub App private key is not an RSA key")


class GitHubClient:
    """GitHub REST client for the files enrichment: App installation tokens or a token, typed errors, no sleeping.

    `timeout` (the longest silence), `connect_timeout`, `deadline` (a whole request), `max_page_bytes`
    (one answer) and `max_list_bytes` (a whole list) default to the module's constants; tests make them small.
    """

    def __init__(
        self,
        *,
        api_url: str = DEFAULT_API_URL,
        token: str | None = None,
        app_id: int | str | None = None,
        private_key: str | None = None,
        client: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float = READ_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        deadline: float = REQUEST_DEADLINE_S,
        max_page_bytes: int = MAX_PAGE_BYTES,
        max_list_bytes: int = MAX_LIST_BYTES,
    ) -> None:
        if min(timeout, connect_timeout, deadline) <= 0 or min(max_page_bytes, max_list_bytes) <= 0:
            raise ValueError("timeouts, deadline and byte caps must be positive")
        # No single wait is longer than the whole request may take. Passed with every request,
        # so a caller's own httpx client is bounded too.
        self._timeouts = httpx.Timeout(min(timeout, deadline), connect=min(connect_timeout, deadline))
        self.deadline = deadline
        self.max_page_bytes = max_page_bytes
        self.max_list_bytes = max_list_bytes
        self.api_url = api_url.rstrip("/")
        self._origin = self._origin_of(self.api_url)
        self._token = token or None
        if (app_id is None or app_id == "") != (not private_key):
            raise ValueError("a GitHub App needs both an app id and a private key")
        self.app_id = str(app_id) if app_id not in (None, "") else None
        self._app_key = _load_app_key(private_key) if private_key else None
        self._clock = clock
        self._own_client = client is None
        self._http = client or httpx.Client(
            timeout=self._timeouts,
            headers={"User-Agent": "flowlens-ingest", "Accept": "application/vnd.github+json"},
        )
        self._lock = threading.Lock()
        self._tokens: dict[int, _CachedToken] = {}
        # One lock per installation, so a slow mint for one does not hold up the others,
        # and threads needing the same token mint it once.
        self._mint_locks: dict[int, threading.Lock] = {}
        self._rate_limit = RateLimit(remaining=None, reset=None, limit=None)

    # -- configuration --------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether any credential (a token or a GitHub App) is configured."""
        return self._token is not None or self._app_key is not None

    def describe(self) -> str:
        """The configured credential, for a start-up log line: never the secret itself."""
        if self._app_key is not None:
            return f"GitHub App {self.app_id}" + (", token fallback" if self._token else "")
        return "token" if self._token else "none"

    def __repr__(self) -> str:
        return f"GitHubClient({self.api_url!r}, {self.describe()})"

    def close(self) -> None:
        """Close the HTTP connection pool, if this client created it."""
        if self._own_client:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- rate limits ------------------------------------------------------------------------

    @property
    def rate_limit(self) -> RateLimit:
        """The primary rate-limit headers of the latest files response."""
        with self._lock:
            return self._rate_limit

    def reserve_exhausted(self, reserve: int) -> float | None:
        """The reset time (at most an hour ahead) when fewer than `reserve` requests remain until a future reset; else None."""
        limit = self.rate_limit
        if limit.remaining is None or limit.reset is None:
            return None
        now = self._clock()
        if limit.remaining < reserve and limit.reset > now:
            return min(limit.reset, now + MAX_RATE_WAIT_S)
        return None

    def _record_rate_limit(self, headers: httpx.Headers) -> None:
        remaining = _header_number(headers, "x-ratelimit-remaining")
        limit = _header_number(headers, "x-ratelimit-limit")
        if remaining is None and limit is None:
            # An answer from a proxy or load balancer (a bare 502) says nothing of the budget:
            # keep what GitHub last told us.
            return
        observed = RateLimit(
            remaining=None if remaining is None else int(remaining),
            reset=_header_number(headers, "x-ratelimit-reset"),
            limit=None if limit is None else int(limit),
        )
        with self._lock:
            self._rate_limit = observed

    # -- App authentication -----------------------------------------------------------------

    def _jwt(self) -> str:
        """A short-lived JWT identifying the App, to mint installation tokens with."""
        if self._app_key is None or self.app_id is None:
            raise Forbidden("no GitHub App configured", reason="no_credential")
        now = int(self._clock())
        claims = {"iat": now - JWT_BACKDATE, "exp": now + JWT_LIFETIME, "iss": self.app_id}
        return jwt.encode(claims, self._app_key, algorithm="RS256")

    def installation_token(self, installation_id: int) -> str:
        """An installation access token, minted by the App and cached until 5 minutes before it expires."""
        with self._lock:
            mint_lock = self._mint_locks.setdefault(installation_id, threading.Lock())
        with mint_lock:
            with self._lock:
                cached = self._tokens.get(installation_id)
            if cached is not None and self._clock() < cached.expires_at - TOKEN_REFRESH_MARGIN:
                return cached.token
            fresh = self._mint(installation_id)
            with self._lock:
                self._tokens[installation_id] = fresh
            return fresh.token

    def _forget_token(self, installation_id: int, token: str) -> None:
        with self._lock:
            cached = self._tokens.get(installation_id)
            # Only the rejected token: another thread may already have minted a good one.
            if cached is not None and cached.token == token:
                del self._tokens[installation_id]

    def _mint(self, installation_id: int) -> _CachedToken:
        url = f"{self.api_url}/app/installations/{int(installation_id)}/access_tokens"
        answer = self._send("POST", url, {"Authorization": f"Bearer {self._jwt()}"}, self.max_page_bytes)
        # Not recorded in `rate_limit`: App (JWT) requests draw on another budget than the installation's.
        if answer.status_code == 401:
            raise Unauthorized("GitHub rejected the App's JWT (wrong key, app id or clock)", status=401)
        if answer.status_code == 404:
            raise Forbidden("the GitHub App installation was not found", reason="no_installation", status=404)
        if answer.status_code not in (200, 201):
            self._raise_for(answer)
        try:
            body = json.loads(answer.body)
            token = body["token"]
            expiry = datetime.fromisoformat(body["expires_at"])
            # GitHub writes UTC ("…Z"); a stamp without zone is read as UTC too, never as local time.
            expires_at = (expiry if expiry.tzinfo else expiry.replace(tzinfo=UTC)).timestamp()
        except (ValueError, KeyError, TypeError):
            raise Transient("bad_json", "GitHub's installation token answer was unreadable", status=200) from None
        if not isinstance(token, str) or not token:
            raise Transient("bad_json", "GitHub's installation token answer had no token", status=200)
        return _CachedToken(token=token, expires_at=expires_at)

    def _credential(self, installation_id: int | None) -> tuple[str, int | None]:
        """The token to send, and the installation it belongs to (None for the plain token)."""
        if self._app_key is not None and installation_id is not None:
            return self.installation_token(installation_id), installation_id
        if self._token is not None:
            return self._token, None
        raise Forbidden("no credential for this repository", reason="no_credential")

    # -- requests ---------------------------------------------------------------------------

    @staticmethod
    def _origin_of(url: str) -> tuple[str, str]:
        parts = urlsplit(url)
        return parts.scheme.lower(), parts.netloc.lower()

    def _send(self, method: str, url: str, headers: dict[str, str], max_bytes: int) -> _Answer:
        """One HTTP exchange within the deadline, its body read up to `max_bytes`.

        Transport failures become `Transient` without the request (and its headers) attached.
        """
        headers = {
            "Accept": "application/vnd.github+json",
            "Accept-Encoding": "gzip",
            "X-GitHub-Api-Version": API_VERSION,
            **headers,
        }
        deadline = time.monotonic() + self.deadline
        request = self._http.build_request(method, url, headers=headers, timeout=self._timeouts)
        try:
            for _ in range(MAX_REDIRECTS + 1):
                self._check_deadline(deadline)
                response = self._http.send(request, stream=True, follow_redirects=False)
                try:
                    if response.next_request is None:
                        body, cut = self._read_body(response, max_bytes, deadline)
                        next_link = response.links.get("next")
                        next_url = next_link.get("url") if next_link else None
                        return _Answer(response.status_code, response.headers, next_url, body, cut)
                    # Redirects stay on GitHub (renamed or transferred repositories); httpx drops
                    # `Authorization` should one ever lead to another host.
                    request = response.next_request
                finally:
                    response.close()
            raise GitHubError("GitHub redirected too many times", reason="redirects")
        except httpx.TimeoutException as exc:
            failure = Transient("timeout", f"GitHub request timed out ({type(exc).__name__})")
        except httpx.TransportError as exc:
            failure = Transient("connection", f"GitHub unreachable ({type(exc).__name__}: {exc})")
        except httpx.RequestError as exc:
            failure = Transient("request", f"GitHub request failed ({type(exc).__name__}: {exc})")
        # Raised outside the `except`: the httpx exception holds the request, headers included.
        raise failure

    def _check_deadline(self, deadline: float) -> None:
        """Raise `Transient` once the request's deadline (a `time.monotonic()` value) has passed."""
        if time.monotonic() > deadline:
            raise Transient("timeout", f"GitHub request timed out (over its {self.deadline:g} s deadline)")

    def _read_body(self, response: httpx.Response, max_bytes: int, deadline: float) -> tuple[bytes, bool]:
        """The body, decoded, up to `max_bytes`, and whether there was more; `Transient` past the deadline."""
        decode = _decoder(response.headers.get("content-encoding"))
        body = bytearray()
        # Raw chunks, as the network delivers them: the deadline is checked on each.
        for chunk in response.iter_raw():
            self._check_deadline(deadline)
            try:
                body += decode(chunk, max_bytes + 1 - len(body))
            except zlib.error:
                raise Transient("bad_encoding", "GitHub's gzip answer was unreadable") from None
            if len(body) > max_bytes:
                del body[max_bytes:]
                return bytes(body), True
        return bytes(body), False

    def _get(
        self, url: str, installation_id: int | None, headers: dict[str, str], max_bytes: int
    ) -> tuple[_Answer, int]:
        """GET with our credential, re-minting a rejected installation token once; the answer and the GETs sent."""
        credential, installation = self._credential(installation_id)
        answer = self._send("GET", url, {**headers, "Authorization": f"Bearer {credential}"}, max_bytes)
        self._record_rate_limit(answer.headers)
        if answer.status_code != 401 or installation is None:
            return answer, 1
        # Revoked, or expired earlier than announced: mint once more, then give up.
        self._forget_token(installation, credential)
        credential, _ = self._credential(installation)
        answer = self._send("GET", url, {**headers, "Authorization": f"Bearer {credential}"}, max_bytes)
        self._record_rate_limit(answer.headers)
        return answer, 2

    def _raise_for(self, answer: _Answer) -> NoReturn:
        """Turn an unsuccessful answer into the matching `GitHubError`."""
        status = answer.status_code
        now = self._clock()
        if status in (403, 429):
            message = _message(answer).lower()
            if answer.headers.get("x-ratelimit-remaining", "").strip() == "0":
                reset = _header_number(answer.headers, "x-ratelimit-reset")
                wait = SECONDARY_DEFAULT_WAIT if reset is None else reset - now
                raise RateLimited(_retry_at(now, wait), "primary", status=status)
            retry_after = answer.headers.get("retry-after")
            if retry_after is not None:
                # Present but unreadable ("soon"): still GitHub asking us to wait, so we wait its minute.
                seconds = _retry_after_seconds(retry_after, now)
                wait = SECONDARY_DEFAULT_WAIT if seconds is None else seconds
                raise RateLimited(_retry_at(now, wait), "secondary", status=status)
            if status == 429 or "secondary rate limit" in message or "abuse detection" in message:
                raise RateLimited(_retry_at(now, SECONDARY_DEFAULT_WAIT), "secondary", status=status)
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

    # -- the files list ---------------------------------------------------------------------

    def list_files(
        self, full_name: str, number: int, *, installation_id: int | None, etag: str | None = None
    ) -> FilesPage:
        """Every file entry of a pull request (up to GitHub's 3,000), following `Link: rel="next"` pages."""
        owner, _, repo = full_name.partition("/")
        if not owner or not repo or "/" in repo:
            raise ValueError(f"not an owner/repo name: {full_name!r}")
        url: str | None = (
            f"{self.api_url}/repos/{quote(owner, safe='')}/{quote(repo, safe='')}"
            f"/pulls/{int(number)}/files?per_page={PER_PAGE}"
        )
        entries: list[dict[str, Any]] = []
        first_etag: str | None = None
        requests = 0
        pages = 0
        budget = self.max_list_bytes
        truncated = False
        seen: set[str] = set()
        while url is not None:
            if len(entries) >= MAX_FILES or pages >= MAX_PAGES or budget <= 0:
                # A next page is announced, but the list already holds all we take: GitHub's
                # 3,000-file cap, a server ignoring `per_page` or linking pages without end.
                truncated = True
                break
            seen.add(url)
            headers = {"If-None-Match": etag} if etag and pages == 0 else {}
            answer, sent = self._get(url, installation_id, headers, min(self.max_page_bytes, budget))
            requests += sent
            if pages == 0 and answer.status_code == 304:
                # A 304 does not count against the primary limit: the cheap way to re-check a list.
                return FilesPage(
                    entries=[], etag=answer.headers.get("etag") or etag, not_modified=True, requests=requests
                )
            if answer.status_code != 200:
                self._raise_for(answer)
            budget -= len(answer.body)
            page, whole = _entries(answer, MAX_FILES - len(entries))
            if pages == 0:
                first_etag = answer.headers.get("etag")
            pages += 1
            entries.extend(page)
            if not whole:
                # More entries than we take, or an answer cut at the byte cap: later pages
                # would leave a hole in the list, so the list ends here, flagged.
                truncated = True
                break
            url = self._next_url(answer, seen) if page else None
        if truncated or pages > 1 or len(entries) >= PER_PAGE:
            # GitHub's ETag covers the body of one page. A 304 on page 1 says nothing about
            # later pages (a file changed or added past the first 100), so it would hide a
            # change: only a whole list that fits on one, not full, page gets an ETag to re-check with.
            first_etag = None
        return FilesPage(entries=entries, etag=first_etag, not_modified=False, requests=requests, truncated=truncated)

    def _next_url(self, answer: _Answer, seen: set[str]) -> str | None:
        """The `rel="next"` page to fetch, exactly as GitHub gave it (it may use the `/repositories/{id}/` form)."""
        url = answer.next_url
        if not url or url in seen:
            return None
        if self._origin_of(url) != self._origin:
            # Our token goes with every page: never send it to a host other than the API's.
            raise GitHubError("GitHub linked the next page to another host", reason="bad_link")
        return url
