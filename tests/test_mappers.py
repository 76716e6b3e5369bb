"""The pure mappers over GitHub's own sample payloads (tests/payloads, from octokit/webhooks).

Expected values are read off the payload files, not produced by running the code.
"""

import copy
from datetime import UTC, datetime
from pathlib import Path

import pytest

from flowlens_ingest.events.mappers import Changes, MappingError, map_delivery
from flowlens_ingest.events.rows import CheckRow, PipelineRow, RepositoryRow, ReviewRow

from .helpers import PAYLOADS, load_payload

EVENTS = sorted(p.name for p in PAYLOADS.iterdir() if p.is_dir())
ALL_FILES = sorted(PAYLOADS.glob("*/*.json"))
# Events the service applies; the others (ping, installation) are journaled only.
APPLIED_EVENTS = {
    "check_run",
    "check_suite",
    "pull_request",
    "pull_request_review",
    "push",
    "repository",
    "status",
    "workflow_job",
    "workflow_run",
}
SHA_EC26 = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
SHA_3484 = "3484a3fb816e0859fd6e1cea078d76385ff50625"
HELLO_WORLD = 186853002


def utc(text: str) -> datetime:
    """A payload's ISO 8601 time as an aware datetime."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def test_every_payload_folder_is_covered():
    assert set(EVENTS) == APPLIED_EVENTS | {"ping", "installation"}
    assert len(ALL_FILES) >= 80


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_sample_payload_maps(path: Path):
    event = path.parent.name
    changes = map_delivery(event, load_payload(f"{event}/{path.name}"))
    assert isinstance(changes, Changes)
    if event in APPLIED_EVENTS:
        assert changes.repository is not None
        assert changes.repository.github_id == load_payload(f"{event}/{path.name}")["repository"]["id"]
    else:
        assert changes.repository is None


# --- pull_request -------------------------------------------------------------------------


def test_pull_request_opened():
    changes = map_delivery("pull_request", load_payload("pull_request/opened.payload.json"))
    pr = changes.pull_request
    assert pr is not None
    assert (pr.pr_number, pr.github_id) == (2, 279147437)
    assert pr.title == "Update the README with new information."
    assert pr.description == "This is a pretty simple change that we need to pull into master."
    assert pr.author == "Codertocat"
    assert pr.author_avatar == "https://avatars1.githubusercontent.com/u/21031067?v=4"
    assert pr.commit_sha == SHA_EC26
    assert (pr.branch_name, pr.base_branch) == ("changes", "master")
    assert pr.pr_url == "https://github.com/Codertocat/Hello-World/pull/2"
    assert pr.files_changed is None
    assert (pr.additions, pr.deletions, pr.changed_files, pr.commits_count) == (1, 1, 1, 1)
    assert pr.labels == [{"name": "bug", "color": "d73a4a"}]
    assert [a["login"] for a in pr.assignees] == ["Codertocat"]
    assert [r["login"] for r in pr.reviewers] == ["octocat"]
    assert (pr.is_draft, pr.state, pr.merged, pr.merged_at, pr.closed_at) == (False, "open", False, None, None)
    assert pr.github_created_at == utc("2019-05-15T15:20:33Z")
    assert pr.github_updated_at == utc("2019-05-15T15:20:33Z")
    assert changes.pipeline == PipelineRow(
        pr_number=2,
        commit_sha=SHA_EC26,
        author="Codertocat",
        avatar_url="https://avatars1.githubusercontent.com/u/21031067?v=4",
        title="Update the README with new information.",
        status_pr="opened",
        status_merge="pending",
        pr_updated_at=utc("2019-05-15T15:20:33Z"),
    )
    assert changes.checks == () and changes.review is None


def test_pull_request_opened_with_null_body():
    pr = map_delivery("pull_request", load_payload("pull_request/opened.with-null-body.json")).pull_request
    assert pr is not None and pr.description is None


def test_pull_request_closed_without_merge():
    changes = map_delivery("pull_request", load_payload("pull_request/closed.payload.json"))
    assert changes.pull_request is not None and changes.pipeline is not None
    assert changes.pull_request.state == "closed"
    assert changes.pull_request.merged is False
    assert changes.pull_request.closed_at == utc("2019-05-15T15:21:18Z")
    assert changes.pull_request.github_updated_at == utc("2019-05-15T15:21:18Z")
    assert (changes.pipeline.status_pr, changes.pipeline.status_merge) == ("updated", "closed")


def test_pull_request_closed_merged():
    payload = load_payload("pull_request/closed.payload.json")
    payload["pull_request"].update(merged=True, merged_at="2019-05-15T15:21:18Z")
    changes = map_delivery("pull_request", payload)
    assert changes.pull_request is not None and changes.pipeline is not None
    assert (changes.pull_request.state, changes.pull_request.merged) == ("merged", True)
    assert changes.pull_request.merged_at == utc("2019-05-15T15:21:18Z")
    assert changes.pipeline.status_merge == "merged"


def test_pull_request_synchronize_is_an_update():
    changes = map_delivery("pull_request", load_payload("pull_request/synchronize.payload.json"))
    assert changes.pipeline is not None
    assert (changes.pipeline.status_pr, changes.pipeline.commit_sha) == ("updated", SHA_EC26)


def test_pull_request_reopened_is_opened():
    changes = map_delivery("pull_request", load_payload("pull_request/reopened.payload.json"))
    assert changes.pipeline is not None and changes.pipeline.status_pr == "opened"


def test_draft_comes_from_the_object():
    pr = map_delivery("pull_request", load_payload("pull_request/converted_to_draft.payload.json")).pull_request
    assert pr is not None and pr.is_draft is True


def test_repository_of_a_pull_request():
    repo = map_delivery("pull_request", load_payload("pull_request/opened.payload.json")).repository
    assert repo == RepositoryRow(
        github_id=HELLO_WORLD,
        name="Hello-World",
        full_name="Codertocat/Hello-World",
        owner="Codertocat",
        owner_avatar_url="https://avatars1.githubusercontent.com/u/21031067?v=4",
        description=None,
        is_private=False,
        default_branch="master",
        html_url="https://github.com/Codertocat/Hello-World",
        language=None,
        stars=0,
        forks=0,
        is_archived=False,
        last_activity=utc("2019-05-15T15:20:32Z"),
        github_created_at=utc("2019-05-15T15:19:25Z"),
        github_updated_at=utc("2019-05-15T15:19:27Z"),
    )


# --- files_changed --------------------------------------------------------------------------

FILES = [
    {
        "filename": "README.md",
        "status": "modified",
        "additions": 1,
        "deletions": 1,
        "changes": 2,
        "patch": "@@ -1 +1 @@\n-Hello\n+Hello, World",
    },
]


def test_files_changed_absent_is_none():
    pr = map_delivery("pull_request", load_payload("pull_request/opened.payload.json")).pull_request
    assert pr is not None and pr.files_changed is None


def test_files_changed_at_top_level():
    payload = load_payload("pull_request/opened.payload.json")
    payload["files_changed"] = copy.deepcopy(FILES)
    pr = map_delivery("pull_request", payload).pull_request
    assert pr is not None and pr.files_changed == FILES


def test_files_changed_inside_pull_request():
    payload = load_payload("pull_request/opened.payload.json")
    payload["pull_request"]["files_changed"] = copy.deepcopy(FILES)
    pr = map_delivery("pull_request", payload).pull_request
    assert pr is not None and pr.files_changed == FILES


def test_files_changed_empty_list_is_kept_as_empty():
    payload = load_payload("pull_request/opened.payload.json")
    payload["files_changed"] = []
    pr = map_delivery("pull_request", payload).pull_request
    assert pr is not None and pr.files_changed == []


@pytest.mark.parametrize("bad", ["README.md", ["README.md"], {"filename": "README.md"}, 3])
def test_files_changed_of_another_shape_is_refused(bad):
    payload = load_payload("pull_request/opened.payload.json")
    payload["files_changed"] = bad
    with pytest.raises(MappingError):
        map_delivery("pull_request", payload)


# --- checks ----------------------------------------------------------------------------------


def test_check_run_created():
    changes = map_delivery("check_run", load_payload("check_run/created.payload.json"))
    assert changes.checks == (
        CheckRow(
            head_sha=SHA_EC26,
            source="check_run",
            name="Octocoders-linter",
            github_id=128620228,
            status="queued",
            conclusion=None,
            url="https://github.com/Codertocat/Hello-World/runs/128620228",
            github_started_at=utc("2019-05-15T15:21:12Z"),
            github_completed_at=None,
            github_updated_at=None,
            event_at=utc("2019-05-15T15:21:12Z"),
            rank=0,
        ),
    )
    assert changes.pr_heads == ((2, SHA_EC26),)


def test_check_run_completed_outranks_created_at_the_same_second():
    created = map_delivery("check_run", load_payload("check_run/created.payload.json")).checks[0]
    completed = map_delivery("check_run", load_payload("check_run/completed.payload.json")).checks[0]
    assert (completed.status, completed.conclusion) == ("completed", "success")
    assert completed.github_completed_at == utc("2019-05-15T15:21:12Z")
    assert completed.event_at == created.event_at
    assert completed.rank > created.rank


def test_check_run_failure_conclusion():
    check = map_delivery("check_run", load_payload("check_run/completed.1.payload.json")).checks[0]
    assert (check.status, check.conclusion) == ("completed", "failure")


def test_check_run_rerequested_maps_the_object_not_the_action():
    changes = map_delivery("check_run", load_payload("check_run/rerequested.payload.json"))
    check = changes.checks[0]
    assert (check.name, check.head_sha, check.github_id) == ("randscape", "d6fde92930d4715a2b49857d24b940956b26d2d3", 4)
    assert (check.status, check.conclusion) == ("completed", "neutral")
    assert check.event_at == utc("2018-05-04T01:14:52Z")
    assert changes.pr_heads == ()
    assert changes.repository is not None and changes.repository.github_id == 526


def test_check_run_requested_action_in_progress():
    changes = map_delivery("check_run", load_payload("check_run/requested_action.payload.json"))
    check = changes.checks[0]
    assert (check.name, check.status, check.rank) == ("API Review", "in_progress", 1)
    assert changes.pr_heads == ((26764, "5bd5f196a46b8222fb7484f05faba41a73cf34bd"),)


def test_check_run_pull_request_of_another_base_repository_is_not_linked():
    payload = load_payload("check_run/created.payload.json")
    payload["check_run"]["pull_requests"][0]["base"]["repo"]["id"] = 1
    assert map_delivery("check_run", payload).pr_heads == ()


def test_check_suite_completed_named_after_the_app():
    changes = map_delivery("check_suite", load_payload("check_suite/completed.payload.json"))
    assert changes.checks == (
        CheckRow(
            head_sha=SHA_EC26,
            source="check_suite",
            name="octocoders-linter",
            github_id=118578147,
            status="completed",
            conclusion="success",
            url="https://api.github.com/repos/Codertocat/Hello-World/check-suites/118578147",
            github_started_at=utc("2019-05-15T15:20:31Z"),
            github_completed_at=None,
            github_updated_at=utc("2019-05-15T15:21:14Z"),
            event_at=utc("2019-05-15T15:21:14Z"),
            rank=2,
        ),
    )
    assert changes.pr_heads == ((2, SHA_EC26),)


def test_check_suite_prefers_the_app_slug():
    check = map_delivery("check_suite", load_payload("check_suite/completed.1.payload.json")).checks[0]
    assert check.name == "github-actions"


def test_check_suite_requested_is_queued_without_prs():
    changes = map_delivery("check_suite", load_payload("check_suite/requested.payload.json"))
    check = changes.checks[0]
    assert (check.head_sha, check.status, check.conclusion, check.rank) == (
        "f95f852bd8fca8fcc58a9a2d6c842781e32a215e",
        "queued",
        None,
        0,
    )
    assert changes.pr_heads == ()


def test_workflow_run_from_a_fork_counts_by_head_sha():
    changes = map_delivery("workflow_run", load_payload("workflow_run/completed.payload.json"))
    assert changes.checks == (
        CheckRow(
            head_sha=SHA_3484,
            source="workflow_run",
            # The run's own name is "", so the workflow's name is used.
            name="test",
            github_id=289782451,
            status="completed",
            conclusion="success",
            url="https://github.com/octo-org/octo-repo/actions/runs/289782451",
            github_started_at=utc("2020-10-05T16:33:49Z"),
            github_completed_at=None,
            github_updated_at=utc("2020-10-05T16:33:49Z"),
            event_at=utc("2020-10-05T16:33:49Z"),
            rank=2,
        ),
    )
    assert changes.pr_heads == ()
    assert changes.repository is not None and changes.repository.github_id == 300029405


def test_workflow_run_names_only_prs_of_its_own_repository():
    # The sample's pull request has base repo 186853002 while the delivery's repository is 300029405.
    changes = map_delivery("workflow_run", load_payload("workflow_run/completed.with-pull-requests.payload.json"))
    assert changes.pr_heads == ()
    payload = load_payload("workflow_run/completed.with-pull-requests.payload.json")
    payload["workflow_run"]["pull_requests"][0]["base"]["repo"]["id"] = 300029405
    assert map_delivery("workflow_run", payload).pr_heads == ((2, SHA_3484),)


def test_workflow_run_requested_with_a_conclusion_uses_the_object():
    check = map_delivery("workflow_run", load_payload("workflow_run/requested.with-conclusion.payload.json")).checks[0]
    assert (check.status, check.conclusion) == ("completed", "action_required")


def test_workflow_job_completed_failure():
    changes = map_delivery(
        "workflow_job", load_payload("workflow_job/completed.failure.with-organization.payload.json")
    )
    assert changes.checks == (
        CheckRow(
            head_sha=SHA_3484,
            source="workflow_job",
            name="CodeQL / linters",
            github_id=289782451,
            status="completed",
            conclusion="failure",
            url="https://github.com/octo-org/octo-repo/runs/1291536064",
            github_started_at=utc("2021-08-05T10:34:58Z"),
            github_completed_at=utc("2021-08-05T10:38:16Z"),
            github_updated_at=None,
            event_at=utc("2021-08-05T10:38:16Z"),
            rank=2,
        ),
    )
    assert changes.pr_heads == ()


def test_workflow_job_waiting():
    check = map_delivery("workflow_job", load_payload("workflow_job/waiting.payload.json")).checks[0]
    assert (check.name, check.status, check.conclusion, check.rank) == ("Env Test / test", "waiting", None, 0)


def test_status_success():
    changes = map_delivery("status", load_payload("status/payload.json"))
    assert changes.checks == (
        CheckRow(
            head_sha="6113728f27ae82c7b1a177c8d03f9e96e0adf246",
            source="status",
            name="default",
            github_id=6805126730,
            status="completed",
            conclusion="success",
            url=None,
            github_started_at=utc("2019-05-15T15:20:55Z"),
            github_completed_at=None,
            github_updated_at=utc("2019-05-15T15:20:55Z"),
            event_at=utc("2019-05-15T15:20:55Z"),
            rank=2,
        ),
    )


@pytest.mark.parametrize(
    ("state", "status", "conclusion"),
    [("pending", "pending", None), ("failure", "completed", "failure"), ("error", "completed", "error")],
)
def test_status_states(state, status, conclusion):
    payload = load_payload("status/payload.json")
    payload["state"] = state
    check = map_delivery("status", payload).checks[0]
    assert (check.status, check.conclusion) == (status, conclusion)


# --- reviews -----------------------------------------------------------------------------------


def test_commented_review_changes_no_verdict():
    changes = map_delivery("pull_request_review", load_payload("pull_request_review/submitted.payload.json"))
    assert changes.review is None
    assert changes.pr_heads == ((2, SHA_EC26),)
    assert changes.repository is not None and changes.repository.github_id == HELLO_WORLD


def test_approved_review():
    payload = load_payload("pull_request_review/submitted.payload.json")
    payload["review"]["state"] = "approved"
    assert map_delivery("pull_request_review", payload).review == ReviewRow(
        pr_number=2,
        reviewer="Codertocat",
        review_id=237895671,
        state="approved",
        commit_sha=SHA_EC26,
        html_url="https://github.com/Codertocat/Hello-World/pull/2#pullrequestreview-237895671",
        github_submitted_at=utc("2019-05-15T15:20:38Z"),
        rank=0,
    )


def test_dismissed_review_outranks_the_review_it_dismisses():
    review = map_delivery("pull_request_review", load_payload("pull_request_review/dismissed.payload.json")).review
    assert review is not None
    assert (review.reviewer, review.review_id, review.state) == ("Codertocat", 237895671, "dismissed")
    assert review.github_submitted_at == utc("2019-05-15T15:20:38Z")
    assert review.rank == 1


def test_upper_case_review_state_is_understood():
    payload = load_payload("pull_request_review/submitted.payload.json")
    payload["review"]["state"] = "CHANGES_REQUESTED"
    review = map_delivery("pull_request_review", payload).review
    assert review is not None and review.state == "changes_requested"


# --- repository and push ---------------------------------------------------------------------------


def test_repository_renamed():
    changes = map_delivery("repository", load_payload("repository/renamed.payload.json"))
    repo = changes.repository
    assert repo is not None
    assert (repo.github_id, repo.name, repo.full_name, repo.owner) == (
        186853261,
        "Hello-World",
        "Octocoders/Hello-World",
        "Octocoders",
    )
    assert repo.deleted is False
    assert changes.pull_request is None and changes.checks == ()


def test_repository_transferred_carries_the_new_owner():
    repo = map_delivery("repository", load_payload("repository/transferred.payload.json")).repository
    assert repo is not None and (repo.owner, repo.full_name) == ("Octocoders", "Octocoders/Hello-World")


def test_repository_privatized():
    repo = map_delivery("repository", load_payload("repository/privatized.payload.json")).repository
    assert repo is not None
    assert (repo.is_private, repo.language, repo.forks) == (True, "Ruby", 1)
    assert repo.github_updated_at == utc("2019-05-15T15:21:02Z")


def test_repository_deleted():
    payload = load_payload("repository/edited.payload.json")
    payload["action"] = "deleted"
    payload.pop("changes")
    repo = map_delivery("repository", payload).repository
    assert repo is not None and repo.deleted is True and repo.github_id == 186853261


def test_push_with_integer_timestamps():
    repo = map_delivery("push", load_payload("push/payload.json")).repository
    assert repo is not None
    # pushed_at 1557933657 and created_at 1557933565 are Unix seconds in push payloads.
    assert repo.last_activity == utc("2019-05-15T15:20:57Z")
    assert repo.github_created_at == utc("2019-05-15T15:19:25Z")
    assert repo.github_updated_at == utc("2019-05-15T15:20:41Z")
    assert (repo.github_id, repo.full_name) == (HELLO_WORLD, "Codertocat/Hello-World")


def test_events_without_a_mapper_are_empty():
    assert map_delivery("installation", load_payload("installation/created.payload.json")).repository is None
    assert map_delivery("ping", load_payload("ping/payload.json")).repository is None
    assert map_delivery("sponsorship", {"action": "created"}).repository is None


# --- malformed shapes --------------------------------------------------------------------------


def _broken(name: str, change) -> dict:
    payload = load_payload(name)
    change(payload)
    return payload


@pytest.mark.parametrize(
    ("event", "payload"),
    [
        ("pull_request", _broken("pull_request/opened.payload.json", lambda p: p.update(pull_request=[]))),
        ("pull_request", _broken("pull_request/opened.payload.json", lambda p: p.pop("repository"))),
        (
            "pull_request",
            _broken("pull_request/opened.payload.json", lambda p: p["pull_request"].update(state="weird")),
        ),
        ("pull_request", _broken("pull_request/opened.payload.json", lambda p: p["pull_request"].update(number="2"))),
        (
            "pull_request",
            _broken("pull_request/opened.payload.json", lambda p: p["pull_request"].update(updated_at="yesterday")),
        ),
        ("pull_request", _broken("pull_request/opened.payload.json", lambda p: p["pull_request"].update(labels="bug"))),
        ("pull_request", _broken("pull_request/opened.payload.json", lambda p: p["repository"].update(id=None))),
        (
            "pull_request",
            _broken("pull_request/opened.payload.json", lambda p: p["repository"].update(name="x" * 5000)),
        ),
        ("pull_request", _broken("pull_request/opened.payload.json", lambda p: p["repository"].update(private="no"))),
        ("check_run", _broken("check_run/created.payload.json", lambda p: p["check_run"].pop("head_sha"))),
        ("check_run", _broken("check_run/created.payload.json", lambda p: p["check_run"].update(status=None))),
        ("check_run", _broken("check_run/created.payload.json", lambda p: p["check_run"].update(pull_requests={}))),
        ("check_suite", _broken("check_suite/completed.payload.json", lambda p: p.update(check_suite="x"))),
        (
            "workflow_run",
            _broken("workflow_run/completed.payload.json", lambda p: p["workflow_run"].update(run_started_at=True)),
        ),
        ("workflow_job", _broken("workflow_job/queued.payload.json", lambda p: p["workflow_job"].update(name=""))),
        ("status", _broken("status/payload.json", lambda p: p.update(state="exploded"))),
        ("status", _broken("status/payload.json", lambda p: p.pop("sha"))),
        (
            "pull_request_review",
            _broken("pull_request_review/dismissed.payload.json", lambda p: p["review"].pop("user")),
        ),
        ("pull_request_review", _broken("pull_request_review/dismissed.payload.json", lambda p: p.pop("pull_request"))),
        ("repository", _broken("repository/renamed.payload.json", lambda p: p.pop("repository"))),
    ],
)
def test_malformed_payloads_raise_mapping_error(event, payload):
    with pytest.raises(MappingError):
        map_delivery(event, payload)


def test_numbers_no_column_holds_map_to_none():
    # A count beyond INTEGER, a Unix time beyond any timestamp: NULL, not a refused delivery.
    pr = map_delivery(
        "pull_request",
        _broken("pull_request/opened.payload.json", lambda p: p["pull_request"].update(additions=2**40, deletions=-1)),
    ).pull_request
    assert pr is not None and (pr.additions, pr.deletions) == (None, None)
    repo = map_delivery("push", _broken("push/payload.json", lambda p: p["repository"].update(pushed_at=10**20)))
    assert repo.repository is not None and repo.repository.last_activity is None


def test_a_check_suite_with_a_null_status_is_queued_or_completed():
    # GitHub's schema allows a null status for a suite.
    queued = _broken(
        "check_suite/completed.payload.json", lambda p: p["check_suite"].update(status=None, conclusion=None)
    )
    assert map_delivery("check_suite", queued).checks[0].status == "queued"
    done = _broken("check_suite/completed.payload.json", lambda p: p["check_suite"].update(status=None))
    assert map_delivery("check_suite", done).checks[0].status == "completed"
