"""The local trial: what the standalone fake GitHub serves for `recover` and `backfill` (docs/recovering.md).

`python -m tests.fake_github --trial http://127.0.0.1:8000/webhook` adds, to the fake's usual
routes:

- the repository hook `repos/octo/trial/hooks/4201`, delivering to that URL, whose log holds
  three deliveries GitHub could not make while the service was down (`failed to connect`). A
  redelivery (`POST …/attempts`) really sends them, signed with the service's secret: the one
  `flowlens-ingest send` uses (GITHUB_WEBHOOK_SECRET, else FLOWLENS_DATA_DIR/webhook-secret, which
  `serve` writes on its first start, so start `serve` first);
- the repository `octo/legacy`, older than the service: three pull requests with their reviews,
  check runs and commit statuses, for `backfill`.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from flowlens_ingest.config import ConfigError, Settings

from .stories import START, check_run, pull_request, repository, review, sha_for, status

if TYPE_CHECKING:
    from .fake_github import FakeGitHub

HOOK_ID = 4201
HOOK_REPO = "octo/trial"
HOOK_PATH = f"repos/{HOOK_REPO}/hooks/{HOOK_ID}"
LEGACY_REPO = "octo/legacy"
PULLS = 3


class TrialError(Exception):
    """The trial cannot be set up (no secret to sign with)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The trial's options of `python -m tests.fake_github`."""
    parser.add_argument(
        "--trial",
        metavar="WEBHOOK_URL",
        help=f"serve the local trial (docs/recovering.md): hook {HOOK_PATH} delivering to WEBHOOK_URL with"
        f" {PULLS} deliveries it could not make, and {LEGACY_REPO} to backfill",
    )


def service_secret(env: dict[str, str] | None = None) -> str:
    """The secret the service verifies with, found the way `flowlens-ingest send` finds it."""
    try:
        settings = Settings.from_env(dict(os.environ) if env is None else env)
    except ConfigError as exc:
        raise TrialError(str(exc)) from None
    if settings.secrets:
        return settings.secrets[0].decode()
    path = settings.data_dir / "webhook-secret"
    if not path.exists():
        raise TrialError(
            f"no webhook secret: GITHUB_WEBHOOK_SECRET is not set and {path} does not exist;"
            " start `flowlens-ingest serve` first (it writes one), or set FLOWLENS_DATA_DIR to its folder"
        )
    return path.read_text().strip()


def seed(fake: FakeGitHub, webhook_url: str, secret: str) -> list[str]:
    """Set the trial up on `fake`; the lines that say what it serves."""
    hooked = repository(9_400_001, HOOK_REPO)
    fake.hook_logs.add_hook(HOOK_PATH, HOOK_ID, webhook_url, secret, target_type="repository", target_id=hooked["id"])
    missed = [
        ("pull_request", pull_request("opened", hooked, 1, sha_for(HOOK_REPO, 1), START)),
        ("pull_request", pull_request("opened", hooked, 2, sha_for(HOOK_REPO, 2), START + timedelta(minutes=1))),
        (
            "check_run",
            check_run(
                hooked, sha_for(HOOK_REPO, 1), "build", 7_400_001, "completed", START, prs=[1], conclusion="success"
            ),
        ),
    ]
    for event, payload in missed:
        fake.hook_logs.log_only(HOOK_PATH, event, payload, status_code=0)
    _legacy(fake)
    return [
        f"trial: hook {HOOK_PATH} -> {webhook_url}: {len(missed)} deliveries it could not make (failed to connect)",
        f"trial: {LEGACY_REPO}: {PULLS} pull requests with reviews, check runs and statuses to backfill",
    ]


def _legacy(fake: FakeGitHub) -> None:
    """A repository whose pull requests were opened before the service: the REST API's current state of them."""
    repo = repository(9_400_002, LEGACY_REPO)
    data = fake.repositories.add(repo)
    for number in range(1, PULLS + 1):
        sha = sha_for(LEGACY_REPO, number)
        opened = START + timedelta(hours=number)
        data.pulls[number] = pull_request("opened", repo, number, sha, opened)["pull_request"]
        conclusion = "failure" if number == 2 else "success"
        run = check_run(
            repo, sha, "build", 7_400_100 + number, "completed", opened, prs=[number], conclusion=conclusion
        )
        data.check_runs[sha] = [run["check_run"]]
        verdict = "CHANGES_REQUESTED" if number == 3 else "APPROVED"
        rest: dict[str, Any] = review("submitted", repo, number, sha, "alice", 9_400_100 + number, "x", opened)[
            "review"
        ]
        data.reviews[number] = [{**rest, "state": verdict}]
        shown = status(repo, sha, "ci/external", 9_400_200 + number, "success", opened)
        fields = ("id", "state", "context", "target_url", "description", "created_at", "updated_at")
        data.statuses[sha] = [{k: shown.get(k) for k in fields}]
