"""The REST client of the files enrichment: a pull request's file list from GitHub's API, every request bounded.

It never sleeps and never retries a failed request by itself (except one re-mint of a rejected
installation token): rate limits and server errors come back as typed exceptions (errors) carrying
what the caller needs to reschedule its job. GitHub's rate limits are a wall (budget): per
credential, while GitHub's wait holds, no request leaves; the caller gets RateLimited at once. It authenticates with a token, or with a GitHub App
whose installation tokens auth mints and caches. No secret (token, JWT, private key) ever goes into
a log line or an exception message.

Every request is bounded, whatever the server does: a deadline for the whole exchange, a byte cap
on each answer (checked as it streams in, and decoded by answers), and at most 3,000 file entries
ever held. A list cut by one of these says so (`FilesPage.truncated`).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn, Self
from urllib.parse import quote, urlsplit

import httpx

from flowlens_ingest.github.answers import (
    Answer,
    RateLimit,
    TooDeep,
    body_decoder,
    file_entries,
    json_of,
    raise_for,
    rate_limit_of,
    rate_limited,
    rate_limited_by_head,
    says_wait,
)
from flowlens_ingest.github.auth import GitHubApp
from flowlens_ingest.github.budget import Budgets, SharedWaits, Wait, app_key, installation_key, token_key
from flowlens_ingest.github.errors import Forbidden, GitHubError, NotSent, RateLimited, Transient, wait_reason
from flowlens_ingest.github.files import MAX_FILES
from flowlens_ingest.github.transport import bound_requests, within

DEFAULT_API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
PER_PAGE = 100
# With `per_page=100`, 30 pages hold GitHub's 3,000 files; the higher bound only guards against
# a server that ignores `per_page` or links pages in a loop.
MAX_PAGES = 100
# No page of a file list is asked for past this (plus the page under way, its turn and its
# deadline): 30 pages of a healthy API take seconds. What was read is kept, flagged truncated,
# as at the other bounds of a list.
LIST_DEADLINE_S = 300.0
# Each request: connected within 5 s, never silent for more than 10 s (GitHub itself ends a request
# it takes more than 10 s to process: https://docs.github.com/en/rest/using-the-rest-api/troubleshooting-the-rest-api#timeouts),
# and the whole exchange, answer included, over within 30 s. httpx's timeouts are per socket
# operation: a server trickling a byte at a time never trips them, the deadline does (checked on
# every chunk of a body here, and on every socket wait of the status line and headers: transport.py).
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
class JsonAnswer:
    """A successful API answer: its status, its JSON body (None when empty) and its `Link: rel="next"` URL."""

    status_code: int
    data: Any
    next_url: str | None


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
        waits: SharedWaits | None = None,
    ) -> None:
        if min(timeout, connect_timeout, deadline) <= 0 or min(max_page_bytes, max_list_bytes) <= 0:
            raise ValueError("timeouts, deadline and byte caps must be positive")
        # No single wait is longer than the whole request may take. Passed with every request,
        # so a caller's own httpx client is bounded too.
        self._timeouts = httpx.Timeout(min(timeout, deadline), connect=min(connect_timeout, deadline))
        self.deadline = deadline
        self.max_page_bytes = max_page_bytes
        self.max_list_bytes = max_list_bytes
        self.list_deadline_s = LIST_DEADLINE_S
        self.api_url = api_url.rstrip("/")
        self._origin = self._origin_of(self.api_url)
        self._token = token or None
        if (app_id is None or app_id == "") != (not private_key):
            raise ValueError("a GitHub App needs both an app id and a private key")
        self._app = (
            GitHubApp(app_id, private_key, post=self._post, clock=clock) if app_id is not None and private_key else None
        )
        self._clock = clock
        self._own_client = client is None
        if client is None:
            client = httpx.Client(
                timeout=self._timeouts,
                headers={"User-Agent": "flowlens-ingest", "Accept": "application/vnd.github+json"},
            )
            # The deadline then bounds the status line and headers too, not only the body (transport.py).
            bound_requests(client)
        self._http = client
        # Per credential: GitHub's latest headers and its wait, shared with other processes through `waits`.
        self.budgets = Budgets(clock, waits)

    # -- configuration --------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether any credential (a token or a GitHub App) is configured."""
        return self._token is not None or self._app is not None

    def describe(self) -> str:
        """The configured credential, for a start-up log line: never the secret itself."""
        if self._app is not None:
            return f"GitHub App {self._app.app_id}" + (", token fallback" if self._token else "")
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
        """The primary rate-limit headers of the latest response, whatever its credential."""
        return self.budgets.latest

    def credential_key(self, *, installation_id: int | None = None, app: bool = False) -> str:
        """The budget a request would draw on (`installation:<id>`, `token:<hash prefix>`, `app:<id>`): never a secret."""
        if app:
            if self._app is None:
                raise Forbidden("no GitHub App configured", reason="no_credential")
            return app_key(self._app.app_id)
        if self._app is not None and installation_id is not None:
            return installation_key(installation_id)
        if self._token is not None:
            return token_key(self._token)
        raise Forbidden("no credential for this repository", reason="no_credential")

    def rate_limit_for(self, *, installation_id: int | None = None, app: bool = False) -> RateLimit:
        """The primary rate-limit headers of that credential's latest response."""
        return self.budgets.rate_limit(self.credential_key(installation_id=installation_id, app=app))

    def wait_of(self, *, installation_id: int | None = None, app: bool = False) -> Wait | None:
        """The wait GitHub asked of that credential, while it holds (seen here or by another process); else None."""
        return self.budgets.wait_of(self.credential_key(installation_id=installation_id, app=app))

    def reserve_exhausted(self, reserve: int, *, installation_id: int | None = None) -> float | None:
        """The reset time (at most an hour ahead) when that credential has fewer than `reserve` requests left; else None."""
        return self.budgets.reserve_exhausted(self.credential_key(installation_id=installation_id), reserve)

    def _exchange(self, key: str, method: str, url: str, headers: dict[str, str], max_bytes: int) -> Answer:
        """One request drawing on budget `key`: refused at once while GitHub's wait holds, and its answer recorded.

        A 403/429 that is a rate limit makes the wait this credential honours from now on, in
        this process and (through the shared waits) in the others. The request is sent in the
        credential's turn (Budgets.turn: one at a time in this process), which reads every wait
        again as it begins.
        """
        held = False

        def heard(status: int, head: httpx.Headers) -> None:
            # The status line and headers, before the body is read: a body that then fails to
            # arrive (the deadline, a reset) does not lose the wait they ask for.
            nonlocal held
            now = self._clock()
            self.budgets.observe(key, rate_limit_of(head, now))
            limited = rate_limited_by_head(status, head, now)
            if limited is not None:
                held = True
                self._hold(key, limited)

        # One request at a time per credential in this process; its deadline bounds the turn ahead.
        with self.budgets.turn(key, 2 * self.deadline):
            answer = self._send(method, url, headers, max_bytes, heard)
            if not held:
                # A 403 that names the limit in its body only.
                limited = rate_limited(answer, self._clock())
                if limited is not None:
                    self._hold(key, limited)
                else:
                    self.budgets.answered(key)
        return answer

    def _hold(self, key: str, limited: RateLimited) -> None:
        self.budgets.hold(key, limited.retry_at, wait_reason(limited.reason))

    # -- credentials ------------------------------------------------------------------------

    def installation_token(self, installation_id: int) -> str:
        """The configured App's installation access token (minted, or cached until 5 minutes before it expires)."""
        if self._app is None:
            raise Forbidden("no GitHub App configured", reason="no_credential")
        return self._app.installation_token(installation_id)

    def _credential(self, installation_id: int | None) -> tuple[str, int | None]:
        """The token to send, and the installation it belongs to (None for the plain token)."""
        if self._app is not None and installation_id is not None:
            return self._app.installation_token(installation_id), installation_id
        if self._token is not None:
            return self._token, None
        raise Forbidden("no credential for this repository", reason="no_credential")

    # -- requests ---------------------------------------------------------------------------

    @staticmethod
    def _origin_of(url: str) -> tuple[str, str]:
        parts = urlsplit(url)
        return parts.scheme.lower(), parts.netloc.lower()

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        max_bytes: int,
        heard: Callable[[int, httpx.Headers], None] | None = None,
    ) -> Answer:
        """One HTTP exchange within the deadline, its body read up to `max_bytes`; `heard` is told its status and headers first.

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
            with within(deadline):
                for _ in range(MAX_REDIRECTS + 1):
                    self._check_deadline(deadline)
                    response = self._http.send(request, stream=True, follow_redirects=False)
                    try:
                        # A redirect that spent the last request (or asks for a wait) is not followed:
                        # it is the answer, a rate limit (answers.rate_limited), its body never read.
                        halt = response.next_request is not None and says_wait(response.headers)
                        if response.next_request is None or halt:
                            if heard is not None:
                                heard(response.status_code, response.headers)
                            body, cut = (b"", False) if halt else self._read_body(response, max_bytes, deadline)
                            next_link = response.links.get("next")
                            next_url = next_link.get("url") if next_link else None
                            return Answer(response.status_code, response.headers, next_url, body, cut)
                        # Redirects stay on GitHub (renamed or transferred repositories); httpx drops
                        # `Authorization` should one ever lead to another host.
                        request = response.next_request
                    finally:
                        response.close()
                raise GitHubError("GitHub redirected too many times", reason="redirects")
        except httpx.TimeoutException as exc:
            failure = Transient("timeout", f"GitHub request timed out ({type(exc).__name__})")
        except httpx.LocalProtocolError as exc:
            # Its text quotes the header it would not send: the Authorization header, token and all.
            failure = Transient("request", f"GitHub request not sent ({type(exc).__name__}: a header it cannot send)")
        except httpx.TransportError as exc:
            failure = Transient("connection", f"GitHub unreachable ({type(exc).__name__}: {exc})")
        except httpx.RequestError as exc:
            failure = Transient("request", f"GitHub request failed ({type(exc).__name__}: {exc})")
        # Raised outside the `except`: the httpx exception holds the request, headers included.
        raise failure

    def _post(self, path: str, headers: dict[str, str]) -> Answer:
        """POST to a path of the API with the App's JWT (the token mint): the App's budget, bounded as every request is."""
        assert self._app is not None  # only the App mints
        key = app_key(self._app.app_id)
        answer = self._exchange(key, "POST", f"{self.api_url}{path}", headers, self.max_page_bytes)
        if rate_limited(answer, self._clock()) is not None:
            # Named for the App's budget, with the wait it now honours, as every other request's limit is.
            self._raise_for(answer, key)
        return answer

    def _check_deadline(self, deadline: float) -> None:
        """Raise `Transient` once the request's deadline (a `time.monotonic()` value) has passed."""
        if time.monotonic() > deadline:
            raise Transient("timeout", f"GitHub request timed out (over its {self.deadline:g} s deadline)")

    def _read_body(self, response: httpx.Response, max_bytes: int, deadline: float) -> tuple[bytes, bool]:
        """The body, decoded, up to `max_bytes`, and whether there was more; `Transient` past the deadline."""
        decode = body_decoder(response.headers.get("content-encoding"))
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
    ) -> tuple[Answer, int]:
        """GET with our credential, re-minting a rejected installation token once; the answer and the GETs sent."""
        key = self.credential_key(installation_id=installation_id)
        # Checked before a token is minted: a mint is a request too.
        self.budgets.check(key)
        credential, installation = self._credential(installation_id)
        authorized = {**headers, "Authorization": f"Bearer {credential}"}
        answer = self._exchange(key, "GET", url, authorized, max_bytes)
        if answer.status_code != 401 or installation is None or self._app is None:
            return answer, 1
        # Revoked, or expired earlier than announced: mint once more, then give up.
        self._app.forget_token(installation, credential)
        credential = self._app.installation_token(installation)
        answer = self._exchange(key, "GET", url, {**headers, "Authorization": f"Bearer {credential}"}, max_bytes)
        return answer, 2

    # -- the files list ---------------------------------------------------------------------

    def list_files(
        self,
        full_name: str,
        number: int,
        *,
        installation_id: int | None,
        etag: str | None = None,
        keep: Callable[[], bool] | None = None,
    ) -> FilesPage:
        """Every file entry of a pull request (up to GitHub's 3,000), following `Link: rel="next"` pages.

        `keep` is asked before each page after the first (a worker's lease on the job, renewed):
        False ends the list there, NotSent (`lease_lost`), without asking GitHub for the page.
        No page is asked for past `list_deadline_s` (LIST_DEADLINE_S): the list ends there, truncated.
        """
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
        ends = time.monotonic() + self.list_deadline_s
        while url is not None:
            late = pages > 0 and time.monotonic() > ends
            if len(entries) >= MAX_FILES or pages >= MAX_PAGES or budget <= 0 or late:
                # A next page is announced, but the list already holds all we take: GitHub's
                # 3,000-file cap, a server ignoring `per_page` or linking pages without end, or
                # one so slow the list has had its time.
                truncated = True
                break
            if pages and keep is not None and not keep():
                raise NotSent("the job is no longer this worker's: its next page is not asked", reason="lease_lost")
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
                self._raise_for(answer, self.credential_key(installation_id=installation_id))
            budget -= len(answer.body)
            page, whole = file_entries(answer, MAX_FILES - len(entries))
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

    def _raise_for(self, answer: Answer, key: str) -> NoReturn:
        """`raise_for`, a rate limit naming the credential it binds."""
        try:
            raise_for(answer, self._clock())
        except RateLimited as exc:
            # The wait the credential now honours, which repeated secondary limits make longer
            # (this process's own, just recorded: the answer is a rate limit whatever the database says).
            held = self.budgets.own_wait(key)
            retry_at = exc.retry_at if held is None else max(exc.retry_at, held.until)
            raise RateLimited(retry_at, wait_reason(exc.reason), status=exc.status, credential=key) from None

    def _next_url(self, answer: Answer, seen: set[str]) -> str | None:
        """The `rel="next"` page to fetch, exactly as GitHub gave it (it may use the `/repositories/{id}/` form)."""
        url = answer.next_url
        if not url or url in seen:
            return None
        if self._origin_of(url) != self._origin:
            # Our token goes with every page: never send it to a host other than the API's.
            raise GitHubError("GitHub linked the next page to another host", reason="bad_link")
        return url

    # -- any JSON endpoint ------------------------------------------------------------------

    def url_of(self, path: str) -> str:
        """The URL a request for `path` (a path under the API, or a URL GitHub linked to) goes to."""
        return path if path.startswith(("http://", "https://")) else f"{self.api_url}/{path.lstrip('/')}"

    def request_json(
        self, method: str, path: str, *, app: bool = False, installation_id: int | None = None
    ) -> JsonAnswer:
        """One request to the API (a path under it, or a URL it linked to), its JSON answer; typed errors unless 2xx.

        `app`: authenticate as the GitHub App (its JWT: the `/app/...` endpoints); else with the
        installation's token, or the plain token. Bounded like every request (deadline, byte cap).
        """
        url = self.url_of(path)
        if self._origin_of(url) != self._origin:
            # Our credential goes with the request: never to a host other than the API's.
            raise GitHubError("GitHub linked to another host", reason="bad_link")
        if app:
            if self._app is None:
                raise Forbidden("no GitHub App configured", reason="no_credential")
            # The App's JWT draws on the App's own budget, not an installation's.
            key = app_key(self._app.app_id)
            headers = {"Authorization": f"Bearer {self._app.jwt()}"}
            answer = self._exchange(key, method, url, headers, self.max_page_bytes)
        elif method == "GET":
            key = self.credential_key(installation_id=installation_id)
            answer, _ = self._get(url, installation_id, {}, self.max_page_bytes)
        else:
            key = self.credential_key(installation_id=installation_id)
            self.budgets.check(key)
            credential, _ = self._credential(installation_id)
            authorized = {"Authorization": f"Bearer {credential}"}
            answer = self._exchange(key, method, url, authorized, self.max_page_bytes)
        if not 200 <= answer.status_code < 300:
            self._raise_for(answer, key)
        if answer.cut:
            raise Transient("too_large", f"GitHub's answer ran past {self.max_page_bytes} bytes", status=200)
        try:
            data = json_of(answer.body) if answer.body.strip() else None
        except TooDeep as exc:
            raise Transient("too_deep", str(exc), status=answer.status_code) from None
        except ValueError:
            raise Transient("bad_json", "GitHub's answer was not JSON", status=answer.status_code) from None
        return JsonAnswer(answer.status_code, data, answer.next_url)
