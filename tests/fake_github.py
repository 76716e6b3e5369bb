"""A fake GitHub REST API on a real loopback port, for tests of the files enrichment.

It serves a pull request's file list (paginated with `Link`, ETags and 304s, rate-limit
headers), mints App installation tokens against a JWT it really verifies, fails on demand
(rate limits, 5xx, 403, 404, 401, bad JSON), and misbehaves on demand: answers that never end,
trickle, run to hundreds of megabytes or decode to nothing (`stream_files`), pages ignoring
`per_page` (`page_size`), absurd rate-limit headers (`primary_reset`, `retry_after`). In process:

    with serve_fake_github() as fake:
        fake.set_files("octo/repo", 7, make_files(250))
        client = GitHubClient(api_url=fake.url, token=fake.token)

Standalone, for a separate `serve` process to talk to (prints its URL on the first line):

    python -m tests.fake_github --port 0 --files octo/repo#7=250 --write-private-key key.pem
    python -m tests.fake_github --port 8900 --trial http://127.0.0.1:8000/webhook   # docs/recovering.md

A standalone fake is driven over HTTP under `/_fake/`: `POST /_fake/files/{owner}/{repo}/{n}`
(a JSON list of entries, or `{"count": N}`), `POST /_fake/fail` (`{"kind", "times", "route", "after"}`),
`GET /_fake/requests`, `POST /_fake/reset`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import secrets
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from . import fake_trial
from .fake_budgets import CredentialBudgets
from .fake_hooks import HookLogs
from .fake_repos import Repositories

DEFAULT_TOKEN = "ghp_fakeFlowLensTestToken0000000000000000"
DEFAULT_APP_ID = 424242
FAULT_KINDS = (
    *("primary", "secondary", "secondary_403", "server", "forbidden", "gone", "unauthorized", "bad_json"),
    "not_a_list",
)
ROUTES = ("files", "access_tokens", "repos")
DOCS = "https://docs.github.com/rest"

_FILES_PATH = re.compile(r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/pulls/(?P<number>\d+)/files$")
_FILES_BY_ID_PATH = re.compile(r"^/repositories/(?P<repo_id>\d+)/pulls/(?P<number>\d+)/files$")
_TOKENS_PATH = re.compile(r"^/app/installations/(?P<installation>\d+)/access_tokens$")
_CONTROL_FILES_PATH = re.compile(r"^/_fake/files/(?P<owner>[^/]+)/(?P<repo>[^/]+)/(?P<number>\d+)$")


def generate_private_key_pem() -> str:
    """A fresh 2048-bit RSA private key, PEM text in GitHub's format (`BEGIN RSA PRIVATE KEY`)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()


@cache
def app_private_key_pem() -> str:
    """The test App's private key, generated once per process (key generation costs ~0.1 s)."""
    return generate_private_key_pem()


def make_files(count: int, prefix: str = "src/f", repo: str = "octo/repo") -> list[dict[str, Any]]:
    """`count` GitHub-shaped file entries, deterministic, sorted by filename like GitHub's list."""
    files = []
    for i in range(count):
        filename = f"{prefix}{i:05d}.py"
        sha = hashlib.sha1(filename.encode()).hexdigest()
        additions, deletions = i % 7 + 1, i % 3
        lines = [f"-old line {k}" for k in range(deletions)] + [f"+new line {k}" for k in range(additions)]
        files.append(
            {
                "sha": sha,
                "filename": filename,
                "status": "added" if i % 10 == 0 else "modified",
                "additions": additions,
                "deletions": deletions,
                "changes": additions + deletions,
                "blob_url": f"https://github.com/{repo}/blob/{sha}/{filename}",
                "raw_url": f"https://github.com/{repo}/raw/{sha}/{filename}",
                "contents_url": f"https://api.github.com/repos/{repo}/contents/{filename}?ref={sha}",
                "patch": f"@@ -1,{deletions} +1,{additions} @@\n" + "\n".join(lines),
            }
        )
    return files


Body = Callable[[], Iterable[bytes]]


def endless_body() -> Iterator[bytes]:
    """A JSON array of file entries that never ends, sent as fast as the client reads."""
    yield b"["
    chunk = b"".join(json.dumps(entry).encode() + b"," for entry in make_files(100))
    yield from itertools.repeat(chunk)


def huge_body(total_bytes: int) -> Body:
    """A well-formed JSON array of file entries of about `total_bytes`, streamed without being built whole."""

    def body() -> Iterator[bytes]:
        entries = [json.dumps(entry).encode() for entry in make_files(100)]
        chunk = b",".join(entries)
        yield b"[" + chunk
        for _ in range(total_bytes // len(chunk)):
            yield b"," + chunk
        yield b"]"

    return body


def trickle_body(interval: float) -> Body:
    """`[` and then one space every `interval` seconds, for ever: an answer that never finishes."""

    def body() -> Iterator[bytes]:
        yield b"["
        while True:
            time.sleep(interval)  # the fake's pace, not a test waiting
            yield b" "

    return body


def empty_gzip_body() -> Iterator[bytes]:
    """A gzip stream of empty deflate blocks, for ever: bytes keep coming, and decode to nothing."""
    yield b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    # A stored block, not the last one, of length 0 (RFC 1951, 3.2.4).
    yield from itertools.repeat(b"\x00\x00\x00\xff\xff" * 1000)


def etag_of(files: list[dict[str, Any]]) -> str:
    """The fake's ETag of a file list: a weak tag over the whole list, like GitHub's `W/"…"`."""
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return f'W/"{digest}"'


class RecordedRequest(NamedTuple):
    """One request the fake answered: headers keyed in lower case."""

    method: str
    path: str
    query: str
    headers: dict[str, str]


class FakeGitHub:
    """A WSGI app behaving like GitHub's REST API for the routes the files enrichment uses."""

    def __init__(
        self,
        *,
        token: str | None = DEFAULT_TOKEN,
        app_id: int = DEFAULT_APP_ID,
        prefix: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = ""  # set once the server is bound
        self.prefix = prefix.rstrip("/")
        self.token = token
        self.app_id = app_id
        self.app_private_key_pem = app_private_key_pem()
        self.app_public_key = serialization.load_pem_private_key(
            self.app_private_key_pem.encode(), password=None
        ).public_key()
        self.clock = clock
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget files, tokens, faults and recorded requests; restore the default knobs."""
        with self._lock:
            self.requests: list[RecordedRequest] = []
            self._files: dict[tuple[str, int], list[dict[str, Any]]] = {}
            self._repo_ids: dict[str, int] = {}
            self._faults: dict[str, deque[str | None]] = {route: deque() for route in ROUTES}
            self._installation_tokens: dict[str, tuple[int, float]] = {}
            self.limit = 5000
            self.remaining = 5000
            self.reset_at = self.clock() + 3600
            self.reset_in = 2.0  # seconds until the reset a "primary" fault announces
            self.retry_after: int | str = 30  # the `retry-after` of a "secondary" fault
            self.token_ttl = 3600.0  # lifetime of installation tokens
            self.link_style = "repos"  # or "repositories": next links in GitHub's /repositories/{id}/ form
            self.installations: set[int] | None = None  # None: any installation id exists
            self.page_size: int | None = None  # pages of this size whatever `per_page` asks, as a server ignoring it
            self.primary_reset: str | None = None  # a "primary" fault's `x-ratelimit-reset`, verbatim
            self._streams: dict[tuple[str, int], tuple[Body, int, dict[str, str]]] = {}
            self._renamed: dict[str, tuple[str, Body | None]] = {}
            # Per route: the next request is held until released (`hold_next`).
            self._holds: dict[str, tuple[threading.Event, threading.Event]] = {}
            # Webhooks that deliver, and their delivery logs (fake_hooks.py).
            self.hook_logs = HookLogs(self)
            # Repositories, pull requests, reviews, checks and statuses for backfill (fake_repos.py).
            self.repositories = Repositories(self)
            # Each credential its own rate-limit budget, requests counted per credential (fake_budgets.py).
            self.budgets = CredentialBudgets(self)

    # -- programming the fake ---------------------------------------------------------------

    def set_files(self, full_name: str, number: int, files: list[dict[str, Any]]) -> None:
        """Serve `files` as the file list of pull request `number` of `full_name` ("owner/repo")."""
        with self._lock:
            key = full_name.lower()
            self._files[(key, int(number))] = list(files)
            self._repo_ids.setdefault(key, 1000 + len(self._repo_ids))

    def stream_files(
        self, full_name: str, number: int, body: Body, *, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        """Answer that pull request's file list with `status` and the bytes `body()` yields, each sent as it comes."""
        with self._lock:
            self._streams[(full_name.lower(), int(number))] = (body, status, headers or {})

    def rename(self, old: str, new: str, *, body: Body | None = None) -> None:
        """Answer requests for repository `old` with a 301 to `new`, as GitHub does for a renamed one; `body` streams the 301's body."""
        with self._lock:
            self._renamed[old.lower()] = (new, body)

    def fail_next(self, kind: str, times: int = 1, *, route: str = "files", after: int = 0) -> None:
        """Answer `times` requests of `route` ("files" or "access_tokens") with fault `kind`, once `after` have passed."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULT_KINDS}")
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {ROUTES}")
        with self._lock:
            # Queued behind earlier faults; a None lets one request through untouched.
            self._faults[route].extend([None] * after + [kind] * times)

    def hold_next(self, route: str) -> tuple[threading.Event, threading.Event]:
        """Hold the next request of `route` before answering it: (set once it arrived, set it to answer)."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {ROUTES}")
        arrived, answer = threading.Event(), threading.Event()
        with self._lock:
            self._holds[route] = (arrived, answer)
        return arrived, answer

    def _held(self, route: str) -> None:
        with self._lock:
            hold = self._holds.pop(route, None)
        if hold is not None:
            arrived, answer = hold
            arrived.set()
            answer.wait(30)  # bounded: a test that never releases it fails on its own wait

    def revoke_tokens(self) -> None:
        """Invalidate every installation token issued so far: they answer 401 from now on."""
        with self._lock:
            self._installation_tokens.clear()

    def calls(self, method: str | None = None, contains: str = "") -> list[RecordedRequest]:
        """The recorded requests of one method (any if None) whose path contains `contains`."""
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    # -- WSGI -------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        response = self._dispatch(request)
        return response(environ, start_response)

    def _dispatch(self, request: Request) -> Response:
        path = request.path
        if self.prefix and path.startswith(self.prefix + "/"):
            path = path[len(self.prefix) :]
        if path.startswith("/_fake/"):
            return self._control(request, path)
        with self._lock:
            self.requests.append(
                RecordedRequest(
                    method=request.method,
                    path=request.path,
                    query=request.query_string.decode(),
                    headers={name.lower(): value for name, value in request.headers.items()},
                )
            )
        limited = self.budgets.gate(request)
        if limited is not None:
            return limited
        if request.method == "GET" and (match := _FILES_PATH.match(path)):
            full_name = f"{match['owner']}/{match['repo']}".lower()
            with self._lock:
                renamed = self._renamed.get(full_name)
            if renamed is not None:
                new, body = renamed
                location = f"{self.url}/repos/{new}/pulls/{match['number']}/files?{request.query_string.decode()}"
                content = body() if body is not None else json.dumps({"message": "Moved Permanently", "url": location})
                # A redirect is a request like any other: it spends one and says what is left.
                headers = {"Location": location, **self._rate_headers(spend=True)}
                return Response(content, status=301, headers=headers, content_type="application/json")
            return self._files_route(request, full_name, int(match["number"]))
        if request.method == "GET" and (match := _FILES_BY_ID_PATH.match(path)):
            with self._lock:
                names = [name for name, repo_id in self._repo_ids.items() if repo_id == int(match["repo_id"])]
            return self._files_route(request, names[0] if names else "", int(match["number"]))
        if request.method == "POST" and (match := _TOKENS_PATH.match(path)):
            return self._tokens_route(request, int(match["installation"]))
        hooks = self.hook_logs.route(request, path)
        if hooks is not None:
            return hooks
        repos = self.repositories.route(request, path)
        if repos is not None:
            return repos
        return _json(404, {"message": "Not Found", "documentation_url": DOCS})

    def _rate_headers(self, *, spend: bool) -> dict[str, str]:
        with self._lock:
            if spend:
                self.remaining = max(0, self.remaining - 1)
            return {
                "x-ratelimit-limit": str(self.limit),
                "x-ratelimit-remaining": str(self.remaining),
                "x-ratelimit-reset": str(int(self.reset_at)),
                "x-ratelimit-used": str(self.limit - self.remaining),
                "x-ratelimit-resource": "core",
            }

    def _primary_limited(self, reset: str) -> Response:
        headers = {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": "0",
            "x-ratelimit-reset": reset,
            "x-ratelimit-used": str(self.limit),
            "x-ratelimit-resource": "core",
        }
        return _json(403, {"message": "API rate limit exceeded for installation.", "documentation_url": DOCS}, headers)

    def _fault(self, route: str) -> Response | None:
        with self._lock:
            kind = self._faults[route].popleft() if self._faults[route] else None
        if kind is None:
            return None
        if kind == "primary":
            return self._primary_limited(self.primary_reset or str(int(self.clock() + self.reset_in)))
        if kind == "secondary":
            headers = {**self._rate_headers(spend=False), "retry-after": str(self.retry_after)}
            message = "You have exceeded a secondary rate limit. Please wait a few minutes before you try again."
            return _json(429, {"message": message, "documentation_url": DOCS}, headers)
        if kind == "secondary_403":
            message = (
                "You have exceeded a secondary rate limit and have been temporarily blocked from content creation."
            )
            return _json(403, {"message": message, "documentation_url": DOCS}, self._rate_headers(spend=False))
        if kind == "server":
            return _json(502, {"message": "Server Error"})
        if kind == "forbidden":
            return _json(403, {"message": "Resource not accessible by integration", "documentation_url": DOCS})
        if kind == "gone":
            return _json(404, {"message": "Not Found", "documentation_url": DOCS})
        if kind == "unauthorized":
            return _json(401, {"message": "Bad credentials", "documentation_url": DOCS})
        if kind == "not_a_list":
            return _json(200, {"message": "odd"})
        return Response("<html>unicorn</html>", status=200, content_type="application/json; charset=utf-8")

    def _authorized(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() not in ("bearer", "token") or not value:
            return False
        if self.token is not None and secrets.compare_digest(value, self.token):
            return True
        with self._lock:
            issued = self._installation_tokens.get(value)
        return issued is not None and self.clock() < issued[1]

    def _files_route(self, request: Request, full_name: str, number: int) -> Response:
        self._held("files")
        fault = self._fault("files")
        if fault is not None:
            return fault
        if not self._authorized(request):
            return _json(401, {"message": "Bad credentials", "documentation_url": DOCS})
        with self._lock:
            files = self._files.get((full_name, number))
            repo_id = self._repo_ids.get(full_name)
            exhausted = self.remaining <= 0
            stream = self._streams.get((full_name, number))
        if stream is not None:
            body, status, headers = stream
            # No length: the answer goes out chunked, each piece as the body yields it.
            return Response(
                body(),
                status=status,
                headers={**self._rate_headers(spend=True), **headers},
                content_type="application/json; charset=utf-8",
            )
        if exhausted:
            return self._primary_limited(str(int(self.reset_at)))
        if files is None:
            return _json(404, {"message": "Not Found", "documentation_url": DOCS}, self._rate_headers(spend=True))
        etag = etag_of(files)
        if _etag_matches(request.headers.get("If-None-Match"), etag):
            # GitHub does not charge a 304 against the primary limit.
            return Response(status=304, headers={"ETag": etag, **self._rate_headers(spend=False)})
        if self.page_size is not None:
            per_page = self.page_size
        else:
            per_page = min(100, max(1, _int(request.args.get("per_page"), 30)))
        page = max(1, _int(request.args.get("page"), 1))
        last = max(1, -(-len(files) // per_page))
        body = files[(page - 1) * per_page : page * per_page]
        if self.link_style == "repositories" and repo_id is not None:
            base = f"{self.url}/repositories/{repo_id}/pulls/{number}/files"
        else:
            base = f"{self.url}{request.path[len(self.prefix) :] if self.prefix else request.path}"
        links = []
        if page > 1:
            links.append(f'<{base}?per_page={per_page}&page={page - 1}>; rel="prev"')
        if page < last:
            links.append(f'<{base}?per_page={per_page}&page={page + 1}>; rel="next"')
            links.append(f'<{base}?per_page={per_page}&page={last}>; rel="last"')
        if page > 1:
            links.append(f'<{base}?per_page={per_page}&page=1>; rel="first"')
        headers = {"ETag": etag, **self._rate_headers(spend=True)}
        if links:
            headers["Link"] = ", ".join(links)
        return _json(200, body, headers)

    def _tokens_route(self, request: Request, installation_id: int) -> Response:
        self._held("access_tokens")
        fault = self._fault("access_tokens")
        if fault is not None:
            return fault
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self._jwt_valid(value):
            return _json(401, {"message": "A JSON web token could not be decoded", "documentation_url": DOCS})
        with self._lock:
            known = self.installations is None or installation_id in self.installations
        if not known:
            return _json(404, {"message": "Not Found", "documentation_url": DOCS})
        token = "ghs_" + secrets.token_hex(18)
        expires_at = self.clock() + self.token_ttl
        with self._lock:
            self._installation_tokens[token] = (installation_id, expires_at)
        stamp = datetime.fromtimestamp(int(expires_at), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "token": token,
            "expires_at": stamp,
            "permissions": {"pull_requests": "read", "contents": "read"},
            "repository_selection": "all",
        }
        return _json(201, body)

    def installation_of(self, token: str) -> int | None:
        """The installation an unexpired installation token was issued for, or None."""
        with self._lock:
            issued = self._installation_tokens.get(token)
        return issued[0] if issued is not None and self.clock() < issued[1] else None

    def _jwt_valid(self, value: str) -> bool:
        """GitHub's checks: RS256 by the App's key, `iss` the App id, issued in the past, expiring within 10 minutes."""
        try:
            # Times are checked below against the fake's own clock, which tests may move.
            claims = jwt.decode(
                value,
                self.app_public_key,  # type: ignore[arg-type]
                algorithms=["RS256"],
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "require": ["iat", "exp", "iss"],
                },
            )
        except jwt.InvalidTokenError:
            return False
        now = self.clock()
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int | float) or not isinstance(exp, int | float):
            return False
        return str(claims.get("iss")) == str(self.app_id) and iat <= now + 60 and now < exp <= now + 600

    def _control(self, request: Request, path: str) -> Response:
        """The `/_fake/` routes that let a test drive a standalone fake from another process."""
        if request.method == "POST" and (match := _CONTROL_FILES_PATH.match(path)):
            body = request.get_json(force=True)
            files = make_files(int(body["count"]), str(body.get("prefix", "src/f"))) if isinstance(body, dict) else body
            self.set_files(f"{match['owner']}/{match['repo']}", int(match["number"]), files)
            return _json(200, {"files": len(files)})
        if request.method == "POST" and path == "/_fake/fail":
            body = request.get_json(force=True)
            route, after = str(body.get("route", "files")), int(body.get("after", 0))
            self.fail_next(str(body["kind"]), int(body.get("times", 1)), route=route, after=after)
            return _json(200, {})
        if request.method == "GET" and path == "/_fake/requests":
            return _json(200, [list(r) for r in self.calls()])
        if request.method == "POST" and path == "/_fake/reset":
            self.reset()
            return _json(200, {})
        return _json(404, {"message": "Not Found"})


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body), status=status, headers=headers or {}, content_type="application/json; charset=utf-8"
    )


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _etag_matches(header: str | None, etag: str) -> bool:
    """`If-None-Match` comparison, weak: `W/"x"` and `"x"` match each other, as GitHub's do."""
    if not header:
        return False
    wanted = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") in (wanted, "*") for tag in header.split(","))


class _QuietHandler(WSGIRequestHandler):
    """No access log line per request (tests make thousands); `Date` on the fake's own clock, as GitHub's is on its."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The `Date` header: the fake's clock (which tests move, or set apart from the client's)."""
        clock = getattr(self.server.app, "clock", None)  # type: ignore[attr-defined]
        return super().date_time_string(clock() if timestamp is None and clock is not None else timestamp)


@contextmanager
def serve_fake_github(
    *, host: str = "127.0.0.1", port: int = 0, prefix: str = "", **options: Any
) -> Iterator[FakeGitHub]:
    """Run a `FakeGitHub` on a loopback port in a daemon thread; `.url` is its base URL (with `prefix`)."""
    fake = FakeGitHub(prefix=prefix, **options)
    server = make_server(host, port, fake, threaded=True, request_handler=_QuietHandler)
    fake.url = f"http://{host}:{server.server_port}{fake.prefix}"
    # A short poll interval: `shutdown()` waits for the loop to notice, once per test.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-github", daemon=True
    )
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    """Serve a fake GitHub until interrupted; print its URL first."""
    parser = argparse.ArgumentParser(prog="python -m tests.fake_github", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (the URL printed says which)")
    parser.add_argument("--prefix", default="", help="e.g. /api/v3 to look like GitHub Enterprise Server")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="the personal access token it accepts")
    parser.add_argument("--app-id", type=int, default=DEFAULT_APP_ID)
    parser.add_argument("--write-private-key", type=Path, help="write the App's private key (PEM) to this file")
    parser.add_argument(
        "--files", action="append", default=[], metavar="OWNER/REPO#N=COUNT", help="serve COUNT files for that PR"
    )
    fake_trial.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        secret = fake_trial.service_secret() if args.trial else ""
    except fake_trial.TrialError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with serve_fake_github(
        host=args.host, port=args.port, prefix=args.prefix, token=args.token, app_id=args.app_id
    ) as fake:
        if args.write_private_key:
            args.write_private_key.write_text(fake.app_private_key_pem)
        for spec in args.files:
            pr, _, count = spec.partition("=")
            full_name, _, number = pr.partition("#")
            fake.set_files(full_name, int(number), make_files(int(count)))
        said = fake_trial.seed(fake, args.trial, secret) if args.trial else []
        print(fake.url, flush=True)
        for line in said:
            print(line, flush=True)
        try:
            # A timed wait, so SIGTERM's handler gets to run in the main thread.
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
