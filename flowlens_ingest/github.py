"""A small client of GitHub's REST API: a pull request's file list, with App or token authentication.

It never sleeps and never retries a failed request by itself (except one re-mint of a rejected
installation token): rate limits and server errors come back as typed exceptions carrying what the
caller needs to reschedule its job. No secret (token, JWT, private key) ever goes into a log line
or an exception message.
"""

from __future__ import annotations

import email.utils
import threading
import time
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

from .files import MAX_FILES

DEFAULT_API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
PER_PAGE = 100
# With `per_page=100`, 30 pages hold GitHub's 3,000 files; the higher bound only guards against
# a server that ignores `per_page` or links pages in a loop.
MAX_PAGES = 100
# Re-mint an installation token this long before GitHub says it expires, so a token never
# expires between our check and GitHub's.
TOKEN_REFRESH_MARGIN = 300.0
# Backdated against clock drift between us and GitHub; 540 s ahead keeps the whole JWT
# lifetime within GitHub's 10-minute limit.
JWT_BACKDATE = 60
JWT_LIFETIME = 540
# GitHub's advice when a secondary limit comes without `retry-after`: wait at least a minute.
SECONDARY_DEFAULT_WAIT = 60.0
_MESSAGE_CHARS = 200


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
    """A pull request's file entries (every page), or `not_modified` when the ETag still matched."""

    entries: list[dict[str, Any]]
    etag: str | None
    not_modified: bool
    requests: int


@dataclass(frozen=True)
class _CachedToken:
    token: str
    expires_at: float


def _header_number(response: httpx.Response, name: str) -> float | None:
    value = response.headers.get(name)
    if value is None:
        return None
    try:
        return float(value.strip())
    except ValueError:
        return None


def _retry_after_seconds(value: str) -> float | None:
    """`retry-after` as seconds: GitHub sends an integer, HTTP also allows a date."""
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _message(response: httpx.Response) -> str:
    """GitHub's `message` of an error answer, shortened; empty when the body says none."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:_MESSAGE_CHARS]
    return ""


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
    """GitHub REST client for the files enrichment: App installation tokens or a token, typed errors, no sleeping."""

    def __init__(
        self,
        *,
        api_url: str = DEFAULT_API_URL,
        token: str | None = None,
        app_id: int | str | None = None,
        private_key: str | None = None,
        client: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float = 10.0,
    ) -> None:
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
            timeout=timeout,
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
        """The reset time when fewer than `reserve` requests remain until a future reset; else None."""
        limit = self.rate_limit
        if limit.remaining is None or limit.reset is None:
            return None
        if limit.remaining < reserve and limit.reset > self._clock():
            return limit.reset
        return None

    def _record_rate_limit(self, response: httpx.Response) -> None:
        remaining = _header_number(response, "x-ratelimit-remaining")
        limit = _header_number(response, "x-ratelimit-limit")
        if remaining is None and limit is None:
            # An answer from a proxy or load balancer (a bare 502) says nothing of the budget:
            # keep what GitHub last told us.
            return
        observed = RateLimit(
            remaining=None if remaining is None else int(remaining),
            reset=_header_number(response, "x-ratelimit-reset"),
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
        response = self._send("POST", url, {"Authorization": f"Bearer {self._jwt()}"})
        # Not recorded in `rate_limit`: App (JWT) requests draw on another budget than the installation's.
        if response.status_code == 401:
            raise Unauthorized("GitHub rejected the App's JWT (wrong key, app id or clock)", status=401)
        if response.status_code == 404:
            raise Forbidden("the GitHub App installation was not found", reason="no_installation", status=404)
        if response.status_code not in (200, 201):
            self._raise_for(response)
        try:
            body = response.json()
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

    def _send(self, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
        """One HTTP exchange; transport failures become `Transient` without the request (and its headers) attached."""
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": API_VERSION, **headers}
        try:
            # Redirects stay on GitHub (renamed or transferred repositories); httpx drops
            # `Authorization` should one ever lead to another host.
            return self._http.request(method, url, headers=headers, follow_redirects=True)
        except httpx.TimeoutException as exc:
            failure = Transient("timeout", f"GitHub request timed out ({type(exc).__name__})")
        except httpx.TransportError as exc:
            failure = Transient("connection", f"GitHub unreachable ({type(exc).__name__}: {exc})")
        except httpx.RequestError as exc:
            failure = Transient("request", f"GitHub request failed ({type(exc).__name__}: {exc})")
        # Raised outside the `except`: the httpx exception holds the request, headers included.
        raise failure

    def _get(self, url: str, installation_id: int | None, headers: dict[str, str]) -> tuple[httpx.Response, int]:
        """GET with our credential, re-minting a rejected installation token once; the response and the GETs sent."""
        credential, installation = self._credential(installation_id)
        response = self._send("GET", url, {**headers, "Authorization": f"Bearer {credential}"})
        self._record_rate_limit(response)
        if response.status_code != 401 or installation is None:
            return response, 1
        # Revoked, or expired earlier than announced: mint once more, then give up.
        self._forget_token(installation, credential)
        credential, _ = self._credential(installation)
        response = self._send("GET", url, {**headers, "Authorization": f"Bearer {credential}"})
        self._record_rate_limit(response)
        return response, 2

    def _raise_for(self, response: httpx.Response) -> NoReturn:
        """Turn an unsuccessful answer into the matching `GitHubError`."""
        status = response.status_code
        now = self._clock()
        if status in (403, 429):
            message = _message(response).lower()
            if response.headers.get("x-ratelimit-remaining", "").strip() == "0":
                reset = _header_number(response, "x-ratelimit-reset")
                raise RateLimited(
                    reset if reset is not None else now + SECONDARY_DEFAULT_WAIT, "primary", status=status
                )
            retry_after = response.headers.get("retry-after")
            wait = _retry_after_seconds(retry_after) if retry_after is not None else None
            if wait is not None:
                raise RateLimited(now + wait, "secondary", status=status)
            if status == 429 or "secondary rate limit" in message or "abuse detection" in message:
                raise RateLimited(now + SECONDARY_DEFAULT_WAIT, "secondary", status=status)
            raise Forbidden(f"GitHub refused access (403): {_message(response) or 'no message'}", status=status)
        if status in (404, 410):
            raise NotFound(f"GitHub answered {status}: {_message(response) or 'not found'}", status=status)
        if status == 401:
            raise Unauthorized("GitHub rejected the credential (401)", status=status)
        if status >= 500:
            raise Transient("server_error", f"GitHub answered {status}", status=status)
        raise GitHubError(
            f"GitHub answered {status}: {_message(response) or 'unexpected status'}",
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
        seen: set[str] = set()
        while url is not None and pages < MAX_PAGES and len(entries) < MAX_FILES:
            seen.add(url)
            headers = {"If-None-Match": etag} if etag and pages == 0 else {}
            response, sent = self._get(url, installation_id, headers)
            requests += sent
            if pages == 0 and response.status_code == 304:
                # A 304 does not count against the primary limit: the cheap way to re-check a list.
                return FilesPage(
                    entries=[], etag=response.headers.get("etag") or etag, not_modified=True, requests=requests
                )
            if response.status_code != 200:
                self._raise_for(response)
            try:
                page = response.json()
            except ValueError:
                raise Transient("bad_json", "GitHub's file list was not JSON", status=200) from None
            if not isinstance(page, list):
                raise Transient("bad_json", "GitHub's file list was not a JSON array", status=200)
            if pages == 0:
                first_etag = response.headers.get("etag")
            pages += 1
            entries.extend(item for item in page if isinstance(item, dict))
            url = self._next_url(response, seen) if page else None
        if pages > 1 or len(entries) >= PER_PAGE:
            # GitHub's ETag covers the body of one page. A 304 on page 1 says nothing about
            # later pages (a file changed or added past the first 100), so it would hide a
            # change: only a list that fits on one, not full, page gets an ETag to re-check with.
            first_etag = None
        return FilesPage(entries=entries[:MAX_FILES], etag=first_etag, not_modified=False, requests=requests)

    def _next_url(self, response: httpx.Response, seen: set[str]) -> str | None:
        """The `rel="next"` page to fetch, exactly as GitHub gave it (it may use the `/repositories/{id}/` form)."""
        link = response.links.get("next")
        url = link.get("url") if link else None
        if not url or url in seen:
            return None
        if self._origin_of(url) != self._origin:
            # Our token goes with every page: never send it to a host other than the API's.
            raise GitHubError("GitHub linked the next page to another host", reason="bad_link")
        return url
