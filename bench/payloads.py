"""Signed deliveries for the benchmark: real GitHub payloads, re-aimed at many repositories and PRs.

Each body is one of the sample payloads in tests/payloads/, with its
repository, PR number, head sha, check name and GitHub timestamps rewritten, so
that the upserts of a run really write rows (new checks, newer PR snapshots,
new reviews) instead of re-applying one payload over and over. Timestamps grow
with the body's index: bodies sent in order are newer than what is stored, and
the few that overtake each other on different connections come out `stale`,
as GitHub's own out-of-order deliveries do.

The file written for wrk holds one record per delivery:
`<event> <X-Hub-Signature-256> <body length>\\n<body>`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flowlens_ingest.events.signature import sign

# Weighted like a busy organisation's traffic: every push fans out into many
# check runs and workflow jobs, then PR updates, suites, runs, statuses, reviews.
MIX: dict[str, int] = {
    "check_run": 26,
    "workflow_job": 26,
    "pull_request": 14,
    "check_suite": 10,
    "workflow_run": 8,
    "status": 7,
    "pull_request_review": 5,
    "push": 4,
}

# The CI events alone (what a burst of pushes sends): no pull_request, no push.
CI_MIX: dict[str, int] = {e: w for e, w in MIX.items() if e not in ("pull_request", "push")}
MIXES: dict[str, dict[str, int]] = {"ci": CI_MIX, "full": MIX}

ORG = "bench-org"
REPO_ID_BASE = 900_000_000
BASE_TIME = datetime(2025, 1, 1, tzinfo=UTC)
CHECK_NAMES = ("build", "test (3.11)", "test (3.12)", "lint", "typecheck", "e2e", "docs", "package")
REVIEWERS = ("alice", "bob", "carol", "dave", "erin")
# A PR gets a new head commit every this many deliveries of it, on average.
PUSH_EVERY = 12


@dataclass(frozen=True)
class Shape:
    """How many repositories and open PRs per repository the generated traffic touches."""

    repositories: int = 200
    prs_per_repository: int = 15


def default_payload_dir() -> Path:
    """The test suite's real GitHub payloads (tests/payloads)."""
    folder = Path(__file__).resolve().parent.parent / "tests" / "payloads"
    if not folder.is_dir():
        raise FileNotFoundError(f"no sample payloads: expected {folder}")
    return folder


def load_templates(payload_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """The sample payloads of every event in MIX, parsed."""
    templates: dict[str, list[dict[str, Any]]] = {}
    for event in MIX:
        files = sorted((payload_dir / event).glob("*.json"))
        if not files:
            raise FileNotFoundError(f"no sample payloads for {event} in {payload_dir}")
        templates[event] = [json.loads(f.read_text()) for f in files]
    return templates


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha(*parts: object) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()


def _retime(obj: dict[str, Any], t: datetime, keys: tuple[str, ...]) -> None:
    """Move GitHub's timestamps of `obj` to `t`, keeping nulls null (a queued job has no end)."""
    for key in keys:
        if obj.get(key) is not None:
            obj[key] = int(t.timestamp()) if isinstance(obj[key], int) else _iso(t)


def _pr_ref(number: int, sha: str, repo_id: int, template: list[Any] | None) -> dict[str, Any]:
    """A `pull_requests[]` item of a check event, shaped like GitHub's."""
    item = copy.deepcopy(template[0]) if template else {}
    item.update(
        number=number,
        id=repo_id * 1000 + number,
        head={**item.get("head", {}), "sha": sha, "ref": f"feature-{number}"},
        base={**item.get("base", {}), "ref": "main", "repo": {**item.get("base", {}).get("repo", {}), "id": repo_id}},
    )
    return item


class Generator:
    """Makes the i-th delivery of a run deterministically from a seed."""

    def __init__(
        self, templates: dict[str, list[dict[str, Any]]], shape: Shape, seed: int = 1, mix: dict[str, int] | None = None
    ) -> None:
        self.templates = templates
        self.shape = shape
        self.rng = random.Random(seed)
        weights = MIX if mix is None else mix
        self.events = list(weights)
        self.weights = [weights[e] for e in self.events]
        # Deliveries made so far per (repository, PR): its head commit moves every PUSH_EVERY.
        self.seen: dict[tuple[int, int], int] = {}

    def delivery(self, index: int) -> tuple[str, dict[str, Any]]:
        """(event, payload) of delivery number `index`."""
        rng = self.rng
        event = rng.choices(self.events, self.weights)[0]
        payload = copy.deepcopy(rng.choice(self.templates[event]))
        r = rng.randrange(self.shape.repositories)
        number = 1 + rng.randrange(self.shape.prs_per_repository)
        repo_id = REPO_ID_BASE + r
        # One clock for the whole run: a later body is newer, one second apart.
        t = BASE_TIME + timedelta(seconds=index)
        seen = self.seen[(r, number)] = self.seen.get((r, number), 0) + 1
        sha = _sha(repo_id, number, seen // PUSH_EVERY)
        self._repository(payload, r, t)
        getattr(self, f"_{event}")(payload, repo_id, number, sha, t, index)
        return event, payload

    def _repository(self, payload: dict[str, Any], r: int, t: datetime) -> None:
        repo = payload.get("repository")
        if not isinstance(repo, dict):
            return
        repo.update(id=REPO_ID_BASE + r, node_id=f"R_bench{r}", name=f"repo-{r}", full_name=f"{ORG}/repo-{r}")
        repo["html_url"] = f"https://github.com/{ORG}/repo-{r}"
        if isinstance(repo.get("owner"), dict):
            repo["owner"].update(login=ORG, name=ORG)
        _retime(repo, t, ("updated_at", "pushed_at"))

    def _pull_request(self, payload: dict[str, Any], repo_id: int, number: int, sha: str, t: datetime, i: int) -> None:
        pr = payload["pull_request"]
        payload["number"] = number
        pr.update(number=number, id=repo_id * 1000 + number, title=f"Change {number} of repo {repo_id - REPO_ID_BASE}")
        pr["html_url"] = f"https://github.com/{ORG}/r/pull/{number}"
        pr["head"] = {**pr.get("head", {}), "sha": sha, "ref": f"feature-{number}"}
        base = pr.get("base", {})
        pr["base"] = {**base, "ref": "main", "repo": {**base.get("repo", {}), "id": repo_id}}
        pr["additions"], pr["deletions"] = self.rng.randrange(500), self.rng.randrange(200)
        _retime(pr, t, ("updated_at",))

    def _check_run(self, payload: dict[str, Any], repo_id: int, number: int, sha: str, t: datetime, i: int) -> None:
        run = payload["check_run"]
        run.update(id=10_000_000_000 + i, name=self.rng.choice(CHECK_NAMES), head_sha=sha)
        _retime(run, t, ("started_at", "completed_at"))
        run["pull_requests"] = [_pr_ref(number, sha, repo_id, run.get("pull_requests"))]
        if isinstance(run.get("check_suite"), dict):
            run["check_suite"]["head_sha"] = sha

    def _check_suite(self, payload: dict[str, Any], repo_id: int, number: int, sha: str, t: datetime, i: int) -> None:
        suite = payload["check_suite"]
        suite.update(id=20_000_000_000 + i, head_sha=sha)
        _retime(suite, t, ("created_at", "updated_at"))
        suite["pull_requests"] = [_pr_ref(number, sha, repo_id, suite.get("pull_requests"))]

    def _workflow_run(self, payload: dict[str, Any], repo_id: int, number: int, sha: str, t: datetime, i: int) -> None:
        run = payload["workflow_run"]
        name = self.rng.choice(("CI", "Release", "CodeQL"))
        run.update(id=30_000_000_000 + i, name=name, head_sha=sha)
        _retime(run, t, ("created_at", "updated_at", "run_started_at"))
        run["pull_requests"] = [_pr_ref(number, sha, repo_id, run.get("pull_requests"))]

    def _workflow_job(self, payload: dict[str, Any], repo_id: int, number: int, sha: str, t: datetime, i: int) -> None:
        job = payload["workflow_job"]
        job.update(id=40_000_000_000 + i, name=self.rng.choice(CHECK_NAMES), head_sha=sha, workflow_name="CI")
        _retime(job, t, ("created_at", "started_at", "completed_at"))

    def _status(self, payload: dict[str, Any], repo_id: int, number: int, sha: str, t: datetime, i: int) -> None:
        payload.update(id=50_000_000_000 + i, sha=sha, context=self.rng.choice(("ci/jenkins", "coverage", "deploy")))
        _retime(payload, t, ("created_at", "updated_at"))

    def _pull_request_review(
        self, payload: dict[str, Any], repo_id: int, number: int, sha: str, t: datetime, i: int
    ) -> None:
        review, pr = payload["review"], payload["pull_request"]
        review.update(id=60_000_000_000 + i, commit_id=sha)
        review["user"] = {**review.get("user", {}), "login": self.rng.choice(REVIEWERS)}
        _retime(review, t, ("submitted_at",))
        pr.update(number=number, id=repo_id * 1000 + number)
        pr["head"] = {**pr.get("head", {}), "sha": sha}
        base = pr.get("base", {})
        pr["base"] = {**base, "repo": {**base.get("repo", {}), "id": repo_id}}

    def _push(self, payload: dict[str, Any], repo_id: int, number: int, sha: str, t: datetime, i: int) -> None:
        payload.update(ref=f"refs/heads/feature-{number}", after=sha)


def bodies(generator: Generator, start: int, count: int) -> Iterator[tuple[str, bytes]]:
    """(event, compact JSON body) of deliveries start .. start+count-1, as GitHub sends them."""
    for index in range(start, start + count):
        event, payload = generator.delivery(index)
        yield event, json.dumps(payload, separators=(",", ":")).encode()


def write_requests(path: Path, deliveries: Iterator[tuple[str, bytes]], secret: bytes) -> tuple[int, int]:
    """Write signed records for wrk's Lua script; return (count, total body bytes)."""
    count = size = 0
    with path.open("wb") as out:
        for event, body in deliveries:
            out.write(f"{event} {sign(body, secret)} {len(body)}\n".encode() + body)
            count += 1
            size += len(body)
    return count, size
