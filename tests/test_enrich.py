"""The files worker against a fake GitHub on loopback and a real PostgreSQL.

Deliveries go through the service's own path (map, plan, one transaction), which
enqueues the job; the worker then fetches from the fake and writes the list back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from flowlens_ingest import jobs
from flowlens_ingest.config import Settings
from flowlens_ingest.enrich import Enricher
from flowlens_ingest.github import GitHubClient
from flowlens_ingest.metrics import instruments
from flowlens_ingest.schema import files_jobs, pull_requests
from flowlens_ingest.values import FilesStatus

from .fake_github import FakeGitHub, make_files, serve_fake_github
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


def make_enricher(db: Engine, github: FakeGitHub, **settings: Any) -> Enricher:
    values: dict[str, Any] = {"github_api_url": github.url, "github_token": github.token, **settings}
    config = Settings(**values)
    client = GitHubClient(api_url=github.url, token=github.token)
    return Enricher(config, database_of(db), client, instruments(), retry_base_s=0.05)


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


def test_the_primary_rate_limit_reschedules_to_the_reset_and_pauses_claims(db, github):
    github.set_files("octo/enrich", 1, make_files(2))
    github.reset_in = 2
    github.fail_next("primary")
    apply(db, "pull_request", opened())
    enricher = make_enricher(db, github)
    assert enricher.run_once()
    (job,) = job_rows(db)
    assert (job["state"], job["attempts"]) == ("pending", 0)  # a rate limit spends no attempt
    assert enricher.paused_until > 0
    requests_so_far = len(github.requests)
    # Paused: polling makes no request to GitHub until the reset.
    assert not enricher.run_once()
    assert len(github.requests) == requests_so_far
    wait_for(lambda: enricher.run_once(), timeout=30, what="the job to run after GitHub's reset")
    assert pr_row(db)["files_status"] == "fetched"


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
