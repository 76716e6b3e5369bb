"""The GitHub REST client against a fake GitHub on a real loopback port (no mocked HTTP)."""

from __future__ import annotations

import email.utils
import gzip
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from flowlens_ingest.github.answers import RateLimit
from flowlens_ingest.github.budget import Wait
from flowlens_ingest.github.client import GitHubClient
from flowlens_ingest.github.errors import Forbidden, GitHubError, NotFound, RateLimited, Transient, Unauthorized
from flowlens_ingest.github.files import MAX_FILES, FilesStatus, shape

from .fake_github import (
    FakeGitHub,
    empty_gzip_body,
    endless_body,
    generate_private_key_pem,
    huge_body,
    make_files,
    serve_fake_github,
    trickle_body,
)
from .helpers import wait_for

T0 = 1_700_000_000.0
REPO = "octo/repo"
# Small bounds for the tests of misbehaving servers; GIVE_UP is how late giving up may be, generously.
DEADLINE = 0.5
GIVE_UP = DEADLINE + 5.0
HOUR = 3600


class Clock:
    """A clock that moves only when told: rate-limit resets and token expiry without waiting."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeGitHub]:
    with serve_fake_github(clock=clock) as fake:
        yield fake


@pytest.fixture
def github(fake: FakeGitHub, clock: Clock) -> Iterator[GitHubClient]:
    """A client authenticating with the fake's personal access token."""
    with GitHubClient(api_url=fake.url, token=fake.token, clock=clock) as client:
        yield client


@pytest.fixture
def app_github(fake: FakeGitHub, clock: Clock) -> Iterator[GitHubClient]:
    """A client authenticating as the fake's GitHub App."""
    with GitHubClient(
        api_url=fake.url, app_id=fake.app_id, private_key=fake.app_private_key_pem, clock=clock
    ) as client:
        yield client


def secrets_of(fake: FakeGitHub) -> list[str]:
    """Every secret that went over the wire or into the client: none may show in an error."""
    values = [fake.token or "", fake.app_private_key_pem]
    values += fake.app_private_key_pem.strip().splitlines()[1:-1]
    for request in fake.requests:
        authorization = request.headers.get("authorization", "")
        if authorization:
            values.append(authorization.partition(" ")[2])
    return [v for v in values if v]


def assert_no_secret(error: BaseException, fake: FakeGitHub) -> None:
    texts = []
    current: BaseException | None = error
    while current is not None:
        texts += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    for secret in secrets_of(fake):
        for text in texts:
            assert secret not in text


# -- the file list ----------------------------------------------------------------------------


def test_every_page_is_fetched_in_order(fake: FakeGitHub, github: GitHubClient) -> None:
    files = make_files(250)
    fake.set_files(REPO, 7, files)
    page = github.list_files(REPO, 7, installation_id=None)
    assert page.entries == files
    assert page.requests == 3
    assert not page.not_modified and not page.truncated
    gets = fake.calls("GET")
    assert [r.query for r in gets] == ["per_page=100", "per_page=100&page=2", "per_page=100&page=3"]
    for request in gets:
        assert request.path == "/repos/octo/repo/pulls/7/files"
        assert request.headers["authorization"] == f"Bearer {fake.token}"
        assert request.headers["accept"] == "application/vnd.github+json"
        assert request.headers["x-github-api-version"] == "2022-11-28"
        assert request.headers["user-agent"] == "flowlens-ingest"


def test_next_links_are_followed_as_given(fake: FakeGitHub, github: GitHubClient) -> None:
    # GitHub's links may name the repository by id rather than by name.
    fake.link_style = "repositories"
    files = make_files(150)
    fake.set_files(REPO, 7, files)
    assert github.list_files(REPO, 7, installation_id=None).entries == files
    assert [r.path.split("/")[1] for r in fake.calls("GET")] == ["repos", "repositories"]


def test_an_enterprise_server_api_url(clock: Clock) -> None:
    with serve_fake_github(prefix="/api/v3", clock=clock) as fake:
        fake.set_files(REPO, 3, make_files(120))
        with GitHubClient(api_url=fake.url + "/", token=fake.token, clock=clock) as github:
            assert len(github.list_files(REPO, 3, installation_id=None).entries) == 120
        assert [r.path for r in fake.calls("GET")] == ["/api/v3/repos/octo/repo/pulls/3/files"] * 2


def test_githubs_3000_file_cap(fake: FakeGitHub, github: GitHubClient) -> None:
    fake.set_files(REPO, 9, make_files(MAX_FILES + 100))
    page = github.list_files(REPO, 9, installation_id=None)
    assert len(page.entries) == MAX_FILES
    assert page.requests == 30  # page 31 is announced, but not fetched
    assert page.truncated
    shaped = shape(page.entries, expected=MAX_FILES + 100)
    assert len(shaped.files) == MAX_FILES
    assert shaped.status is FilesStatus.TRUNCATED


def test_an_etag_match_answers_not_modified_for_free(fake: FakeGitHub, github: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(40))
    first = github.list_files(REPO, 7, installation_id=None)
    assert first.etag is not None and len(first.entries) == 40
    remaining = fake.remaining
    again = github.list_files(REPO, 7, installation_id=None, etag=first.etag)
    assert again.not_modified and again.entries == [] and again.requests == 1
    assert again.etag == first.etag
    assert fake.remaining == remaining  # a 304 costs nothing
    assert fake.calls("GET")[-1].headers["if-none-match"] == first.etag
    # A changed list answers in full again.
    fake.set_files(REPO, 7, make_files(41))
    changed = github.list_files(REPO, 7, installation_id=None, etag=first.etag)
    assert not changed.not_modified and len(changed.entries) == 41
    assert changed.etag not in (None, first.etag)


@pytest.mark.parametrize("count", [100, 101, 250])
def test_no_etag_for_a_list_a_304_could_not_vouch_for(fake: FakeGitHub, github: GitHubClient, count: int) -> None:
    # GitHub's ETag covers one page: a 304 on page 1 would hide a change further down.
    fake.set_files(REPO, 7, make_files(count))
    assert github.list_files(REPO, 7, installation_id=None).etag is None


def test_quoting_and_bad_names(fake: FakeGitHub, github: GitHubClient) -> None:
    with pytest.raises(ValueError):
        github.list_files("no-slash", 1, installation_id=None)
    with pytest.raises(ValueError):
        github.list_files("a/b/c", 1, installation_id=None)
    with pytest.raises(NotFound):
        github.list_files("octo/re po?x", 1, installation_id=None)
    assert fake.calls("GET")[0].path == "/repos/octo/re po?x/pulls/1/files"


# -- bounds: what a broken or hostile server cannot do to the worker ------------------------------


def bounded(fake: FakeGitHub, clock: Clock, **bounds: float) -> GitHubClient:
    return GitHubClient(api_url=fake.url, token=fake.token, clock=clock, **bounds)  # type: ignore[arg-type]


def test_a_trickling_answer_gives_up_at_its_deadline(fake: FakeGitHub, clock: Clock) -> None:
    # A byte every 20 ms: no socket read ever waits long enough to time out.
    fake.stream_files(REPO, 7, trickle_body(0.02))
    started = time.monotonic()
    with bounded(fake, clock, deadline=DEADLINE) as github, pytest.raises(Transient) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert time.monotonic() - started < GIVE_UP
    assert caught.value.reason == "timeout"
    assert_no_secret(caught.value, fake)


@contextmanager
def stalling_server(lines: Iterator[bytes]) -> Iterator[str]:
    """A server that reads one request, then sends `lines` 20 ms apart for as long as the client listens."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            for line in lines:
                if stop.wait(0.02):
                    return
                try:
                    connection.sendall(line)
                except OSError:
                    return  # the client gave up and closed

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.close()
        server.join(10)


@pytest.mark.parametrize(
    "lines",
    [
        # `100 Continue`, again and again: httpx waits for the final status line, each read short.
        lambda: itertools.repeat(b"HTTP/1.1 100 Continue\r\n\r\n"),
        # The status line and headers a byte at a time, never ending.
        lambda: itertools.chain((bytes([c]) for c in b"HTTP/1.1 200 OK\r\nX-A: "), itertools.repeat(b"a")),
    ],
    ids=["endless 100 Continue", "headers a byte at a time"],
)
def test_a_server_that_never_finishes_its_headers_gives_up_at_the_deadline(clock: Clock, lines: Any) -> None:
    raised: list[BaseException] = []

    def call(github: GitHubClient) -> None:
        try:
            github.request_json("GET", "repos/octo/repo")
        except Exception as exc:  # what it raised is the assertion below
            raised.append(exc)

    with (
        stalling_server(lines()) as url,
        GitHubClient(api_url=url, token="t", clock=clock, deadline=DEADLINE) as github,
    ):
        # In a thread: were the request not bounded, the test would fail here rather than hang
        # (the server then stops and closes, which ends the request).
        caller = threading.Thread(target=call, args=(github,), daemon=True)
        caller.start()
        caller.join(GIVE_UP)
        assert not caller.is_alive(), "the request outlived its deadline"
    assert len(raised) == 1 and isinstance(raised[0], Transient) and raised[0].reason == "timeout"


def test_a_limit_whose_body_never_arrives_is_still_waited_for(fake: FakeGitHub, clock: Clock) -> None:
    # A 429 saying "retry after 600 s", whose body then trickles past the deadline: the request
    # fails, but the wait its headers asked for holds.
    fake.stream_files(REPO, 7, trickle_body(0.02), status=429, headers={"retry-after": "600"})
    with bounded(fake, clock, deadline=DEADLINE) as github:
        with pytest.raises(Transient):
            github.list_files(REPO, 7, installation_id=None)
        assert github.wait_of() == Wait(T0 + 600, "secondary")
        with pytest.raises(RateLimited) as caught:
            github.list_files(REPO, 7, installation_id=None)
        assert caught.value.sent is False
    assert len(fake.calls("GET")) == 1


def test_an_answer_that_decodes_to_nothing_gives_up_at_its_deadline(fake: FakeGitHub, clock: Clock) -> None:
    # Bytes keep coming and none of them is content: the deadline is checked on what the network delivers.
    fake.stream_files(REPO, 7, empty_gzip_body, headers={"Content-Encoding": "gzip"})
    started = time.monotonic()
    with bounded(fake, clock, deadline=DEADLINE) as github, pytest.raises(Transient) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert time.monotonic() - started < GIVE_UP
    assert caught.value.reason == "timeout"


def test_an_endless_answer_is_cut_at_the_byte_cap(fake: FakeGitHub, clock: Clock) -> None:
    fake.stream_files(REPO, 7, endless_body)
    with bounded(fake, clock, max_page_bytes=32 * 1024) as github:
        page = github.list_files(REPO, 7, installation_id=None)
    assert page.truncated and page.etag is None
    # The whole entries before the cut are kept, exactly as sent.
    sent = make_files(100)
    assert 0 < len(page.entries) < 100
    assert page.entries == sent[: len(page.entries)]


def test_a_huge_answer_keeps_3000_entries_and_says_truncated(fake: FakeGitHub, github: GitHubClient) -> None:
    fake.stream_files(REPO, 7, huge_body(200 * 1024 * 1024))
    page = github.list_files(REPO, 7, installation_id=None)
    assert len(page.entries) == MAX_FILES and page.truncated
    assert shape(page.entries, expected=None, truncated=page.truncated).status is FilesStatus.TRUNCATED


def test_a_gzip_answer_is_read_and_capped_after_decoding(fake: FakeGitHub, clock: Clock) -> None:
    files = make_files(40)
    body = json.dumps(files).encode()
    fake.stream_files(REPO, 7, lambda: [gzip.compress(body)], headers={"Content-Encoding": "gzip"})
    with bounded(fake, clock) as github:
        assert github.list_files(REPO, 7, installation_id=None).entries == files
    # A bomb: ~70 MB of entries that travel as well under a megabyte, cut once decoded past the cap.
    entry = json.dumps(files[0]).encode()
    bomb = gzip.compress(b"[" + b",".join([entry] * 120_000) + b"]", compresslevel=1)
    assert len(bomb) < 1024 * 1024
    fake.stream_files(REPO, 7, lambda: [bomb], headers={"Content-Encoding": "gzip"})
    with bounded(fake, clock, max_page_bytes=1024 * 1024) as github:
        page = github.list_files(REPO, 7, installation_id=None)
    assert page.truncated and 0 < len(page.entries) < 1024 * 1024 // len(entry)


def test_a_page_of_100000_entries_keeps_3000(fake: FakeGitHub, github: GitHubClient) -> None:
    # The server ignores `per_page` and sends every entry on one page.
    files = [{"filename": f"src/{i:06d}.py", "status": "added"} for i in range(100_000)]
    fake.set_files(REPO, 7, files)
    fake.page_size = len(files)
    page = github.list_files(REPO, 7, installation_id=None)
    assert page.entries == files[:MAX_FILES]
    assert page.truncated and page.requests == 1


def test_pages_past_the_page_limit_are_not_fetched(fake: FakeGitHub, github: GitHubClient) -> None:
    # One entry per page, whatever `per_page` says: 150 pages announced, 100 fetched.
    files = make_files(150)
    fake.set_files(REPO, 7, files)
    fake.page_size = 1
    page = github.list_files(REPO, 7, installation_id=None)
    assert page.entries == files[:100]
    assert page.truncated and page.requests == 100


def test_a_list_past_the_list_budget_is_cut(fake: FakeGitHub, clock: Clock) -> None:
    files = make_files(250)
    fake.set_files(REPO, 7, files)
    page_bytes = len(json.dumps(files[:100]))
    with bounded(fake, clock, max_list_bytes=page_bytes + 5000) as github:
        page = github.list_files(REPO, 7, installation_id=None)
    # Page 1 whole, page 2 read up to what is left of the budget, page 3 never asked for.
    assert 100 < len(page.entries) < 200 and page.entries == files[: len(page.entries)]
    assert page.truncated and page.requests == 2


def test_a_renamed_repository_is_followed_with_the_token(fake: FakeGitHub, github: GitHubClient) -> None:
    files = make_files(150)
    fake.set_files("octo/new-name", 7, files)
    fake.rename(REPO, "octo/new-name")
    page = github.list_files(REPO, 7, installation_id=None)
    assert page.entries == files and page.requests == 2  # one per page, redirects included
    gets = fake.calls("GET")
    old, new = "/repos/octo/repo/pulls/7/files", "/repos/octo/new-name/pulls/7/files"
    assert [r.path for r in gets] == [old, new, new]
    assert all(r.headers["authorization"] == f"Bearer {fake.token}" for r in gets)


def test_a_redirects_body_is_never_read(fake: FakeGitHub, clock: Clock) -> None:
    # A 301 whose body never ends: following it must not wait for that body.
    fake.set_files("octo/new-name", 7, make_files(3))
    fake.rename(REPO, "octo/new-name", body=endless_body)
    started = time.monotonic()
    with bounded(fake, clock, deadline=DEADLINE) as github:
        assert len(github.list_files(REPO, 7, installation_id=None).entries) == 3
    assert time.monotonic() - started < GIVE_UP


def test_a_redirect_that_spent_the_last_request_is_not_followed(fake: FakeGitHub, github: GitHubClient) -> None:
    fake.set_files("octo/new-name", 7, make_files(5))
    fake.rename(REPO, "octo/new-name")
    fake.remaining, fake.reset_at = 1, T0 + 600  # the 301 spends the last request of the window
    with pytest.raises(RateLimited) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert (caught.value.reason, caught.value.retry_at) == ("primary", T0 + 600)
    # The new name was never asked: following the redirect would have been a request into the wall.
    assert [r.path for r in fake.calls("GET")] == ["/repos/octo/repo/pulls/7/files"]
    assert github.wait_of() == Wait(T0 + 600, "primary")


def test_one_request_at_a_time_per_credential_and_none_behind_a_limit(fake: FakeGitHub, github: GitHubClient) -> None:
    # The first request is held in the server, then answered with a secondary limit.
    answer = threading.Event()
    seen: list[int] = []

    def held_then_limited() -> Iterator[bytes]:
        seen.append(1)
        answer.wait(30)
        yield b'{"message": "You have exceeded a secondary rate limit."}'

    fake.stream_files(REPO, 7, held_then_limited, status=429, headers={"retry-after": "30"})
    raised: list[RateLimited] = []

    def ask() -> None:
        with pytest.raises(RateLimited) as caught:
            github.list_files(REPO, 7, installation_id=None)
        raised.append(caught.value)

    first = threading.Thread(target=ask)
    first.start()
    wait_for(lambda: seen, "the first request to reach GitHub")
    # A second thread of the process (the recovery thread beside the files worker), same credential.
    second = threading.Thread(target=ask)
    second.start()
    answer.set()
    first.join(30)
    second.join(30)
    # GitHub saw one request: the second waited its turn, then found the wait the first was told.
    assert len(fake.calls("GET")) == 1
    assert sorted(exc.sent for exc in raised) == [False, True]


def test_a_credentials_requests_never_overlap_within_a_process(fake: FakeGitHub, github: GitHubClient) -> None:
    guard, active, most, overlapped = threading.Lock(), [0], [0], threading.Event()

    def body() -> Iterator[bytes]:
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
            if active[0] > 1:
                overlapped.set()
        try:
            overlapped.wait(0.3)  # the fake holds each answer a moment, or until another overlaps it
            yield b"[]"
        finally:
            with guard:
                active[0] -= 1

    fake.stream_files(REPO, 7, body)
    askers = [
        threading.Thread(target=github.list_files, args=(REPO, 7), kwargs={"installation_id": None}) for _ in range(3)
    ]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(30)
    assert len(fake.calls("GET")) == 3
    assert most[0] == 1  # one at a time, as GitHub advises


def test_bounds_must_be_positive() -> None:
    for bounds in ({"deadline": 0}, {"timeout": -1}, {"max_page_bytes": 0}, {"max_list_bytes": 0}):
        with pytest.raises(ValueError):
            GitHubClient(**bounds)  # type: ignore[arg-type]


# -- rate limits a server should never send: clamped, never a crash ------------------------------


def http_date(epoch: float) -> str:
    return email.utils.formatdate(epoch, usegmt=True)


@pytest.mark.parametrize(
    ("reset", "retry_at"),
    [
        ("1000000000000", T0 + HOUR),  # milliseconds, or a typo: clamped to an hour
        (str(int(T0) + 76 * 365 * 86400), T0 + HOUR),  # seventy-six years ahead
        ("1e300", T0 + HOUR),
        ("nan", T0 + 60),  # unreadable: GitHub's advice of a minute
        ("inf", T0 + 60),
        ("-5", T0 + 1),  # in the past: again in a second, not a pause
        (str(int(T0) - 100), T0 + 1),
        (str(int(T0) + 42), T0 + 42),
    ],
)
def test_an_absurd_primary_reset_is_clamped(
    fake: FakeGitHub, github: GitHubClient, reset: str, retry_at: float
) -> None:
    fake.set_files(REPO, 7, make_files(5))
    fake.primary_reset = reset
    fake.fail_next("primary")
    with pytest.raises(RateLimited) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert (caught.value.reason, caught.value.retry_at) == ("primary", retry_at)


@pytest.mark.parametrize(
    ("retry_after", "retry_at"),
    [
        ("1e300", T0 + HOUR),
        ("soon", T0 + 60),
        ("inf", T0 + 60),
        ("-30", T0 + 1),
        ("Fri, 31 Dec 9999 23:59:59 GMT", T0 + HOUR),
        (http_date(T0 + 600), T0 + 600),
        (http_date(T0 - 600), T0 + 1),
    ],
)
def test_an_absurd_retry_after_is_clamped(
    fake: FakeGitHub, github: GitHubClient, retry_after: str, retry_at: float
) -> None:
    fake.set_files(REPO, 7, make_files(5))
    fake.retry_after = retry_after
    fake.fail_next("secondary")
    with pytest.raises(RateLimited) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert (caught.value.reason, caught.value.retry_at) == ("secondary", retry_at)


def test_an_unreadable_retry_after_on_a_403_is_still_a_rate_limit(fake: FakeGitHub, github: GitHubClient) -> None:
    # No word of a rate limit in the message: the header alone says "wait", not "forbidden".
    fake.stream_files(REPO, 7, lambda: [b'{"message": "Forbidden"}'], status=403, headers={"retry-after": "soon"})
    with pytest.raises(RateLimited) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert (caught.value.reason, caught.value.retry_at, caught.value.status) == ("secondary", T0 + 60, 403)


def test_a_primary_limit_named_only_in_its_message_is_still_a_wait(fake: FakeGitHub, github: GitHubClient) -> None:
    # Its x-ratelimit headers stripped on the way (a proxy): the message alone says it is the limit.
    body = b'{"message": "API rate limit exceeded for installation ID 42."}'
    fake.stream_files(REPO, 7, lambda: [body], status=403)
    with pytest.raises(RateLimited) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert (caught.value.reason, caught.value.retry_at, caught.value.status) == ("primary", T0 + 60, 403)
    with pytest.raises(RateLimited) as again:
        github.list_files(REPO, 7, installation_id=None)
    assert again.value.sent is False
    assert fake.budgets.requests("token") == 1


def test_a_far_reset_pauses_for_an_hour_at_most(fake: FakeGitHub, github: GitHubClient, clock: Clock) -> None:
    fake.set_files(REPO, 7, make_files(5))
    fake.remaining = 10
    fake.reset_at = 4_102_444_800  # 2100-01-01
    github.list_files(REPO, 7, installation_id=None)
    assert github.reserve_exhausted(100) == T0 + HOUR


def test_rate_limit_headers_that_are_not_numbers_are_ignored(fake: FakeGitHub, github: GitHubClient) -> None:
    headers = {"x-ratelimit-remaining": "nan", "x-ratelimit-limit": "inf", "x-ratelimit-reset": "1e999"}
    fake.stream_files(REPO, 7, lambda: [b"[]"], headers=headers)
    assert github.list_files(REPO, 7, installation_id=None).entries == []
    assert github.rate_limit == RateLimit(remaining=None, reset=None, limit=None)
    assert github.reserve_exhausted(100) is None


# -- errors -----------------------------------------------------------------------------------


def test_primary_rate_limit(fake: FakeGitHub, github: GitHubClient, clock: Clock) -> None:
    fake.set_files(REPO, 7, make_files(5))
    fake.reset_in = 42
    fake.fail_next("primary")
    with pytest.raises(RateLimited) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert caught.value.reason == "primary"
    assert caught.value.retry_at == T0 + 42
    assert caught.value.status == 403
    assert github.rate_limit.remaining == 0
    assert github.reserve_exhausted(1) == T0 + 42
    assert_no_secret(caught.value, fake)


# -- GitHub's clock, not ours: its Date header is what its times are read against -------------

SKEW = 30.0  # the client's clock runs this far ahead of GitHub's


@pytest.fixture
def ahead(fake: FakeGitHub) -> Iterator[GitHubClient]:
    """A client whose clock runs SKEW seconds ahead of the fake GitHub's (at T0)."""
    with GitHubClient(api_url=fake.url, token=fake.token, clock=Clock(T0 + SKEW)) as client:
        yield client


def test_a_reset_is_waited_for_in_full_when_our_clock_runs_ahead_of_githubs(
    fake: FakeGitHub, ahead: GitHubClient
) -> None:
    # Reset 25 s ahead by GitHub's clock, 5 s past by ours: still 25 s to wait, not a retry in a second.
    fake.set_files(REPO, 7, make_files(5))
    fake.reset_in = 25
    fake.fail_next("primary")
    with pytest.raises(RateLimited) as caught:
        ahead.list_files(REPO, 7, installation_id=None)
    assert caught.value.retry_at == T0 + SKEW + 25
    assert ahead.wait_of() == Wait(T0 + SKEW + 25, "primary")
    assert ahead.reserve_exhausted(1) == T0 + SKEW + 25


def test_a_budget_spent_on_a_success_is_a_wait_when_our_clock_runs_ahead(fake: FakeGitHub, ahead: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(5))
    fake.remaining, fake.reset_at = 1, T0 + 20  # this answer spends the last request
    ahead.list_files(REPO, 7, installation_id=None)
    assert ahead.wait_of() == Wait(T0 + SKEW + 20, "primary")
    with pytest.raises(RateLimited) as caught:
        ahead.list_files(REPO, 7, installation_id=None)
    assert caught.value.sent is False


def test_a_retry_after_date_is_read_on_githubs_clock(fake: FakeGitHub, ahead: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(5))
    fake.retry_after = http_date(T0 + 600)
    fake.fail_next("secondary")
    with pytest.raises(RateLimited) as caught:
        ahead.list_files(REPO, 7, installation_id=None)
    assert (caught.value.reason, caught.value.retry_at) == ("secondary", T0 + SKEW + 600)


def test_a_primary_limit_with_a_longer_retry_after_waits_the_longer(fake: FakeGitHub, github: GitHubClient) -> None:
    headers = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(T0) + 5), "retry-after": "120"}
    fake.stream_files(REPO, 7, lambda: [b'{"message": "API rate limit exceeded"}'], status=403, headers=headers)
    with pytest.raises(RateLimited) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert (caught.value.reason, caught.value.retry_at) == ("primary", T0 + 120)


def test_secondary_limits_in_a_row_wait_twice_as_long_each_time(
    fake: FakeGitHub, github: GitHubClient, clock: Clock
) -> None:
    fake.set_files(REPO, 7, make_files(5))

    def limited_for() -> float:
        fake.fail_next("secondary_403")  # no retry-after: GitHub's minute, then longer
        with pytest.raises(RateLimited) as caught:
            github.list_files(REPO, 7, installation_id=None)
        assert github.wait_of() == Wait(caught.value.retry_at, "secondary")
        waited = caught.value.retry_at - clock.now
        clock.now = caught.value.retry_at  # waited out, not a second early
        return waited

    assert [limited_for() for _ in range(4)] == [60, 120, 240, 480]
    github.list_files(REPO, 7, installation_id=None)  # an answer: the next limit is a first again
    assert limited_for() == 60


def test_primary_budget_used_up(fake: FakeGitHub, github: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(5))
    fake.remaining = 1
    github.list_files(REPO, 7, installation_id=None)
    with pytest.raises(RateLimited) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert (caught.value.reason, caught.value.retry_at) == ("primary", int(fake.reset_at))


def test_rate_limit_headers_and_the_reserve(fake: FakeGitHub, github: GitHubClient, clock: Clock) -> None:
    fake.set_files(REPO, 7, make_files(5))
    fake.remaining = 10
    assert github.rate_limit.remaining is None and github.reserve_exhausted(100) is None
    github.list_files(REPO, 7, installation_id=None)
    limit = github.rate_limit
    assert (limit.remaining, limit.limit, limit.reset) == (9, 5000, int(fake.reset_at))
    assert github.reserve_exhausted(10) == int(fake.reset_at)
    assert github.reserve_exhausted(9) is None
    clock.now = fake.reset_at + 1  # the reset has passed: the budget is back
    assert github.reserve_exhausted(10) is None


def test_secondary_rate_limit_with_retry_after(fake: FakeGitHub, github: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(5))
    fake.retry_after = 30
    fake.fail_next("secondary")
    with pytest.raises(RateLimited) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert (caught.value.reason, caught.value.retry_at, caught.value.status) == ("secondary", T0 + 30, 429)


def test_secondary_rate_limit_without_retry_after(fake: FakeGitHub, github: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(5))
    fake.fail_next("secondary_403")
    with pytest.raises(RateLimited) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert (caught.value.reason, caught.value.retry_at, caught.value.status) == ("secondary", T0 + 60, 403)


def test_a_server_error_is_transient_and_not_retried(fake: FakeGitHub, github: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(5))
    fake.fail_next("server")
    with pytest.raises(Transient) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert (caught.value.reason, caught.value.status) == ("server_error", 502)
    assert len(fake.calls("GET")) == 1
    # The next call (the job's retry) goes through.
    assert len(github.list_files(REPO, 7, installation_id=None).entries) == 5


def test_a_server_error_with_retry_after_is_a_wait_for_the_credential(fake: FakeGitHub, github: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(5))
    fake.set_files(REPO, 8, make_files(5))
    fake.budgets.limit_next("token", retry_after=120, kind="unavailable", status=503)
    with pytest.raises(RateLimited) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert (caught.value.reason, caught.value.retry_at, caught.value.status) == ("unavailable", T0 + 120, 503)
    assert "GitHub unavailable (503)" in str(caught.value)
    # GitHub said when to come back: no request with that credential before then, for any pull request.
    with pytest.raises(RateLimited) as again:
        github.list_files(REPO, 8, installation_id=None)
    assert (again.value.sent, again.value.retry_at) == (False, T0 + 120)
    assert str(again.value).startswith("GitHub unavailable for token:")
    assert (fake.budgets.requests("token"), fake.budgets.requests_while_limited("token")) == (1, 0)


DEEP = b"[" * 100_000 + b"]" * 100_000  # past what Python's JSON parser recurses into
DEEPER_THAN_ANY_ANSWER = b"[" * 200 + b"]" * 200


@pytest.mark.parametrize(
    ("body", "reason"),
    [(DEEP, "too_deep"), (b"[" + DEEP + b"]", "too_deep"), (b'[{"filename": "\xff"}]', "bad_json")],
    ids=["deep", "deep_item", "not_utf8"],
)
def test_a_file_list_too_deep_or_not_text_is_an_unreadable_answer(
    fake: FakeGitHub, github: GitHubClient, body: bytes, reason: str
) -> None:
    fake.stream_files(REPO, 7, lambda: [body])
    with pytest.raises(Transient) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert caught.value.reason == reason


@pytest.mark.parametrize("body", [DEEP, DEEPER_THAN_ANY_ANSWER], ids=["past_the_parser", "past_the_bound"])
def test_a_json_answer_too_deep_to_use_is_an_unreadable_answer(
    fake: FakeGitHub, github: GitHubClient, body: bytes
) -> None:
    fake.stream_files(REPO, 7, lambda: [body])
    with pytest.raises(Transient) as caught:
        github.request_json("GET", f"repos/{REPO}/pulls/7/files")
    assert caught.value.reason == "too_deep"


def test_a_page_of_patches_full_of_commas_is_read_whole(fake: FakeGitHub, github: GitHubClient) -> None:
    # CSV diffs: millions of commas and brackets inside strings are text, not JSON structure.
    files = make_files(100)
    for entry in files:
        entry["patch"] = "@@ -1 +1 @@\n+" + ",[{" * 20_000
    fake.set_files(REPO, 7, files)
    page = github.list_files(REPO, 7, installation_id=None)
    assert len(page.entries) == 100 and page.entries[0]["patch"] == files[0]["patch"]


def test_a_refusal_whose_body_is_too_deep_to_read_is_still_a_refusal(fake: FakeGitHub, github: GitHubClient) -> None:
    fake.stream_files(REPO, 7, lambda: [DEEP], status=403)
    with pytest.raises(Forbidden) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert "no message" in str(caught.value)


def test_a_list_past_its_deadline_asks_for_no_further_page(fake: FakeGitHub, github: GitHubClient) -> None:
    # Each page is bounded by its own deadline; the whole list by one more (here: spent once the
    # first page is in), so a slow server cannot hold a job page after page: what came is kept, cut.
    fake.set_files(REPO, 7, make_files(250))
    github.list_deadline_s = 0.0
    page = github.list_files(REPO, 7, installation_id=None)
    assert (len(page.entries), page.truncated) == (100, True)
    assert len(fake.calls("GET")) == 1


def test_a_failure_on_a_later_page(fake: FakeGitHub, github: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(150))
    # The first page answers, the second does not: nothing half-listed comes back.
    fake.fail_next("bad_json", after=1)
    with pytest.raises(Transient) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert caught.value.reason == "bad_json"
    assert [r.query for r in fake.calls("GET")] == ["per_page=100", "per_page=100&page=2"]


def test_not_found(fake: FakeGitHub, github: GitHubClient) -> None:
    with pytest.raises(NotFound) as caught:
        github.list_files(REPO, 404, installation_id=None)
    assert (caught.value.reason, caught.value.status) == ("not_found", 404)
    fake.set_files(REPO, 7, make_files(5))
    fake.fail_next("gone")
    with pytest.raises(NotFound):
        github.list_files(REPO, 7, installation_id=None)


def test_forbidden(fake: FakeGitHub, github: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(5))
    fake.fail_next("forbidden")
    with pytest.raises(Forbidden) as caught:
        github.list_files(REPO, 7, installation_id=None)
    assert caught.value.reason == "forbidden"
    assert "Resource not accessible by integration" in str(caught.value)
    assert_no_secret(caught.value, fake)


def test_a_bad_token_is_unauthorized_at_once(fake: FakeGitHub, clock: Clock) -> None:
    fake.set_files(REPO, 7, make_files(5))
    with (
        GitHubClient(api_url=fake.url, token="ghp_not_the_right_one", clock=clock) as github,
        pytest.raises(Unauthorized) as caught,
    ):
        github.list_files(REPO, 7, installation_id=None)
    assert len(fake.calls("GET")) == 1
    assert "ghp_not_the_right_one" not in str(caught.value)


def test_github_unreachable_is_transient(clock: Clock) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens there now: the connection is refused.
    with (
        GitHubClient(api_url=f"http://127.0.0.1:{port}", token="ghp_secret_value", clock=clock) as github,
        pytest.raises(Transient) as caught,
    ):
        github.list_files(REPO, 7, installation_id=None)
    assert caught.value.reason == "connection"
    assert caught.value.__context__ is None and caught.value.__cause__ is None
    assert "ghp_secret_value" not in str(caught.value)


def test_a_timeout_is_transient(clock: Clock) -> None:
    # A listening socket that never answers: the read times out.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with (
            GitHubClient(api_url=url, token="ghp_secret_value", clock=clock, timeout=0.2) as github,
            pytest.raises(Transient) as caught,
        ):
            github.list_files(REPO, 7, installation_id=None)
    assert caught.value.reason == "timeout"


def test_a_link_to_another_host_is_not_followed(fake: FakeGitHub, clock: Clock) -> None:
    fake.set_files(REPO, 7, make_files(150))
    # Our API URL names the server otherwise than its links do: the token must not follow them.
    url = fake.url.replace("127.0.0.1", "localhost")
    with (
        GitHubClient(api_url=url, token=fake.token, clock=clock) as github,
        pytest.raises(GitHubError) as caught,
    ):
        github.list_files(REPO, 7, installation_id=None)
    assert caught.value.reason == "bad_link"
    assert len(fake.calls("GET")) == 1


# -- credentials ------------------------------------------------------------------------------


def test_describe_and_enabled(fake: FakeGitHub) -> None:
    key = fake.app_private_key_pem
    cases = [
        (GitHubClient(), False, "none"),
        (GitHubClient(token="ghp_x"), True, "token"),
        (GitHubClient(app_id=12, private_key=key), True, "GitHub App 12"),
        (GitHubClient(app_id="12", private_key=key, token="ghp_x"), True, "GitHub App 12, token fallback"),
    ]
    for client, enabled, description in cases:
        with client:
            assert client.enabled is enabled
            assert client.describe() == description
            assert "ghp_x" not in repr(client) and "PRIVATE" not in repr(client)
    with pytest.raises(ValueError):
        GitHubClient(app_id=12)
    with pytest.raises(ValueError):
        GitHubClient(private_key=key)


def test_a_bad_private_key_is_refused_without_echoing_it() -> None:
    text = "-----BEGIN RSA PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END RSA PRIVATE KEY-----\n"
    with pytest.raises(ValueError) as caught:
        GitHubClient(app_id=1, private_key=text)
    assert "c2VjcmV0" not in str(caught.value)
    # The parser's own error is not shown with it.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_key_with_escaped_newlines_is_accepted(fake: FakeGitHub, clock: Clock) -> None:
    one_line = fake.app_private_key_pem.strip().replace("\n", "\\n")
    fake.set_files(REPO, 7, make_files(3))
    with GitHubClient(api_url=fake.url, app_id=fake.app_id, private_key=one_line, clock=clock) as github:
        assert len(github.list_files(REPO, 7, installation_id=5).entries) == 3


def test_no_credential_is_forbidden(fake: FakeGitHub, clock: Clock) -> None:
    fake.set_files(REPO, 7, make_files(3))
    with (
        GitHubClient(api_url=fake.url, clock=clock) as github,
        pytest.raises(Forbidden) as caught,
    ):
        github.list_files(REPO, 7, installation_id=5)
    assert caught.value.reason == "no_credential"
    assert fake.requests == []


def test_an_app_needs_the_installation(fake: FakeGitHub, app_github: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(3))
    with pytest.raises(Forbidden) as caught:
        app_github.list_files(REPO, 7, installation_id=None)
    assert str(caught.value) == "no credential for this repository"
    assert fake.requests == []


def test_an_app_falls_back_to_the_token_without_installation(fake: FakeGitHub, clock: Clock) -> None:
    fake.set_files(REPO, 7, make_files(3))
    key = fake.app_private_key_pem
    with GitHubClient(api_url=fake.url, app_id=fake.app_id, private_key=key, token=fake.token, clock=clock) as github:
        assert len(github.list_files(REPO, 7, installation_id=None).entries) == 3
        assert fake.calls("POST") == []
        assert fake.calls("GET")[0].headers["authorization"] == f"Bearer {fake.token}"
        # With an installation id, the App's token is used instead.
        github.list_files(REPO, 7, installation_id=5)
        assert fake.calls("GET")[-1].headers["authorization"].startswith("Bearer ghs_")


def test_installation_token_is_minted_once_and_cached(fake: FakeGitHub, app_github: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(150))
    assert len(app_github.list_files(REPO, 7, installation_id=5).entries) == 150
    assert len(app_github.list_files(REPO, 7, installation_id=5).entries) == 150
    posts = fake.calls("POST")
    assert [r.path for r in posts] == ["/app/installations/5/access_tokens"]
    assert posts[0].headers["authorization"].startswith("Bearer ey")
    tokens = {r.headers["authorization"] for r in fake.calls("GET")}
    assert len(tokens) == 1 and tokens.pop().startswith("Bearer ghs_")
    # Another installation has a token of its own.
    app_github.list_files(REPO, 7, installation_id=6)
    assert [r.path for r in fake.calls("POST")][-1] == "/app/installations/6/access_tokens"


def test_installation_token_is_renewed_before_it_expires(
    fake: FakeGitHub, app_github: GitHubClient, clock: Clock
) -> None:
    fake.set_files(REPO, 7, make_files(3))
    fake.token_ttl = 3600
    app_github.list_files(REPO, 7, installation_id=5)
    clock.now = T0 + 3600 - 301  # still more than 5 minutes left
    app_github.list_files(REPO, 7, installation_id=5)
    assert len(fake.calls("POST")) == 1
    clock.now = T0 + 3600 - 299
    app_github.list_files(REPO, 7, installation_id=5)
    assert len(fake.calls("POST")) == 2


def test_a_revoked_token_is_minted_again_once(fake: FakeGitHub, app_github: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(3))
    app_github.list_files(REPO, 7, installation_id=5)
    fake.revoke_tokens()
    page = app_github.list_files(REPO, 7, installation_id=5)
    assert len(page.entries) == 3
    assert page.requests == 2  # the refused GET and its retry
    assert len(fake.calls("POST")) == 2


def test_a_token_refused_twice_is_unauthorized(fake: FakeGitHub, app_github: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(3))
    fake.fail_next("unauthorized", times=2)
    with pytest.raises(Unauthorized) as caught:
        app_github.list_files(REPO, 7, installation_id=5)
    assert caught.value.reason == "unauthorized"
    assert len(fake.calls("POST")) == 2 and len(fake.calls("GET")) == 2
    assert_no_secret(caught.value, fake)


def test_a_jwt_signed_with_the_wrong_key_is_refused(fake: FakeGitHub, clock: Clock) -> None:
    fake.set_files(REPO, 7, make_files(3))
    wrong_key = generate_private_key_pem()
    with (
        GitHubClient(api_url=fake.url, app_id=fake.app_id, private_key=wrong_key, clock=clock) as github,
        pytest.raises(Unauthorized) as caught,
    ):
        github.list_files(REPO, 7, installation_id=5)
    assert fake.calls("GET") == []
    assert_no_secret(caught.value, fake)
    assert "PRIVATE" not in str(caught.value)


def test_a_jwt_for_another_app_or_from_a_skewed_clock_is_refused(fake: FakeGitHub, clock: Clock) -> None:
    key = fake.app_private_key_pem
    with (
        GitHubClient(api_url=fake.url, app_id=fake.app_id + 1, private_key=key, clock=clock) as github,
        pytest.raises(Unauthorized),
    ):
        github.installation_token(5)
    late = Clock(T0 + 3600)  # our clock an hour ahead of GitHub's
    with (
        GitHubClient(api_url=fake.url, app_id=fake.app_id, private_key=key, clock=late) as github,
        pytest.raises(Unauthorized),
    ):
        github.installation_token(5)
    with GitHubClient(api_url=fake.url, app_id=fake.app_id, private_key=key, clock=clock) as github:
        assert github.installation_token(5).startswith("ghs_")


def test_minting_errors(fake: FakeGitHub, app_github: GitHubClient, clock: Clock) -> None:
    fake.set_files(REPO, 7, make_files(3))
    fake.fail_next("server", route="access_tokens")
    with pytest.raises(Transient):
        app_github.list_files(REPO, 7, installation_id=5)
    fake.fail_next("secondary", route="access_tokens")
    with pytest.raises(RateLimited) as limited:
        app_github.list_files(REPO, 7, installation_id=5)
    # Named for the budget it binds, with the wait that credential now honours.
    assert limited.value.credential == f"app:{fake.app_id}"
    assert limited.value.retry_at == app_github.wait_of(app=True).until  # type: ignore[union-attr]
    # The App's JWT is told to wait: no mint leaves until then, the limit comes back at once.
    posts = len(fake.calls("POST"))
    with pytest.raises(RateLimited) as walled:
        app_github.list_files(REPO, 7, installation_id=5)
    assert not walled.value.sent and walled.value.credential == f"app:{fake.app_id}"
    assert len(fake.calls("POST")) == posts
    clock.now += fake.retry_after + 1  # type: ignore[operator]
    fake.installations = {5}
    with pytest.raises(Forbidden) as caught:
        app_github.list_files(REPO, 7, installation_id=6)
    assert caught.value.reason == "no_installation"
    assert len(app_github.list_files(REPO, 7, installation_id=5).entries) == 3


def test_concurrent_calls_mint_one_token(fake: FakeGitHub, app_github: GitHubClient) -> None:
    fake.set_files(REPO, 7, make_files(3))
    with ThreadPoolExecutor(max_workers=8) as pool:
        pages = list(pool.map(lambda _: app_github.list_files(REPO, 7, installation_id=5), range(16)))
    assert all(len(page.entries) == 3 for page in pages)
    assert len(fake.calls("POST")) == 1


def test_a_thread_waits_for_another_threads_mint_only_so_long(fake: FakeGitHub, app_github: GitHubClient) -> None:
    assert app_github._app is not None
    app_github._app.mint_wait_s = 0.5
    arrived, answer = fake.hold_next("access_tokens")
    minting = threading.Thread(target=app_github.installation_token, args=(5,))
    minting.start()
    try:
        assert arrived.wait(30), "the mint never reached GitHub"
        started = time.monotonic()
        with pytest.raises(Transient) as caught:
            app_github.installation_token(5)
        assert caught.value.reason == "busy" and time.monotonic() - started < 5
    finally:
        answer.set()
        minting.join(30)
    assert app_github.installation_token(5).startswith("ghs_")  # the held mint's token, cached
    assert len(fake.calls("POST")) == 1


def test_a_caller_supplied_httpx_client(fake: FakeGitHub, clock: Clock) -> None:
    fake.set_files(REPO, 7, make_files(3))
    with httpx.Client(headers={"User-Agent": "custom"}) as http:
        github = GitHubClient(api_url=fake.url, token=fake.token, client=http, clock=clock)
        assert len(github.list_files(REPO, 7, installation_id=None).entries) == 3
        github.close()  # leaves the caller's client open
        assert not http.is_closed
    request = fake.calls("GET")[0]
    assert request.headers["user-agent"] == "custom"
    assert request.headers["x-github-api-version"] == "2022-11-28"


# -- the fake on its own ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_fake_runs_standalone(tmp_path: Path) -> None:
    key_file = tmp_path / "app.pem"
    command = [sys.executable, "-m", "tests.fake_github", "--port", "0", "--files", "octo/repo#7=120"]
    command += ["--write-private-key", str(key_file)]
    root = Path(__file__).resolve().parent.parent
    with subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            with GitHubClient(api_url=url, app_id=424242, private_key=key_file.read_text()) as github:
                assert len(github.list_files(REPO, 7, installation_id=1).entries) == 120
                httpx.post(f"{url}/_fake/files/octo/repo/8", json={"count": 3}).raise_for_status()
                assert len(github.list_files(REPO, 8, installation_id=1).entries) == 3
                httpx.post(f"{url}/_fake/fail", json={"kind": "gone"}).raise_for_status()
                with pytest.raises(NotFound):
                    github.list_files(REPO, 8, installation_id=1)
            recorded = httpx.get(f"{url}/_fake/requests").json()
            assert [r[0] for r in recorded] == ["POST", "GET", "GET", "GET", "GET"]
        finally:
            process.terminate()
            process.wait(timeout=10)
        assert process.returncode == 0


# -- one budget per credential: GitHub's wait is a wall ------------------------------------------


def test_a_credential_told_to_wait_sends_nothing_until_then_and_the_others_go_on(
    fake: FakeGitHub, clock: Clock
) -> None:
    fake.set_files(REPO, 7, make_files(3))
    both = GitHubClient(
        api_url=fake.url, token=fake.token, app_id=fake.app_id, private_key=fake.app_private_key_pem, clock=clock
    )
    with both:
        fake.budgets.limit_next("token", retry_after=600)
        with pytest.raises(RateLimited) as told:
            both.list_files(REPO, 7, installation_id=None)
        assert told.value.sent and told.value.retry_at == T0 + 600
        sent = fake.budgets.requests("token")
        for _ in range(3):
            with pytest.raises(RateLimited) as refused:
                both.list_files(REPO, 7, installation_id=None)
            assert not refused.value.sent and refused.value.retry_at == T0 + 600
        assert fake.budgets.requests("token") == sent
        # An installation has its own budget: it goes on.
        assert len(both.list_files(REPO, 7, installation_id=5).entries) == 3
        assert both.wait_of(installation_id=5) is None and both.wait_of() is not None
        clock.now += 600
        assert len(both.list_files(REPO, 7, installation_id=None).entries) == 3
    assert fake.budgets.requests_while_limited("token") == 0


def test_a_successful_answer_with_nothing_left_is_a_wall_until_the_reset(
    fake: FakeGitHub, github: GitHubClient, clock: Clock
) -> None:
    fake.set_files(REPO, 7, make_files(3))
    fake.remaining = 1
    fake.reset_at = T0 + 42
    assert len(github.list_files(REPO, 7, installation_id=None).entries) == 3  # spends the last request
    sent = len(fake.requests)
    with pytest.raises(RateLimited) as refused:
        github.list_files(REPO, 7, installation_id=None)
    assert (refused.value.reason, refused.value.retry_at, refused.value.sent) == ("primary", T0 + 42, False)
    assert len(fake.requests) == sent


def test_credential_keys_name_no_secret(fake: FakeGitHub, github: GitHubClient) -> None:
    key = github.credential_key()
    assert key.startswith("token:") and len(key) == len("token:") + 12
    assert fake.token is not None and fake.token not in key and key[6:] not in fake.token
    fake.budgets.limit_next("token", retry_after=600)
    with pytest.raises(RateLimited) as told:
        github.request_json("GET", "repos/octo/repo")
    assert key in str(told.value) and fake.token not in str(told.value)


def test_a_credential_the_http_library_will_not_send_is_not_quoted_in_the_error(fake: FakeGitHub) -> None:
    # A minted token or a token with a control character: httpx refuses the header in a message
    # that quotes it, Authorization and all; the error says what happened without it.
    token = "ghp_SECRETsecret\rSECRET"
    with GitHubClient(api_url=fake.url, token=token) as client, pytest.raises(Transient) as refused:
        client.list_files(REPO, 7, installation_id=None)
    for text in (str(refused.value), repr(refused.value)):
        assert "SECRETsecret" not in text
    assert "a header it cannot send" in str(refused.value)
    assert fake.calls("GET") == []
