"""Backfill against the fake GitHub on loopback and a real PostgreSQL.

The same story (pull requests, check runs, reviews, commit statuses) is told twice: as webhooks
to one repository, and as the REST API's current state of another. Backfilling the second must
land the same statuses the webhooks gave the first.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from flowlens_ingest.cli.main import main
from flowlens_ingest.config import Settings
from flowlens_ingest.github import backfill
from flowlens_ingest.github.backfill import Backfiller, BackfillStopped, Target
from flowlens_ingest.github.client import GitHubClient
from flowlens_ingest.github.errors import GitHubError
from flowlens_ingest.github.lease import Lease
from flowlens_ingest.store.schema import (
    backfill_progress,
    ci_checks,
    files_jobs,
    pipeline_runs,
    pull_requests,
    repositories,
)

from .fake_github import FakeGitHub, app_private_key_pem, serve_fake_github
from .fake_repos import RepoData
from .helpers import database_of, rows
from .stories import START, apply, check_run, pull_request, repository, review, sha_for, status

PULLS = 130
Event = tuple[str, dict[str, Any]]


def at(seconds: int) -> Any:
    return START + timedelta(seconds=seconds)


def story(repo: dict[str, Any], number: int) -> list[Event]:
    """The webhooks one pull request's life sends, in order."""
    sha = sha_for(repo["full_name"], number)
    events: list[Event] = [("pull_request", pull_request("opened", repo, number, sha, START))]
    if number % 4:
        events.append(("pull_request", pull_request("synchronize", repo, number, sha, at(600 + number))))
    conclusion = ("success", "failure", None)[number % 3]
    run_id = 7_000_000 + number
    events.append(("check_run", check_run(repo, sha, "build", run_id, "in_progress", at(100), prs=[number])))
    if conclusion:
        completed = check_run(repo, sha, "build", run_id, "completed", at(100), prs=[number], conclusion=conclusion)
        completed["check_run"]["completed_at"] = at(200).strftime("%Y-%m-%dT%H:%M:%SZ")
        events.append(("check_run", completed))
    verdicts = {
        0: [("alice", "approved")],
        1: [("bob", "changes_requested"), ("bob", "approved")],
        3: [("alice", "approved"), ("bob", "changes_requested"), ("dave", "commented")],
    }
    for k, (who, state) in enumerate(verdicts.get(number % 5, [])):
        events.append(
            (
                "pull_request_review",
                review("submitted", repo, number, sha, who, 900_000 + number * 10 + k, state, at(300 + k)),
            )
        )
    if number % 5 == 2:
        events.append(
            (
                "pull_request_review",
                review("submitted", repo, number, sha, "carol", 800_000 + number, "approved", at(300)),
            )
        )
        events.append(
            (
                "pull_request_review",
                review("dismissed", repo, number, sha, "carol", 800_000 + number, "dismissed", at(300)),
            )
        )
    if number % 2 == 0:
        state = "failure" if number % 7 == 0 else "success"
        events.append(("status", status(repo, sha, "ci/external", 500_000 + number, state, at(400))))
    return events


def serve_state(data: RepoData, events: list[Event]) -> None:
    """What GitHub's REST API shows once those webhooks were sent: the latest of each object."""
    for event, payload in events:
        if event == "pull_request":
            data.pulls[payload["number"]] = payload["pull_request"]
        elif event == "check_run":
            run = payload["check_run"]
            runs = data.check_runs.setdefault(run["head_sha"], [])
            runs[:] = [r for r in runs if r["id"] != run["id"]] + [run]
        elif event == "pull_request_review":
            rest = {**payload["review"], "state": payload["review"]["state"].upper()}
            listed = data.reviews.setdefault(payload["pull_request"]["number"], [])
            listed[:] = [r for r in listed if r["id"] != rest["id"]] + [rest]
        elif event == "status":
            fields = ("id", "state", "context", "target_url", "description", "created_at", "updated_at")
            data.statuses.setdefault(payload["sha"], []).append({k: payload.get(k) for k in fields})


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    with serve_fake_github() as fake:
        yield fake


def filler(db: Engine, github: FakeGitHub, *, app: bool = False, **options: Any) -> Backfiller:
    settings = Settings(
        github_api_url=github.url,
        github_token=None if app else github.token,
        github_app_id=str(github.app_id) if app else None,
        github_app_private_key=app_private_key_pem() if app else None,
        enrich_rate_reserve=0,
    )
    client = GitHubClient(
        api_url=github.url,
        token=settings.github_token,
        app_id=settings.github_app_id,
        private_key=settings.github_app_private_key,
    )
    return Backfiller(settings, database_of(db), client, **options)


def statuses(db: Engine, repo: dict[str, Any]) -> dict[int, tuple[Any, ...]]:
    with db.connect() as conn:
        repo_id = conn.execute(sa.select(repositories.c.id).where(repositories.c.github_id == repo["id"])).scalar()
        found = conn.execute(
            sa.select(
                pipeline_runs.c.pr_number,
                pipeline_runs.c.commit_sha,
                pipeline_runs.c.status_pr,
                pipeline_runs.c.status_build,
                pipeline_runs.c.status_approval,
                pipeline_runs.c.status_merge,
            ).where(pipeline_runs.c.repo_id == repo_id)
        )
        return {row[0]: tuple(row[2:]) for row in found}


def versions(db: Engine) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        prs = conn.execute(sa.select(pull_requests.c.pr_number, pull_requests.c.version, pull_requests.c.processed))
        runs = conn.execute(sa.select(pipeline_runs.c.pr_number, pipeline_runs.c.version, pipeline_runs.c.processed))
        return sorted(prs.all()) + sorted(runs.all())


def test_backfill_of_130_pull_requests_lands_what_the_webhooks_would_and_again_changes_nothing(db, github):
    by_webhook, by_backfill = repository(9_300_001, "octo/webhooked"), repository(9_300_002, "octo/backfilled")
    for number in range(1, PULLS + 1):
        for event, payload in story(by_webhook, number):
            apply(db, event, payload)
    data = github.repositories.add(by_backfill)
    for number in range(1, PULLS + 1):
        serve_state(data, story(by_backfill, number))
    seen: list[tuple[int, int]] = []

    first = filler(db, github, progress=lambda done, total, _what: seen.append((done, total)))
    first.repository(Target("octo/backfilled"), "open", None)

    expected = statuses(db, by_webhook)
    assert len(expected) == PULLS
    assert statuses(db, by_backfill) == expected
    assert {s[1] for s in expected.values()} == {"passed", "failed", "running"}
    assert {s[2] for s in expected.values()} == {"approved", "changes_requested", "pending"}
    assert {s[0] for s in expected.values()} == {"opened", "updated"}
    # Each pull request was read in full (the list's simple one has no `additions`), and a files job queued per head.
    assert len(github.calls("GET", "/pulls/")) >= PULLS
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(files_jobs)).scalar() == 2 * PULLS
        assert conn.execute(sa.select(sa.func.count()).where(pull_requests.c.additions.is_(None))).scalar() == 0
    assert seen[-1] == (PULLS, PULLS)
    assert rows(db, backfill_progress) == []

    with db.begin() as conn:
        conn.execute(sa.update(pull_requests).values(processed=True))
        conn.execute(sa.update(pipeline_runs).values(processed=True))
    before = versions(db)
    again = filler(db, github)
    again.repository(Target("octo/backfilled"), "open", None)
    assert versions(db) == before
    assert set(again.tally.outcomes) == {"duplicate"}


def test_backfill_leaves_newer_webhook_state_alone(db, github):
    repo = repository(9_300_003, "octo/newer")
    data = github.repositories.add(repo)
    serve_state(data, story(repo, 1))
    sha = sha_for(repo["full_name"], 1)
    newer = pull_request("edited", repo, 1, sha, at(5000), title="renamed after the snapshot")
    apply(db, "pull_request", newer)
    apply(
        db, "check_run", check_run(repo, sha, "build", 7_000_001, "completed", at(4000), prs=[1], conclusion="success")
    )

    filler(db, github).repository(Target("octo/newer"), "open", None)

    assert [r["title"] for r in rows(db, pull_requests, "title")] == ["renamed after the snapshot"]
    assert statuses(db, repo)[1][1] == "passed"


def test_a_primary_rate_limit_mid_backfill_is_waited_out(db, github):
    repo = repository(9_300_004, "octo/limited")
    data = github.repositories.add(repo)
    for number in range(1, 11):
        serve_state(data, story(repo, number))
    github.reset_in = 1.0
    github.fail_next("primary", route="repos", after=12)
    said: list[str] = []

    filler(db, github, say=said.append).repository(Target("octo/limited"), "open", None)

    assert any("primary rate limit" in line for line in said)
    assert len(statuses(db, repo)) == 10


def test_an_interrupted_backfill_resumes_after_the_last_pull_request_it_landed(db, github):
    repo = repository(9_300_005, "octo/resumed")
    data = github.repositories.add(repo)
    for number in range(1, 21):
        serve_state(data, story(repo, number))
    # GitHub fails once, part-way: the pull requests landed so far are recorded.
    github.fail_next("server", route="repos", after=30)
    with pytest.raises(Exception, match="502"):
        filler(db, github).repository(Target("octo/resumed"), "open", None)
    (progress,) = rows(db, backfill_progress, "full_name", "done_through")
    assert 0 < progress["done_through"] < 20
    read_before = len(github.calls("GET", "/pulls/"))

    filler(db, github).repository(Target("octo/resumed"), "open", None)

    full_reads = {c.path for c in github.calls("GET", "/pulls/")[read_before:] if c.path.rsplit("/", 1)[-1].isdigit()}
    assert full_reads == {f"/repos/octo/resumed/pulls/{n}" for n in range(progress["done_through"] + 1, 21)}
    assert len(statuses(db, repo)) == 20
    assert rows(db, backfill_progress) == []


def test_in_app_mode_every_repository_of_every_installation_is_backfilled(db, github):
    first, second = repository(9_300_006, "octo/one"), repository(9_300_007, "acme/two")
    for repo, installation in ((first, 11), (second, 22)):
        serve_state(github.repositories.add(repo, installation), story(repo, 1))
    app = filler(db, github, app=True)

    targets = app.targets([])
    assert sorted(targets, key=lambda t: t.full_name) == [Target("acme/two", 22), Target("octo/one", 11)]
    for target in targets:
        app.repository(target, "open", None)

    assert sorted(r["installation_id"] for r in rows(db, files_jobs, "installation_id")) == [11, 22]
    assert app.targets(["octo/one"]) == [Target("octo/one", 11)]


def test_the_backfill_command(db, github, monkeypatch, capsys):
    repo = repository(9_300_008, "octo/cli")
    serve_state(github.repositories.add(repo), story(repo, 1) + story(repo, 2))
    monkeypatch.setenv("DATABASE_URL", str(db.url.render_as_string(hide_password=False)))
    monkeypatch.setenv("GITHUB_API_URL", github.url)
    monkeypatch.setenv("GITHUB_TOKEN", github.token or "")
    assert threading.current_thread() is threading.main_thread()

    assert main(["backfill", "octo/cli", "--state", "all", "--since", "2020-01-01"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1].startswith("backfill: 2 pull requests read")
    assert "octo/cli: 2/2 pull requests" in err
    assert len(statuses(db, repo)) == 2

    assert main(["backfill"]) == 2  # a token cannot list repositories: name them
    assert main(["backfill", "not-a-repo"]) == 2
    assert main(["backfill", "../etc"]) == 2


def test_check_runs_are_read_page_after_page_inside_their_wrapper(db, github):
    repo = repository(9_300_009, "octo/many-checks")
    data = github.repositories.add(repo)
    serve_state(data, story(repo, 3))  # its one check run completes with success
    sha = sha_for(repo["full_name"], 3)
    for k in range(1, 150):
        run = check_run(repo, sha, f"shard {k}", 7_100_000 + k, "completed", at(100), prs=[3], conclusion="success")
        data.check_runs[sha].append(run["check_run"])
    data.check_runs[sha][-1]["conclusion"] = "failure"

    filler(db, github).repository(Target("octo/many-checks"), "open", None)

    assert len(github.calls("GET", f"/commits/{sha}/check-runs")) == 2
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ci_checks)).scalar() == 150
    assert statuses(db, repo)[3][1] == "failed"  # the last run, on the second page, failed


def test_combined_statuses_past_100_contexts_are_read_page_after_page(db, github):
    repo = repository(9_300_010, "octo/many-statuses")
    data = github.repositories.add(repo)
    serve_state(data, story(repo, 3))  # its check run succeeds, and it has no status yet
    sha = sha_for(repo["full_name"], 3)
    for k in range(1, 151):
        state = "failure" if k == 150 else "success"
        payload = status(repo, sha, f"ci/shard-{k:03d}", 600_000 + k, state, at(400 + k))
        serve_state(data, [("status", payload)])

    filler(db, github).repository(Target("octo/many-statuses"), "open", None)

    pages = github.calls("GET", f"/commits/{sha}/status")
    assert [c.query for c in pages] == ["per_page=100", "per_page=100&page=2"]
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ci_checks)).scalar() == 151
    # The oldest context, the one that failed, is on the second page only.
    assert statuses(db, repo)[3][1] == "failed"


def unreadable_story(github: FakeGitHub, full_name: str, github_id: int, refused: dict[int, int]) -> dict[str, Any]:
    repo = repository(github_id, full_name)
    data = github.repositories.add(repo)
    for number in range(1, 6):
        serve_state(data, story(repo, number))
    data.refused.update(refused)
    return repo


def test_a_pull_request_github_will_not_show_is_named_skipped_and_the_rest_lands(db, github, monkeypatch, capsys):
    gone = unreadable_story(github, "octo/gone", 9_300_011, {2: 404, 4: 403})
    fine = unreadable_story(github, "octo/fine", 9_300_012, {})
    monkeypatch.setenv("DATABASE_URL", str(db.url.render_as_string(hide_password=False)))
    monkeypatch.setenv("GITHUB_API_URL", github.url)
    monkeypatch.setenv("GITHUB_TOKEN", github.token or "")

    assert main(["backfill", "octo/gone", "octo/fine"]) == 1

    out, err = capsys.readouterr()
    assert "cannot read octo/gone#2: GitHub answered 404" in err and "(deleted or transferred); skipped" in err
    assert "cannot read octo/gone#4: GitHub refused access (403)" in err
    assert out.splitlines()[-1].startswith("backfill: 8 pull requests read, 2 skipped (GitHub would not show them)")
    assert sorted(statuses(db, gone)) == [1, 3, 5]
    assert sorted(statuses(db, fine)) == [1, 2, 3, 4, 5]
    assert rows(db, backfill_progress) == []

    # Run again: the same two named again, nothing else changes.
    assert main(["backfill", "octo/gone"]) == 1
    assert err.count("cannot read") == 2 and capsys.readouterr().err.count("cannot read") == 2


def test_odd_answers_are_named_and_skipped_and_the_rest_lands(db, github):
    repo = repository(9_300_021, "octo/odd")
    data = github.repositories.add(repo)
    for number in range(1, 5):
        serve_state(data, story(repo, number))
    deep: Any = "leaf"
    for _ in range(200):
        deep = [deep]
    data.pulls[2]["merged_by"] = deep  # nested past what any delivery may be (the listing omits it)
    data.pulls[3]["head"] = "not-an-object"  # no head to read checks by: journaled failed, for a replay
    backfiller = filler(db, github)
    backfiller.repository(Target("octo/odd"), "all", None)
    (named,) = backfiller.tally.unreadable
    assert named.startswith("octo/odd#2:") and "an answer nested too deep to store" in named
    (failed,) = backfiller.tally.failed
    assert failed.startswith("octo/odd pull_request")
    assert sorted(statuses(db, repo)) == [1, 4]


def test_progress_moves_past_a_pull_request_that_cannot_be_read(db, github):
    repo = unreadable_story(github, "octo/gone-resumed", 9_300_013, {2: 410})
    # The repository, the list, #1 (the pull request, its reviews, check runs, statuses), #2 refused:
    # the next request, #3's, fails.
    github.fail_next("server", route="repos", after=2 + 4 + 1)
    first = filler(db, github)
    with pytest.raises(Exception, match="502"):
        first.repository(Target("octo/gone-resumed"), "open", None)
    assert [p["done_through"] for p in rows(db, backfill_progress, "done_through")] == [2]
    assert first.tally.unreadable == [
        "octo/gone-resumed#2: GitHub answered 410: Not Found (deleted or transferred); skipped"
    ]

    before = len(github.calls("GET"))
    again = filler(db, github)
    again.repository(Target("octo/gone-resumed"), "open", None)

    reads = [c.path.rsplit("/pulls/", 1)[-1] for c in github.calls("GET")[before:] if "/pulls/" in c.path]
    assert [n for n in reads if n.isdigit()] == ["3", "4", "5"]
    assert sorted(statuses(db, repo)) == [1, 3, 4, 5]
    assert again.tally.unreadable == []


@pytest.mark.parametrize(
    ("command", "needed"),
    [
        ("recover", ["repository permission Webhooks (read and write", "organization permission Webhooks"]),
        ("backfill", ["Metadata, Pull requests, Checks, Commit statuses", "Contents"]),
        ("enrich", ["Metadata, Pull requests, and Contents"]),
    ],
)
def test_the_github_commands_help_names_its_credential_permissions_and_exit_codes(command, needed, capsys):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ["GITHUB_TOKEN", "GitHub App (GITHUB_APP_ID", "Exit status: 0 when", "; 1 ", "; 2 for usage", *needed]:
        assert words in text, (command, words)


# -- bounds and odd listings -----------------------------------------------------------------------


def test_a_stopped_backfill_sends_nothing_more_and_a_rerun_resumes(db, github):
    repo = repository(9_300_031, "octo/stopped")
    data = github.repositories.add(repo)
    for number in range(1, 11):
        serve_state(data, story(repo, number))
    stop = threading.Event()

    def ctrl_c_after_the_second(done: int, _total: int, _what: str) -> None:
        if done == 2:
            stop.set()  # what the command's SIGINT and SIGTERM handler does

    with pytest.raises(BackfillStopped, match="stopped"):
        filler(db, github, stop=stop, progress=ctrl_c_after_the_second).repository(Target("octo/stopped"), "open", None)
    reads = [c.path for c in github.calls("GET", "/pulls/") if c.path.rsplit("/", 1)[-1].isdigit()]
    assert reads == ["/repos/octo/stopped/pulls/1", "/repos/octo/stopped/pulls/2"]
    assert [p["done_through"] for p in rows(db, backfill_progress, "done_through")] == [2]

    filler(db, github).repository(Target("octo/stopped"), "open", None)
    assert len(statuses(db, repo)) == 10


def test_a_next_link_back_to_the_first_page_lands_each_pull_request_once_and_says_so(db, github):
    repo = repository(9_300_032, "octo/looping")
    data = github.repositories.add(repo)
    for number in (1, 2):
        serve_state(data, story(repo, number))
    data.next_is_first = True
    backfiller = filler(db, github)

    backfiller.repository(Target("octo/looping"), "open", None)

    listings = [c for c in github.calls("GET", "/pulls") if c.path.endswith("/pulls")]
    assert len(listings) == 1
    reads = [c.path for c in github.calls("GET", "/pulls/") if c.path.rsplit("/", 1)[-1].isdigit()]
    assert reads == ["/repos/octo/looping/pulls/1", "/repos/octo/looping/pulls/2"]
    (cut,) = backfiller.tally.cut
    assert cut.startswith("repos/octo/looping/pulls?") and cut.endswith("GitHub's next page is one read before")
    assert backfiller.tally.pulls == 2


def test_pull_requests_past_the_page_bound_are_said_and_keep_their_progress(db, github, monkeypatch, capsys):
    monkeypatch.setattr(backfill, "MAX_PAGES", 2)  # stands for 1,000 pages: 100,000 pull requests
    repo = repository(9_300_033, "octo/huge")
    data = github.repositories.add(repo)
    for number in range(1, 251):
        data.pulls[number] = pull_request("opened", repo, number, sha_for("octo/huge", number), START)["pull_request"]
    monkeypatch.setenv("DATABASE_URL", str(db.url.render_as_string(hide_password=False)))
    monkeypatch.setenv("GITHUB_API_URL", github.url)
    monkeypatch.setenv("GITHUB_TOKEN", github.token or "")
    monkeypatch.setenv("FLOWLENS_ENRICH_RATE_RESERVE", "0")

    assert main(["backfill", "octo/huge"]) == 1

    out, err = capsys.readouterr()
    assert "not read to the end: repos/octo/huge/pulls?" in err and "stopped after 2 pages" in err
    assert out.splitlines()[-1].startswith("backfill: 200 pull requests read, 1 listings not read to the end")
    assert [p["done_through"] for p in rows(db, backfill_progress, "done_through")] == [200]


def test_a_listing_page_that_is_no_list_stops_the_repository_and_keeps_its_progress(db, github):
    repo = repository(9_300_034, "octo/oddpage")
    data = github.repositories.add(repo)
    serve_state(data, story(repo, 1))
    github.fail_next("not_a_list", route="repos", after=1)  # the repository, then its pulls list

    with pytest.raises(GitHubError, match="was not a list"):
        filler(db, github).repository(Target("octo/oddpage"), "open", None)
    assert statuses(db, repo) == {}


def test_a_repository_another_backfill_holds_is_named_and_not_read_twice(db, github, monkeypatch, capsys):
    repo = repository(9_300_035, "octo/shared")
    serve_state(github.repositories.add(repo), story(repo, 1))
    other = Lease(database_of(db), "backfill octo/shared", 60, name="backfill octo/shared")
    assert other.take()  # another process's backfill of the same repository, under way
    before = len(github.calls("GET"))
    monkeypatch.setenv("DATABASE_URL", str(db.url.render_as_string(hide_password=False)))
    monkeypatch.setenv("GITHUB_API_URL", github.url)
    monkeypatch.setenv("GITHUB_TOKEN", github.token or "")

    assert main(["backfill", "octo/shared"]) == 1

    assert len(github.calls("GET")) == before
    err = capsys.readouterr().err
    assert "not landed: octo/shared: another backfill holds it (" in err and "(backfill octo/shared) since" in err
    other.release()
    assert main(["backfill", "octo/shared"]) == 0
    assert len(statuses(db, repo)) == 1
