"""Pull request stories for the statements, batch, order and concurrency tests.

Every payload is a modified copy of a real GitHub sample from tests/payloads, so
the shapes are GitHub's own. A story is the list of deliveries one pull request
produces: the PR's own events, checks of its commits (started, then finished),
commit statuses, reviews. `build_story` takes its choices from a `Picker`, so
that hypothesis (test_order) and a seeded random.Random (test_concurrency) can
drive the same generator.

Limit, documented: two snapshots of one object sharing GitHub's timestamp *and*
rank cannot be ordered by anyone, so a story gives every event its own second on
one story-wide clock (strictly increasing within each object's lifecycle too).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from flowlens_ingest.events.delivery import Delivery
from flowlens_ingest.events.envelope import Envelope
from flowlens_ingest.ingest import ingest
from flowlens_ingest.store.schema import ci_checks, pipeline_runs, pr_reviews, pull_requests, repositories

from .helpers import database_of, load_payload

T = TypeVar("T")
Event = tuple[str, dict[str, Any]]

START = datetime(2024, 3, 1, 9, 0, 0, tzinfo=UTC)
FAILING = ("failure", "timed_out", "cancelled", "action_required", "startup_failure")
PASSING = ("success", "neutral", "skipped")


@functools.cache
def _sample(name: str) -> str:
    return json.dumps(load_payload(name))


def sample(name: str) -> dict[str, Any]:
    """A fresh copy of a sample payload (parsed once per process)."""
    return json.loads(_sample(name))


def iso(at: datetime) -> str:
    """GitHub's timestamp format."""
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def sha_for(*parts: Any) -> str:
    """A stable, realistic 40-hex commit sha."""
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()


# --- payload builders (copies of real samples) ------------------------------------------


def repository(github_id: int, full_name: str | None = None) -> dict[str, Any]:
    """The sample repository object with another identity."""
    repo = sample("pull_request/opened.payload.json")["repository"]
    repo["id"] = github_id
    repo["full_name"] = full_name or f"Codertocat/Hello-World-{github_id}"
    repo["name"] = repo["full_name"].split("/")[1]
    return repo


def _pr_ref(repo: dict[str, Any], number: int, sha: str) -> dict[str, Any]:
    """The small PR object check events list in `pull_requests`."""
    ref = copy.deepcopy(sample("check_run/created.payload.json")["check_run"]["pull_requests"][0])
    ref["number"] = number
    ref["head"]["sha"] = sha
    ref["base"]["repo"]["id"] = repo["id"]
    return ref


def pull_request(
    action: str,
    repo: dict[str, Any],
    number: int,
    sha: str,
    updated_at: datetime,
    *,
    state: str = "open",
    merged: bool = False,
    title: str | None = None,
    files_changed: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A `pull_request` delivery: the sample PR at another number, head and time."""
    payload = sample("pull_request/opened.payload.json")
    payload["action"] = action
    payload["number"] = number
    payload["repository"] = repo
    pr = payload["pull_request"]
    pr["number"] = number
    pr["id"] = 279147437 + number
    pr["head"]["sha"] = sha
    pr["head"]["repo"] = copy.deepcopy(repo)
    pr["base"]["repo"] = copy.deepcopy(repo)
    pr["created_at"] = iso(START)
    pr["updated_at"] = iso(updated_at)
    pr["state"] = state
    pr["merged"] = merged
    pr["merged_at"] = iso(updated_at) if merged else None
    pr["closed_at"] = iso(updated_at) if state == "closed" else None
    if title is not None:
        pr["title"] = title
    if files_changed is not None:
        payload["files_changed"] = files_changed
    return payload


def check_run(
    repo: dict[str, Any],
    sha: str,
    name: str,
    check_id: int,
    status: str,
    started_at: datetime,
    *,
    conclusion: str | None = None,
    completed_at: datetime | None = None,
    prs: Sequence[int] = (),
    action: str | None = None,
) -> dict[str, Any]:
    """A `check_run` delivery."""
    payload = sample("check_run/completed.payload.json" if status == "completed" else "check_run/created.payload.json")
    payload["action"] = action or {"completed": "completed", "in_progress": "created"}.get(status, "created")
    payload["repository"] = repo
    run = payload["check_run"]
    run.update(
        id=check_id,
        name=name,
        head_sha=sha,
        status=status,
        conclusion=conclusion,
        started_at=iso(started_at),
        completed_at=iso(completed_at) if completed_at else None,
    )
    run["check_suite"]["head_sha"] = sha
    run["pull_requests"] = [_pr_ref(repo, n, sha) for n in prs]
    return payload


def check_suite(
    repo: dict[str, Any],
    sha: str,
    app: str,
    suite_id: int,
    status: str,
    created_at: datetime,
    updated_at: datetime,
    *,
    conclusion: str | None = None,
    prs: Sequence[int] = (),
) -> dict[str, Any]:
    """A `check_suite` delivery of one app."""
    payload = sample(
        "check_suite/completed.payload.json" if status == "completed" else "check_suite/requested.payload.json"
    )
    payload["repository"] = repo
    suite = payload["check_suite"]
    suite.update(
        id=suite_id,
        head_sha=sha,
        status=status,
        conclusion=conclusion,
        created_at=iso(created_at),
        updated_at=iso(updated_at),
    )
    suite["app"]["slug"] = app
    suite["pull_requests"] = [_pr_ref(repo, n, sha) for n in prs]
    return payload


def workflow_run(
    repo: dict[str, Any],
    sha: str,
    name: str,
    run_id: int,
    status: str,
    started_at: datetime,
    updated_at: datetime,
    *,
    conclusion: str | None = None,
    prs: Sequence[int] = (),
) -> dict[str, Any]:
    """A `workflow_run` delivery; no `prs` is the fork case (GitHub lists none)."""
    payload = sample("workflow_run/completed.payload.json")
    payload["action"] = {"completed": "completed", "in_progress": "in_progress"}.get(status, "requested")
    payload["repository"] = repo
    run = payload["workflow_run"]
    run.update(
        id=run_id,
        name=name,
        head_sha=sha,
        status=status,
        conclusion=conclusion,
        created_at=iso(started_at),
        run_started_at=iso(started_at),
        updated_at=iso(updated_at),
    )
    run["pull_requests"] = [_pr_ref(repo, n, sha) for n in prs]
    return payload


def workflow_job(
    repo: dict[str, Any],
    sha: str,
    workflow: str,
    name: str,
    job_id: int,
    status: str,
    created_at: datetime,
    *,
    started_at: datetime | None = None,
    completed_at: datetime | None = None,
    conclusion: str | None = None,
) -> dict[str, Any]:
    """A `workflow_job` delivery."""
    payload = sample("workflow_job/completed.success.with-organization.payload.json")
    payload["action"] = status if status != "waiting" else "waiting"
    payload["repository"] = repo
    job = payload["workflow_job"]
    job.update(
        id=job_id,
        name=name,
        workflow_name=workflow,
        head_sha=sha,
        status=status,
        conclusion=conclusion,
        created_at=iso(created_at),
        started_at=iso(started_at or created_at),
        completed_at=iso(completed_at) if completed_at else None,
    )
    return payload


def status(repo: dict[str, Any], sha: str, context: str, status_id: int, state: str, at: datetime) -> dict[str, Any]:
    """A `status` delivery (a commit status of an external CI)."""
    payload = sample("status/payload.json")
    payload["repository"] = repo
    payload.update(id=status_id, sha=sha, context=context, state=state, created_at=iso(at), updated_at=iso(at))
    payload["commit"]["sha"] = sha
    return payload


def review(
    action: str,
    repo: dict[str, Any],
    number: int,
    head_sha: str,
    reviewer: str,
    review_id: int,
    state: str,
    submitted_at: datetime,
) -> dict[str, Any]:
    """A `pull_request_review` delivery (`state` as GitHub sends it: approved, commented, dismissed...)."""
    payload = sample("pull_request_review/submitted.payload.json")
    payload["action"] = action
    payload["repository"] = repo
    rv = payload["review"]
    rv.update(id=review_id, state=state, commit_id=head_sha, submitted_at=iso(submitted_at))
    rv["user"]["login"] = reviewer
    pr = payload["pull_request"]
    pr["number"] = number
    pr["head"]["sha"] = head_sha
    pr["base"]["repo"]["id"] = repo["id"]
    return payload


# --- applying deliveries ----------------------------------------------------------------


def delivery(event: str, payload: dict[str, Any], delivery_id: str | None = None) -> Delivery:
    """A verified delivery of `payload`, as the webhook view builds it."""
    envelope = Envelope(delivery_id or str(uuid.uuid4()), hook_id=1, event=event, content_type="application/json")
    return Delivery.parse(envelope, json.dumps(payload).encode())


def apply(engine: Engine, event: str, payload: dict[str, Any]) -> str:
    """Ingest one delivery through the service's own path (map, store, journal); its outcome."""
    return ingest(database_of(engine), delivery(event, payload)).outcome


# Columns that are the row's own bookkeeping, not business data.
_BOOKKEEPING = {"id", "repo_id", "created_at", "updated_at", "version"}


def business_rows(engine: Engine, repo_github_id: int) -> dict[str, list[tuple[Any, ...]]]:
    """Every business column of one repository's PR-level rows, in a canonical order."""
    rid = sa.select(repositories.c.id).where(repositories.c.github_id == repo_github_id).scalar_subquery()
    out: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        for table in (pull_requests, pipeline_runs, ci_checks, pr_reviews):
            cols = [c for c in table.c if c.name not in _BOOKKEEPING]
            result = conn.execute(sa.select(*cols).where(table.c.repo_id == rid))
            out[table.name] = sorted((tuple(r) for r in result), key=repr)
    return out


def as_dicts(table: sa.Table, values: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """business_rows' tuples of one table as dicts by column name."""
    names = [c.name for c in table.c if c.name not in _BOOKKEEPING]
    return [dict(zip(names, v, strict=False)) for v in values]


# --- story generation ---------------------------------------------------------------------


class Picker(Protocol):
    """Where a story's choices come from (hypothesis's draw, or a seeded Random)."""

    def choice(self, options: Sequence[T]) -> T: ...

    def integer(self, low: int, high: int) -> int: ...


class RandomPicker:
    """Choices from a seeded random.Random."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def choice(self, options: Sequence[T]) -> T:
        """One of `options`."""
        return self.rng.choice(list(options))

    def integer(self, low: int, high: int) -> int:
        """An integer in [low, high]."""
        return self.rng.randint(low, high)


class RecordingPicker:
    """Passes another picker's choices through and keeps them, to build the same story again."""

    def __init__(self, inner: Picker) -> None:
        self.inner = inner
        self.made: list[Any] = []

    def choice(self, options: Sequence[T]) -> T:
        """One of `options`, recorded."""
        value = self.inner.choice(options)
        self.made.append(value)
        return value

    def integer(self, low: int, high: int) -> int:
        """An integer in [low, high], recorded."""
        value = self.inner.integer(low, high)
        self.made.append(value)
        return value

    def replay(self) -> ReplayPicker:
        """A picker that makes the same choices again."""
        return ReplayPicker(self.made)


class ReplayPicker:
    """Makes recorded choices again, in order."""

    def __init__(self, made: list[Any]) -> None:
        self.made = iter(made)

    def choice(self, options: Sequence[T]) -> T:
        """The next recorded choice."""
        return next(self.made)

    def integer(self, low: int, high: int) -> int:
        """The next recorded integer."""
        return next(self.made)


@dataclass
class Story:
    """One PR's deliveries in GitHub's order, and what docs/design.md says the statuses must end as."""

    repo_id: int
    number: int
    events: list[Event] = field(default_factory=list)
    head_sha: str = ""
    # Final (status, conclusion) of every check, by (sha, source, name).
    checks: dict[tuple[str, str, str], tuple[str, str | None]] = field(default_factory=dict)
    # Latest verdict per reviewer (approved, changes_requested, dismissed).
    verdicts: dict[str, str] = field(default_factory=dict)
    status_pr: str = "opened"
    status_merge: str = "pending"

    def expected_build(self) -> str:
        """status_build by docs/design.md's rule, for the PR's final head sha."""
        states = [v for (sha, _s, _n), v in self.checks.items() if sha == self.head_sha]
        if not states:
            return "pending"
        if any(c in FAILING or c in ("failure", "error") for _s, c in states):
            return "failed"
        if any(s != "completed" for s, _c in states):
            return "running"
        return "passed"

    def expected_approval(self) -> str:
        """status_approval by docs/design.md's rule."""
        verdicts = set(self.verdicts.values())
        if "changes_requested" in verdicts:
            return "changes_requested"
        if "approved" in verdicts:
            return "approved"
        return "pending"


class Clock:
    """One story-wide clock: every event gets its own, later second."""

    def __init__(self) -> None:
        self.now = START

    def tick(self, seconds: int = 7) -> datetime:
        """A later time."""
        self.now += timedelta(seconds=seconds)
        return self.now


CHECK_KINDS = ("check_run", "workflow_job", "workflow_run", "check_suite")
CHECK_NAMES = ("lint", "unit", "integration", "build", "docs")
REVIEWERS = ("alice", "bob", "carol")
CONCLUSIONS = (*PASSING, *FAILING)


def _check_lifecycle(
    pick: Picker,
    story: Story,
    repo: dict[str, Any],
    sha: str,
    name: str,
    clock: Clock,
    ids: Any,
    *,
    finish: bool = True,
    link_pr: bool = True,
) -> list[Event]:
    """A check started, maybe in progress, maybe finished: several deliveries of one check."""
    kind = pick.choice(CHECK_KINDS)
    conclusion = pick.choice(CONCLUSIONS) if finish else None
    with_progress = pick.choice((True, False))
    prs = (story.number,) if link_pr and pick.choice((True, False)) else ()
    oid = next(ids)
    t0 = clock.tick()
    t1 = clock.tick() if with_progress else t0
    t2 = clock.tick()
    events: list[Event] = []
    if kind == "check_run":
        events.append(("check_run", check_run(repo, sha, name, oid, "queued", t0, prs=prs)))
        if with_progress:
            # Same started_at as queued: the rank orders them.
            events.append(("check_run", check_run(repo, sha, name, oid, "in_progress", t0, prs=prs)))
        if finish:
            events.append(
                (
                    "check_run",
                    check_run(repo, sha, name, oid, "completed", t0, conclusion=conclusion, completed_at=t2, prs=prs),
                )
            )
        key = (sha, "check_run", name)
    elif kind == "workflow_job":
        events.append(("workflow_job", workflow_job(repo, sha, "CI", name, oid, "queued", t0)))
        if with_progress:
            events.append(("workflow_job", workflow_job(repo, sha, "CI", name, oid, "in_progress", t0, started_at=t1)))
        if finish:
            events.append(
                (
                    "workflow_job",
                    workflow_job(
                        repo,
                        sha,
                        "CI",
                        name,
                        oid,
                        "completed",
                        t0,
                        started_at=t1,
                        completed_at=t2,
                        conclusion=conclusion,
                    ),
                )
            )
        key = (sha, "workflow_job", f"CI / {name}")
    elif kind == "workflow_run":
        events.append(("workflow_run", workflow_run(repo, sha, name, oid, "queued", t0, t0, prs=prs)))
        if with_progress:
            events.append(("workflow_run", workflow_run(repo, sha, name, oid, "in_progress", t0, t1, prs=prs)))
        if finish:
            events.append(
                (
                    "workflow_run",
                    workflow_run(repo, sha, name, oid, "completed", t0, t2, conclusion=conclusion, prs=prs),
                )
            )
        key = (sha, "workflow_run", name)
    else:
        events.append(("check_suite", check_suite(repo, sha, name, oid, "queued", t0, t0, prs=prs)))
        if with_progress:
            events.append(("check_suite", check_suite(repo, sha, name, oid, "in_progress", t0, t1, prs=prs)))
        if finish:
            events.append(
                ("check_suite", check_suite(repo, sha, name, oid, "completed", t0, t2, conclusion=conclusion, prs=prs))
            )
        key = (sha, "check_suite", name)
    final = "completed" if finish else ("in_progress" if with_progress else "queued")
    story.checks[key] = (final, conclusion)
    return events


def _statuses(pick: Picker, story: Story, repo: dict[str, Any], sha: str, clock: Clock, ids: Any) -> list[Event]:
    """A commit status context: pending, then (usually) a final state."""
    context = pick.choice(("ci/jenkins", "ci/circleci"))
    events: list[Event] = [("status", status(repo, sha, context, next(ids), "pending", clock.tick()))]
    final = pick.choice(("success", "failure", "error", None))
    if final is not None:
        events.append(("status", status(repo, sha, context, next(ids), final, clock.tick())))
    story.checks[(sha, "status", context)] = ("completed", final) if final else ("pending", None)
    return events


def _reviews(pick: Picker, story: Story, repo: dict[str, Any], sha: str, clock: Clock, ids: Any) -> list[Event]:
    """Reviews from several reviewers: verdicts, comments, an edit, a dismissal."""
    events: list[Event] = []
    for reviewer in REVIEWERS[: pick.integer(1, len(REVIEWERS))]:
        for _ in range(pick.integer(1, 3)):
            state = pick.choice(("approved", "changes_requested", "commented"))
            rid, at = next(ids), clock.tick()
            events.append(
                ("pull_request_review", review("submitted", repo, story.number, sha, reviewer, rid, state, at))
            )
            if state == "commented":
                continue
            story.verdicts[reviewer] = state
            follow = pick.choice(("none", "edited", "dismissed"))
            if follow == "edited":
                events.append(
                    ("pull_request_review", review("edited", repo, story.number, sha, reviewer, rid, state, at))
                )
            elif follow == "dismissed":
                # A dismissal carries the dismissed review's own id and submitted_at.
                events.append(
                    (
                        "pull_request_review",
                        review("dismissed", repo, story.number, sha, reviewer, rid, "dismissed", at),
                    )
                )
                story.verdicts[reviewer] = "dismissed"
    return events


def build_story(pick: Picker, repo_id: int, number: int) -> Story:
    """A realistic PR story: opened, checks, statuses, reviews, a synchronize, more checks, maybe closed."""
    story = Story(repo_id=repo_id, number=number)
    repo = repository(repo_id)
    clock = Clock()
    # Ids and shas depend on the PR number only: the same choices give the same
    # business rows in any repository.
    ids = iter(range(number * 1000, number * 1000 + 1000))
    sha_a, sha_b = sha_for(number, "a"), sha_for(number, "b")
    events = story.events
    events.append(("pull_request", pull_request("opened", repo, number, sha_a, clock.tick())))
    names = list(CHECK_NAMES)
    for name in names[: pick.integer(1, 3)]:
        events += _check_lifecycle(pick, story, repo, sha_a, name, clock, ids)
    events += _statuses(pick, story, repo, sha_a, clock, ids)
    events += _reviews(pick, story, repo, sha_a, clock, ids)
    head = sha_a
    if pick.choice((True, True, False)):
        # A check of the old head still running when the new commit is pushed: it
        # finishes after the synchronize and must not touch the new head's status.
        late = _check_lifecycle(pick, story, repo, sha_a, "slow", clock, ids)
        events += late[:-1]
        events.append(("pull_request", pull_request("synchronize", repo, number, sha_b, clock.tick())))
        events.append(late[-1])
        head = sha_b
        story.status_pr = "updated"
        for name in names[: pick.integer(1, 4)]:
            events += _check_lifecycle(
                pick, story, repo, sha_b, name, clock, ids, finish=pick.choice((True, True, False))
            )
        if pick.choice((True, False)):
            events += _statuses(pick, story, repo, sha_b, clock, ids)
        if pick.choice((True, False)):
            events += _reviews(pick, story, repo, sha_b, clock, ids)
    ending = pick.choice(("open", "labeled", "closed", "merged"))
    if ending != "open":
        state = "open" if ending == "labeled" else "closed"
        events.append(
            (
                "pull_request",
                pull_request(
                    ending if ending == "labeled" else "closed",
                    repo,
                    number,
                    head,
                    clock.tick(),
                    state=state,
                    merged=ending == "merged",
                ),
            )
        )
        story.status_pr = "updated"
        story.status_merge = {"labeled": "pending", "closed": "closed", "merged": "merged"}[ending]
    story.head_sha = head
    return story
