"""The files worker against a fake GitHub on loopback and a real PostgreSQL.

Deliveries go through the service's own path (map, plan, one transaction), which
enqueues the job; the worker then fetches from the fake and writes the list back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psutil
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.engine import Engine

from flowlens_ingest.config import Settings
from flowlens_ingest.events.enums import FilesStatus
from flowlens_ingest.github import jobs
from flowlens_ingest.github.client import GitHubClient
from flowlens_ingest.github.enrich import Enricher
from flowlens_ingest.github.files import MAX_FILES
from flowlens_ingest.metrics import instruments
from flowlens_ingest.store.schema import files_jobs, pull_requests

from .fake_github import FakeGitHub, endless_body, huge_body, make_files, serve_fake_github, trickle_body
from .helpers import database_of, rows, wait_for
from .serving import Service, metric
from .stories import START, apply, pull_request, repository, sha_for

REPO = repository(9_100_001, "octo/enrich")
SHA_A, SHA_B = sha_for("enrich", "a"), sha_for("enrich", "b")


def at(seconds: int) -> Any:
    return START + timedelta(seconds=seconds)


def opened(number: int = 1, sha: str = SHA_A, **kwargs: Any) -> dict[str, Any]:
    return pull_request("opened", REPO, number, sha, at(10), **kwargs)


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    with serve_fake_github() as fake:
        yield fake


class Clock:
    """Wall-clock time that also moves when told: a pause of an hour is over without waiting it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def make_enricher(
    db: Engine,
    github: FakeGitHub,
    *,
    clock: Callable[[], float] = time.time,
    bounds: dict[str, Any] | None = None,
    retry_base_s: float = 0.05,
    **settings: Any,
) -> Enricher:
    """A worker on the fake; `bounds` are its GitHub client's (deadline, byte caps)."""
    values: dict[str, Any] = {"github_api_url": github.url, "github_token": github.token, **settings}
    config = Settings(**values)
    client = GitHubClient(api_url=github.url, token=github.token, clock=clock, **(bounds or {}))
    return Enricher(config, database_of(db), client, instruments(), retry_base_s=retry_base_s, clock=clock)


def pr_row(db: Engine, number: int = 1) -> dict[str, Any]:
    (row,) = [
        r
        for r in rows(
            db,
            pull_requests,
            "pr_number",
            "commit_sha",
            "files_changed",
            "files_changed_sha",
            "files_status",
            "version",
            "processed",
        )
        if r["pr_number"] == number
    ]
    return row


def job_rows(db: Engine) -> list[dict[str, Any]]:
    return rows(db, files_jobs, "pr_number", "head_sha", "state", "result", "attempts")


def job_timing(db: Engine, number: int = 1) -> dict[str, Any]:
    """A job's lease and how far ahead it is due, in seconds from the database's now."""
    j = files_jobs
    ahead = sa.func.extract("epoch", j.c.run_after - sa.func.now()).label("due_in_s")
    with db.connect() as conn:
        row = conn.execute(
            sa.select(j.c.state, j.c.leased_until, j.c.lease_token, j.c.attempts, j.c.last_error, ahead).where(
                j.c.pr_number == number
            )
        ).one()
    return dict(row._mapping)


def outcomes(outcome: str) -> float:
    """How many files jobs this process has counted with `outcome`."""
    return REGISTRY.get_sample_value("flowlens_files_jobs_total", {"outcome": outcome}) or 0.0


def peak_rss_growth(work: Callable[[], Any]) -> int:
    """Run `work`; how far above its starting point the process's resident memory went meanwhile (sampled)."""
    process = psutil.Process()
    start = process.memory_info().rss
    peak, done = start, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return peak - start


def file_requests(github: FakeGitHub) -> int:
    return len(github.calls("GET", contains="/files"))


def drain(enricher: Enricher) -> int:
    """Work every due job; how many were worked."""
    done = 0
    while enricher.run_once():
        done += 1
    return done


def test_an_opened_pr_gets_every_page_of_its_files_flagged_once(db, github):
    files = make_files(250)
    github.set_files("octo/enrich", 1, files)
    assert apply(db, "pull_request", opened()) == "applied"
    before = pr_row(db)
    assert (before["files_status"], before["files_changed"], before["version"]) == ("pending", None, 1)
    assert job_rows(db) == [{"pr_number": 1, "head_sha": SHA_A, "state": "pending", "result": None, "attempts": 0}]
    with db.begin() as conn:
        conn.execute(sa.update(pull_requests).values(processed=True))

    assert drain(make_enricher(db, github)) == 1

    after = pr_row(db)
    assert [f["filename"] for f in after["files_changed"]] == [f["filename"] for f in files]
    assert after["files_changed"][0] == {k: files[0][k] for k in after["files_changed"][0]}
    assert "blob_url" not in after["files_changed"][0]
    assert (after["files_changed_sha"], after["files_status"]) == (SHA_A, "fetched")
    assert (after["processed"], after["version"]) == (False, 2)
    assert file_requests(github) == 3  # 100 + 100 + 50, following the Link headers
    assert job_rows(db)[0]["state"] == "done"


def test_a_burst_for_one_head_is_one_job_and_one_fetch(db, github):
    github.set_files("octo/enrich", 1, make_files(3))
    apply(db, "pull_request", opened())
    apply(db, "pull_request", pull_request("labeled", REPO, 1, SHA_A, at(10)))
    apply(db, "pull_request", pull_request("review_requested", REPO, 1, SHA_A, at(11)))
    assert len(job_rows(db)) == 1
    assert drain(make_enricher(db, github)) == 1
    assert file_requests(github) == 1
    # Later deliveries of the same head ask for nothing more.
    apply(db, "pull_request", pull_request("assigned", REPO, 1, SHA_A, at(12)))
    assert drain(make_enricher(db, github)) == 0
    assert pr_row(db)["files_status"] == "fetched"


def test_a_new_head_replaces_the_list_and_a_late_fetch_of_the_old_head_is_dropped(db, github):
    github.set_files("octo/enrich", 1, make_files(2, prefix="old/"))
    apply(db, "pull_request", opened())
    enricher = make_enricher(db, github)
    # A worker claims the job for head A ...
    old_job = jobs.claim(database_of(db), timedelta(seconds=60))
    assert old_job is not None and old_job.head_sha == SHA_A
    # ... the PR moves to head B meanwhile ...
    apply(db, "pull_request", pull_request("synchronize", REPO, 1, SHA_B, at(20)))
    assert pr_row(db)["files_status"] == "pending"
    # ... and the fetch for A finishes late: nothing of it lands.
    enricher.work(old_job)
    assert (pr_row(db)["files_changed"], pr_row(db)["version"]) == (None, 2)
    assert job_rows(db)[0]["head_sha"] == SHA_B

    github.set_files("octo/enrich", 1, make_files(4, prefix="new/"))
    assert drain(enricher) == 1
    row = pr_row(db)
    assert [f["filename"].split("/")[0] for f in row["files_changed"]] == ["new"] * 4
    assert (row["files_changed_sha"], row["files_status"], row["version"]) == (SHA_B, "fetched", 3)
    # An older delivery of head A arriving now changes neither the PR nor the job.
    apply(db, "pull_request", pull_request("synchronize", REPO, 1, SHA_A, at(15)))
    assert (pr_row(db)["commit_sha"], job_rows(db)[0]["head_sha"]) == (SHA_B, SHA_B)
    assert drain(enricher) == 0


def test_a_refetch_that_github_answers_304_changes_nothing_and_costs_no_quota(db, github):
    github.set_files("octo/enrich", 1, make_files(5))
    apply(db, "pull_request", opened())
    enricher = make_enricher(db, github)
    drain(enricher)
    remaining = github.remaining
    # Reopened: the base may have moved, so the same head is fetched again; its list
    # stays `fetched` meanwhile.
    apply(db, "pull_request", pull_request("reopened", REPO, 1, SHA_A, at(30)))
    version = pr_row(db)["version"]
    assert pr_row(db)["files_status"] == "fetched"
    assert drain(enricher) == 1
    (last,) = github.calls("GET", contains="/files")[-1:]
    assert last.headers.get("if-none-match")
    assert github.remaining == remaining
    assert (pr_row(db)["version"], pr_row(db)["files_status"]) == (version, "fetched")


def test_the_primary_rate_limit_reschedules_to_the_reset_and_nothing_is_sent_until_then(db, github):
    github.set_files("octo/enrich", 1, make_files(2))
    github.set_files("octo/enrich", 2, make_files(2))
    github.reset_in = 2
    github.fail_next("primary")
    apply(db, "pull_request", opened())
    enricher = make_enricher(db, github)
    assert enricher.run_once()
    (job,) = job_rows(db)
    assert (job["state"], job["attempts"]) == ("pending", 0)  # a rate limit spends no attempt
    requests_so_far = len(github.requests)
    # Another job of the same credential: rescheduled to the reset without a request.
    apply(db, "pull_request", opened(2, sha_for("primary-wall", 2)))
    assert enricher.run_once()
    assert len(github.requests) == requests_so_far
    assert job_timing(db, 2)["state"] == "pending" and job_timing(db, 2)["attempts"] == 0
    assert not enricher.run_once()  # nothing due before the reset
    wait_for(lambda: drain(enricher) >= 0 and pr_row(db)["files_status"] == "fetched", timeout=30, what="the reset")
    assert github.budgets.requests_while_limited("token") == 0


def test_a_secondary_rate_limit_waits_for_retry_after(db, github):
    github.set_files("octo/enrich", 1, make_files(2))
    github.retry_after = 1
    github.fail_next("secondary")
    apply(db, "pull_request", opened())
    enricher = make_enricher(db, github)
    assert enricher.run_once()
    assert pr_row(db)["files_status"] == "pending"
    wait_for(lambda: enricher.run_once(), timeout=30, what="the job to run after retry-after")
    assert pr_row(db)["files_status"] == "fetched"


def test_a_server_error_with_retry_after_holds_every_job_of_the_credential_until_then(db, github):
    github.set_files("octo/enrich", 1, make_files(2))
    github.set_files("octo/enrich", 2, make_files(2))
    github.budgets.limit_next("token", retry_after=2, kind="unavailable", status=503)
    apply(db, "pull_request", opened())
    enricher = make_enricher(db, github)
    assert enricher.run_once()
    (job,) = job_rows(db)
    assert (job["state"], job["attempts"]) == ("pending", 0)  # a wait GitHub asked for spends no attempt
    requests_so_far = len(github.requests)
    apply(db, "pull_request", opened(2, sha_for("unavailable", 2)))
    assert enricher.run_once()
    assert len(github.requests) == requests_so_far  # the other job waits too, unsent
    wait_for(
        lambda: drain(enricher) >= 0 and {pr_row(db, n)["files_status"] for n in (1, 2)} == {"fetched"},
        timeout=30,
        what="both lists after retry-after",
    )
    assert github.budgets.requests_while_limited("token") == 0


def test_a_worker_whose_clock_runs_behind_puts_a_limited_job_back_for_the_whole_wait(db, github):
    # Its clock 120 s behind the database's: a 30 s wait counted from its own clock would make the job
    # due 90 s ago by the database's, claimed and put back again and again until its own time came.
    github.set_files("octo/enrich", 1, make_files(2))
    github.budgets.limit_next("token", retry_after=30, kind="secondary", status=429)
    apply(db, "pull_request", opened())
    enricher = make_enricher(db, github, clock=lambda: time.time() - 120)
    assert enricher.run_once()
    timing = job_timing(db)
    assert (timing["state"], timing["attempts"]) == ("pending", 0)
    assert 20 < timing["due_in_s"] <= 31
    assert not enricher.run_once()  # nothing due: not claimed again


def test_server_errors_are_retried_with_backoff_then_succeed(db, github):
    github.set_files("octo/enrich", 1, make_files(2))
    github.fail_next("server", times=2)
    apply(db, "pull_request", opened())
    enricher = make_enricher(db, github)
    wait_for(lambda: drain(enricher) >= 0 and pr_row(db)["files_status"] == "fetched", what="the retried fetch")
    assert job_rows(db)[0]["attempts"] == 3


def test_server_errors_past_the_bound_settle_as_failed(db, github):
    github.set_files("octo/enrich", 1, make_files(2))
    github.fail_next("server", times=10)
    apply(db, "pull_request", opened())
    enricher = make_enricher(db, github, enrich_max_attempts=2)
    wait_for(lambda: drain(enricher) >= 0 and job_rows(db)[0]["state"] == "done", what="the job to give up")
    assert (pr_row(db)["files_status"], pr_row(db)["files_changed"]) == ("failed", None)
    assert job_rows(db)[0]["result"] == "failed"


@pytest.mark.parametrize(("fault", "status"), [("gone", "not_found"), ("forbidden", "forbidden")])
def test_a_missing_or_forbidden_pr_is_settled_with_its_reason(db, github, fault, status):
    github.set_files("octo/enrich", 1, make_files(2))
    github.fail_next(fault)
    apply(db, "pull_request", opened())
    assert drain(make_enricher(db, github)) == 1
    row = pr_row(db)
    assert (row["files_status"], row["files_changed"], row["version"]) == (status, None, 2)


def test_a_crashed_workers_job_is_taken_again_after_its_lease(db, github):
    github.set_files("octo/enrich", 1, make_files(2))
    apply(db, "pull_request", opened())
    crashed = jobs.claim(database_of(db), timedelta(seconds=1))
    assert crashed is not None  # ... and its worker dies here, never settling it
    survivor = make_enricher(db, github)
    assert not survivor.run_once()  # still leased
    wait_for(lambda: survivor.run_once(), timeout=30, what="the lease to run out")
    assert pr_row(db)["files_status"] == "fetched"
    # The dead worker's lease is gone: its late settle is refused and changes nothing.
    version = pr_row(db)["version"]
    assert not jobs.settle(database_of(db), crashed, FilesStatus.FETCHED, files=[{"filename": "stale.py"}])
    assert pr_row(db)["version"] == version and pr_row(db)["files_changed"][0]["filename"] != "stale.py"


def test_two_workers_on_one_queue_fetch_each_job_once(db, github):
    for number in range(1, 21):
        github.set_files("octo/enrich", number, make_files(number))
        apply(db, "pull_request", opened(number, sha_for("two-workers", number)))
    workers = [make_enricher(db, github) for _ in range(2)]
    counts = [0, 0]

    def work(index: int) -> None:
        counts[index] = drain(workers[index])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(counts) == 20
    assert file_requests(github) == 20
    assert {r["files_status"] for r in rows(db, pull_requests, "files_status")} == {"fetched"}
    assert {r["version"] for r in rows(db, pull_requests, "version")} == {2}


def test_a_list_sent_in_the_payload_is_stored_and_needs_no_fetch(db, github):
    sent = [{"filename": "a.py", "status": "added", "additions": 1, "deletions": 0, "changes": 1}]
    apply(db, "pull_request", opened(files_changed=sent))
    row = pr_row(db)
    assert (row["files_changed"], row["files_changed_sha"], row["files_status"]) == (sent, SHA_A, "fetched")
    assert job_rows(db) == []
    # A later snapshot sending an empty list does not erase it.
    apply(db, "pull_request", pull_request("edited", REPO, 1, SHA_A, at(20), files_changed=[]))
    assert pr_row(db)["files_changed"] == sent


def test_an_app_installation_token_reads_the_files(db, github):
    github.set_files("octo/enrich", 1, make_files(2))
    payload = opened()
    payload["installation"] = {"id": 4242}
    apply(db, "pull_request", payload)
    config = Settings(
        github_api_url=github.url, github_app_id=str(github.app_id), github_app_private_key=github.app_private_key_pem
    )
    client = GitHubClient(api_url=github.url, app_id=github.app_id, private_key=github.app_private_key_pem)
    enricher = Enricher(config, database_of(db), client, instruments())
    assert drain(enricher) == 1
    assert pr_row(db)["files_status"] == "fetched"
    assert len(github.calls("POST", contains="/app/installations/4242/access_tokens")) == 1


@pytest.mark.parametrize("order", ["a-then-b", "b-then-a"])
def test_two_heads_in_one_second_leave_the_job_on_the_head_the_pr_row_holds(db, github, order):
    # The PR row orders two snapshots of one second by state and content; the job follows the row's
    # choice, so the head the row holds is the one fetched, whichever arrives first.
    a, b = sha_for("tie", "a"), sha_for("tie", "b")
    github.set_files("octo/enrich", 1, make_files(3))
    for sha in (a, b) if order == "a-then-b" else (b, a):
        apply(db, "pull_request", pull_request("synchronize", REPO, 1, sha, at(10)))
    (job,) = job_rows(db)
    assert job["head_sha"] == pr_row(db)["commit_sha"]
    drain(make_enricher(db, github))
    row = pr_row(db)
    assert (row["files_status"], row["files_changed_sha"]) == ("fetched", row["commit_sha"])


def test_a_repository_moved_to_another_installation_is_read_through_the_new_one(db, github):
    github.set_files("octo/enrich", 1, make_files(2))
    before = opened()
    before["installation"] = {"id": 9000}
    apply(db, "pull_request", before)
    # Transferred to another organisation: its deliveries now come through installation 17.
    moved = pull_request("synchronize", REPO, 1, SHA_B, at(20))
    moved["installation"] = {"id": 17}
    apply(db, "pull_request", moved)
    config = Settings(
        github_api_url=github.url, github_app_id=str(github.app_id), github_app_private_key=github.app_private_key_pem
    )
    client = GitHubClient(api_url=github.url, app_id=github.app_id, private_key=github.app_private_key_pem)
    drain(Enricher(config, database_of(db), client, instruments()))
    assert [c.path for c in github.calls("POST", contains="/access_tokens")] == ["/app/installations/17/access_tokens"]


def test_a_head_with_no_files_is_fetched_as_an_empty_list_not_the_old_heads(db, github):
    github.set_files("octo/enrich", 1, make_files(3, prefix="old/"))
    apply(db, "pull_request", opened())
    enricher = make_enricher(db, github)
    drain(enricher)
    # The new head changes nothing against the base: GitHub lists no file.
    github.set_files("octo/enrich", 1, [])
    sync = pull_request("synchronize", REPO, 1, SHA_B, at(20))
    sync["pull_request"]["changed_files"] = 0
    apply(db, "pull_request", sync)
    drain(enricher)
    row = pr_row(db)
    assert (row["files_status"], row["files_changed_sha"], row["files_changed"]) == ("fetched", SHA_B, [])


@pytest.mark.parametrize("unstorable", ["\x00", "\ud800"], ids=["nul", "lone-surrogate"])
def test_a_patch_holding_what_postgresql_cannot_store_lands_with_it_replaced(db, github, unstorable):
    # GitHub sends U+0000 in diff hunks: the list lands as a delivery's text does, U+FFFD in its place.
    files = make_files(3)
    files[1]["patch"] = "@@ -1 +1 @@\n-a\n+b" + unstorable + "c"
    files[2]["filename"] = "odd" + unstorable + ".txt"
    github.set_files("octo/enrich", 1, files)
    apply(db, "pull_request", opened())
    drain(make_enricher(db, github))
    row = pr_row(db)
    assert row["files_status"] == "fetched"
    assert row["files_changed"][1]["patch"].endswith("+b\ufffdc")
    assert row["files_changed"][2]["filename"] == "odd\ufffd.txt"


def test_a_job_whose_worker_keeps_dying_settles_failed_past_its_attempts_without_a_request(db, github):
    github.set_files("octo/enrich", 1, make_files(2))
    apply(db, "pull_request", opened())
    # A worker claims the job and dies (killed, out of memory) before settling it, again and again.
    for _ in range(6):
        assert jobs.claim(database_of(db), timedelta(seconds=120)) is not None
        with db.begin() as conn:  # its lease runs out
            conn.execute(sa.update(files_jobs).values(leased_until=sa.func.now() - timedelta(seconds=1)))
    drain(make_enricher(db, github, enrich_max_attempts=6))
    assert file_requests(github) == 0
    assert pr_row(db)["files_status"] == "failed"
    (job,) = rows(db, files_jobs, "state", "last_error")
    assert job["state"] == "done" and "never settled" in (job["last_error"] or "")


# --- a broken or hostile GitHub: bounded, never stuck, never a job left leased --------------------

MIB = 1024 * 1024


def test_a_trickling_answer_gives_up_at_its_deadline_and_the_job_waits_its_retry(db, github):
    github.stream_files("octo/enrich", 1, trickle_body(0.02))
    apply(db, "pull_request", opened())
    enricher = make_enricher(db, github, bounds={"deadline": 0.5}, retry_base_s=60)
    started = time.monotonic()
    assert enricher.run_once()
    assert time.monotonic() - started < 0.5 + 5  # the deadline, and a generous margin
    job = job_timing(db)
    assert (job["state"], job["leased_until"], job["lease_token"], job["attempts"]) == ("pending", None, None, 1)
    assert 30 - 5 <= job["due_in_s"] <= 60  # the first retry's backoff: base/2 to base
    assert "timed out" in job["last_error"]
    assert pr_row(db)["files_status"] == "pending"


def test_an_endless_answer_is_cut_in_bounded_memory_and_stored_truncated(db, github):
    github.stream_files("octo/enrich", 1, endless_body)
    apply(db, "pull_request", opened())
    enricher = make_enricher(db, github, bounds={"max_page_bytes": MIB})
    growth = peak_rss_growth(lambda: drain(enricher))
    assert growth < 64 * MIB
    row = pr_row(db)
    assert row["files_status"] == "truncated" and 0 < len(row["files_changed"]) < MAX_FILES
    assert job_rows(db)[0]["state"] == "done"


def test_a_200_mb_answer_is_cut_at_the_page_cap_and_stored_truncated(db, github):
    # The default caps. Before they existed, this answer took the worker past a gigabyte.
    github.stream_files("octo/enrich", 1, huge_body(200 * MIB))
    apply(db, "pull_request", opened())
    growth = peak_rss_growth(lambda: drain(make_enricher(db, github)))
    assert growth < 160 * MIB  # the 16 MiB page, its text and 3,000 entries; not the 200 MB
    row = pr_row(db)
    assert (row["files_status"], len(row["files_changed"])) == ("truncated", MAX_FILES)
    assert job_rows(db)[0]["result"] == "truncated"


def test_a_page_of_100000_entries_stores_3000_truncated(db, github):
    files = [{"filename": f"src/{i:06d}.py", "status": "added", "additions": 1} for i in range(100_000)]
    github.set_files("octo/enrich", 1, files)
    github.page_size = len(files)  # a server ignoring per_page
    apply(db, "pull_request", opened())
    assert drain(make_enricher(db, github)) == 1
    row = pr_row(db)
    assert row["files_changed"] == files[:MAX_FILES]
    assert row["files_status"] == "truncated"
    assert file_requests(github) == 1


def test_an_answer_cut_before_its_first_entry_keeps_the_stored_list(db, github):
    github.set_files("octo/enrich", 1, make_files(5))
    apply(db, "pull_request", opened())
    drain(make_enricher(db, github))
    stored = pr_row(db)["files_changed"]
    assert len(stored) == 5
    # The same head is fetched again; this time the answer is cut inside its first entry.
    apply(db, "pull_request", pull_request("reopened", REPO, 1, SHA_A, at(30)))
    github.stream_files("octo/enrich", 1, endless_body)
    assert drain(make_enricher(db, github, bounds={"max_page_bytes": 100})) == 1
    row = pr_row(db)
    assert (row["files_changed"], row["files_changed_sha"], row["files_status"]) == (stored, SHA_A, "truncated")


@pytest.mark.parametrize(
    ("fault", "knob", "value"),
    [
        ("primary", "primary_reset", "1000000000000"),
        ("primary", "primary_reset", "4102444800"),  # 2100-01-01
        ("primary", "primary_reset", "nan"),
        ("secondary", "retry_after", "1e300"),
        ("secondary", "retry_after", "soon"),
    ],
)
def test_absurd_rate_limit_headers_reschedule_within_an_hour_and_the_worker_goes_on(db, github, fault, knob, value):
    for number in (1, 2):
        github.set_files("octo/enrich", number, make_files(2))
        apply(db, "pull_request", opened(number, sha_for("absurd", number)))
    setattr(github, knob, value)
    github.fail_next(fault)
    clock = Clock()
    enricher = make_enricher(db, github, clock=clock)
    assert enricher.run_once()  # no crash
    limited = job_timing(db, 1)
    assert (limited["state"], limited["leased_until"], limited["attempts"]) == ("pending", None, 0)
    assert 0 < limited["due_in_s"] <= 3600 + 5
    # The other job shares the credential: rescheduled within the hour too, without a request.
    sent = len(github.requests)
    assert enricher.run_once()
    assert len(github.requests) == sent
    other = job_timing(db, 2)
    assert (other["state"], other["attempts"]) == ("pending", 0) and 0 < other["due_in_s"] <= 3600 + 5


def test_a_reset_in_2100_under_the_reserve_holds_that_credentials_jobs_for_an_hour_at_most(db, github):
    for number in (1, 2):
        github.set_files("octo/enrich", number, make_files(2))
        apply(db, "pull_request", opened(number, sha_for("reset-2100", number)))
    github.remaining = 10  # under the worker's reserve: its jobs wait for the reset
    github.reset_at = 4_102_444_800
    clock = Clock()
    enricher = make_enricher(db, github, clock=clock)
    assert enricher.run_once()
    sent = len(github.requests)
    assert enricher.run_once()
    assert len(github.requests) == sent  # the reserve is left: no request
    statuses = sorted(r["files_status"] for r in rows(db, pull_requests, "files_status"))
    assert statuses == ["fetched", "pending"]
    held = [job_timing(db, n) for n in (1, 2) if job_timing(db, n)["state"] == "pending"]
    assert len(held) == 1 and 0 < held[0]["due_in_s"] <= 3600 + 5


@pytest.fixture
def refuse_fetched(db: Engine) -> Iterator[Callable[[], None]]:
    """The database refuses to store a `fetched` list (a failure after the fetch) until `fix()` runs."""
    with db.begin() as conn:
        conn.execute(sa.text("ALTER TABLE pull_requests ADD CONSTRAINT test_refuse CHECK (files_status <> 'fetched')"))

    def fix() -> None:
        with db.begin() as conn:
            conn.execute(sa.text("ALTER TABLE pull_requests DROP CONSTRAINT IF EXISTS test_refuse"))

    yield fix
    fix()


class Records(logging.Handler):
    """Keeps the records of a logger, whatever the service's logging set-up did to propagation."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def enrich_log() -> Iterator[Records]:
    """The files worker's log records, INFO and above, while the test runs."""
    logger, handler = logging.getLogger("flowlens_ingest.github.enrich"), Records()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_an_error_after_the_fetch_reschedules_the_job_and_logs_one_line(db, github, refuse_fetched, enrich_log):
    files = make_files(3)
    github.set_files("octo/enrich", 1, files)
    apply(db, "pull_request", opened())
    enricher = make_enricher(db, github)
    assert enricher.run_once()  # the worker goes on
    job = job_timing(db)
    assert (job["state"], job["leased_until"], job["lease_token"], job["attempts"]) == ("pending", None, None, 1)
    assert "test_refuse" in job["last_error"]
    (record,) = enrich_log.records
    assert (record.levelname, record.getMessage(), record.outcome) == ("WARNING", "files job error", "retry")
    assert "IntegrityError" in record.error and record.where
    # Neither the failing row nor any of the list is in the log line.
    line = str(vars(record))
    assert not any(f["filename"] in line or f["sha"] in line for f in files)
    refuse_fetched()
    wait_for(lambda: drain(enricher) >= 0 and pr_row(db)["files_status"] == "fetched", what="the retried job")


def test_a_job_taken_over_meanwhile_is_not_counted_settled(db, github):
    github.set_files("octo/enrich", 1, make_files(2))
    apply(db, "pull_request", opened())
    slow = jobs.claim(database_of(db), timedelta(seconds=60))
    assert slow is not None
    # Its lease runs out (a fetch slower than the lease), and another worker takes and settles the job.
    with db.begin() as conn:
        conn.execute(sa.update(files_jobs).values(leased_until=sa.func.now() - timedelta(seconds=1)))
    fetched, lost = outcomes("fetched"), outcomes("lease_lost")
    assert drain(make_enricher(db, github)) == 1
    make_enricher(db, github).work(slow)
    assert (outcomes("fetched") - fetched, outcomes("lease_lost") - lost) == (1, 1)
    assert job_rows(db)[0]["state"] == "done"


# --- through a real `flowlens-ingest serve` -----------------------------------------------------


@pytest.mark.slow
def test_serve_runs_the_files_worker_and_fills_files_changed_within_seconds(db, database_url, github, tmp_path):
    github.set_files("octo/enrich", 7, make_files(120))
    env = {"GITHUB_API_URL": github.url, "GITHUB_TOKEN": github.token}
    service = Service(database_url, tmp_path, workers=1, env=env)
    try:
        service.wait_ready()
        answer = service.post(pull_request("opened", REPO, 7, SHA_A, at(10)), "pull_request")
        assert answer.json()["outcome"] == "applied"
        wait_for(lambda: pr_row(db, 7)["files_status"] == "fetched", timeout=30, what="the files to appear")
        row = pr_row(db, 7)
        assert (len(row["files_changed"]), row["files_changed_sha"], row["version"]) == (120, SHA_A, 2)
        # Both pages were asked for with the token, and /metrics counts the worker's calls.
        calls = github.calls("GET", contains="/pulls/7/files")
        assert len(calls) == 2 and all(c.headers["authorization"].endswith(github.token) for c in calls)
        wait_for(
            lambda: (metric(service, "flowlens_files_jobs_total", outcome="fetched") or 0) >= 1,
            what="the worker's metrics in /metrics",
        )
    finally:
        assert service.stop() == 0
    log = service.logs()
    assert "files worker on" in log and '"msg": "files job"' in log
    assert github.token not in log


@pytest.mark.slow
def test_serve_without_a_credential_says_so_and_fetches_nothing(db, database_url, github, tmp_path):
    env = {"GITHUB_API_URL": github.url}
    service = Service(database_url, tmp_path, workers=1, env=env)
    try:
        service.wait_ready()
        assert service.post(opened(), "pull_request").json()["outcome"] == "applied"
        assert pr_row(db)["files_status"] == "pending"
    finally:
        service.stop()
    assert service.logs().count("files enrichment off") == 1
    assert github.requests == []
    # The job waits for a worker with a credential.
    assert job_rows(db)[0]["state"] == "pending"
