"""The scheduled recovery pass: one worker across VMs, checkpoints, metrics, the retention warning.

Against the fake GitHub on loopback, whose hooks really deliver to the service (a real HTTP
server), and a real PostgreSQL.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.engine import Engine

from flowlens_ingest.config import Settings
from flowlens_ingest.github.client import GitHubClient
from flowlens_ingest.github.enrich import Enricher
from flowlens_ingest.github.recover_pass import RecoveryPass
from flowlens_ingest.metrics import instruments
from flowlens_ingest.store.schema import leases, webhook_deliveries, webhook_hooks

from .fake_github import FakeGitHub, app_private_key_pem, serve_fake_github
from .helpers import SECRET, database_of, rows, wait_for
from .serving import Webhook
from .stories import START, pull_request, repository, sha_for

HOOK_IDS = itertools.count(5151)
REPO = repository(9_200_002, "octo/recover-pass")


def opened(number: int) -> dict[str, Any]:
    return pull_request("opened", REPO, number, sha_for("recover-pass", number), START + timedelta(seconds=number))


def journal(db: Engine, hook_id: int) -> list[dict[str, Any]]:
    found = rows(db, webhook_deliveries, "delivery_id", "hook_id")
    return [row for row in found if row["hook_id"] == hook_id]


class Clock:
    """Wall-clock time, shifted when told: GitHub's log can hold attempts of an hour ago."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def github(clock: Clock) -> Iterator[FakeGitHub]:
    with serve_fake_github(clock=clock) as fake:
        yield fake


@pytest.fixture
def hook(github: FakeGitHub, webhook: Webhook) -> tuple[str, int]:
    hook_id = next(HOOK_IDS)
    path = f"repos/octo/recover-pass/hooks/{hook_id}"
    github.hook_logs.add_hook(path, hook_id, webhook.url, SECRET, target_type="repository", target_id=REPO["id"])
    return path, hook_id


def make_pass(db: Engine, github: FakeGitHub, path: str, **settings: object) -> RecoveryPass:
    config = Settings(
        github_api_url=github.url, github_token=github.token, github_webhooks=(path,), recover_every_s=600, **settings
    )
    client = GitHubClient(api_url=github.url, token=github.token)
    return RecoveryPass(config, database_of(db), client, instruments(), pace_s=0.01, settle_s=30)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def expire_lease(db: Engine) -> None:
    with db.begin() as conn:
        conn.execute(sa.update(leases).values(leased_until=sa.func.now() - timedelta(seconds=1)))


def test_one_worker_across_vms_recovers_and_the_next_pass_reads_only_what_is_new(db, github, webhook, hook, clock):
    path, hook_id = hook
    clock.offset = -3600  # these failed an hour ago
    missed = [github.hook_logs.deliver(path, "pull_request", opened(n)) for n in (1, 2, 3)]
    webhook.start()
    first, second = make_pass(db, github, path), make_pass(db, github, path)
    recovered_before = counter("flowlens_recovered_deliveries_total", how="redelivered")

    report = first.run_once()
    github.hook_logs.wait_redeliveries()

    assert report is not None and sorted(m.guid for m in report.recovered) == sorted(missed)
    assert second.run_once() is None  # the other VM's worker: the lease is held until the next pass is due
    assert counter("flowlens_recovered_deliveries_total", how="redelivered") - recovered_before == 3
    assert {e["delivery_id"] for e in journal(db, hook_id)} == set(missed)
    (checked,) = [r["checked_through"] for r in rows(db, webhook_hooks, "hook_id", "checked_through")]
    assert datetime.now(UTC) - timedelta(minutes=5) < checked < datetime.now(UTC)

    clock.offset = 0.0
    webhook.stop()
    late = github.hook_logs.deliver(path, "pull_request", opened(4))
    webhook.start()
    expire_lease(db)
    again = second.run_once()

    # Only the attempt since the checkpoint is read: not the hour-old ones nor their redeliveries.
    assert again is not None and again.listed == 1
    assert [m.guid for m in again.recovered] == [late]


def test_an_app_hook_row_named_only_by_headers_does_not_send_the_pass_back_to_the_start(db, github, webhook, clock):
    github.hook_logs.add_hook("app/hook", 781, webhook.url, SECRET, target_type="integration", target_id=github.app_id)
    config = Settings(
        github_api_url=github.url,
        github_app_id=str(github.app_id),
        github_app_private_key=app_private_key_pem(),
        recover_every_s=600,
    )
    client = GitHubClient(api_url=github.url, app_id=config.github_app_id, private_key=config.github_app_private_key)
    recovery = RecoveryPass(config, database_of(db), client, instruments(), pace_s=0.01, settle_s=30)
    clock.offset = -3600  # these failed an hour ago
    missed = [github.hook_logs.deliver("app/hook", "pull_request", opened(n)) for n in (1, 2)]
    clock.offset = 0.0  # the App's JWT is checked on GitHub's clock
    webhook.start()
    first = recovery.run_once()
    github.hook_logs.wait_redeliveries()
    assert first is not None and sorted(m.guid for m in first.recovered) == sorted(missed)

    # A signed body replayed with a forged hook id recorded another "App hook", never checked.
    with db.begin() as conn:
        conn.execute(
            sa.insert(webhook_hooks).values(
                hook_id=6, target_type="integration", target_id=github.app_id, api_path="app/hook"
            )
        )
    webhook.stop()
    late = github.hook_logs.deliver("app/hook", "pull_request", opened(3))
    webhook.start()
    expire_lease(db)
    again = recovery.run_once()
    # From the checkpoint of the hook GitHub named: the two redeliveries of the first pass and the late
    # one, not the hour-old attempts before it (from the start of GitHub's log: five).
    assert again is not None and again.listed == 3
    assert [m.guid for m in again.recovered] == [late]


def test_a_hook_unchecked_longer_than_githubs_retention_is_warned_about_loudly_and_counted(
    db, github, webhook, hook, caplog
):
    path, _ = hook
    webhook.start()
    github.hook_logs.deliver(path, "pull_request", opened(1))
    # The fake is not api.github.com: GitHub Enterprise Server's 7 days apply.
    eight_days_ago = datetime.now(UTC) - timedelta(days=8)
    with db.begin() as conn:
        conn.execute(sa.update(webhook_hooks).values(checked_through=eight_days_ago))
    gaps_before = counter("flowlens_recovery_gaps_total")

    with caplog.at_level(logging.ERROR, logger="flowlens_ingest.github.recover_pass"):
        report = make_pass(db, github, path).run_once()

    assert report is not None and report.complete
    assert counter("flowlens_recovery_gaps_total") - gaps_before == 1
    assert any("older than GitHub's retention" in r.getMessage() for r in caplog.records)


def test_the_files_worker_runs_the_pass_on_its_schedule(db, github, webhook, hook):
    path, hook_id = hook
    missed = github.hook_logs.deliver(path, "pull_request", opened(1))
    webhook.start()
    settings = Settings(
        github_api_url=github.url,
        github_token=github.token,
        github_webhooks=(path,),
        recover_every_s=600,
        enrich_poll_s=0.05,
    )
    worker = Enricher(settings, database_of(db), GitHubClient(api_url=github.url, token=github.token), instruments())
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: {e["delivery_id"] for e in journal(db, hook_id)} == {missed}, "the redelivered delivery")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert len(github.calls("POST", "/attempts")) == 1


def test_hooks_invented_by_replayed_headers_cost_a_bounded_number_of_requests_and_take_turns(
    db, github, webhook, clock
):
    # Thirty rows a signed body replayed with invented hook headers recorded, each older than the one
    # real hook GitHub has not been read for yet (recorded from its first delivery's headers).
    real_id = next(HOOK_IDS)
    real = f"repos/octo/recover-pass/hooks/{real_id}"
    github.hook_logs.add_hook(real, real_id, webhook.url, SECRET, target_type="repository", target_id=REPO["id"])
    invented = {f"repos/octo/recover-pass/hooks/{90_000 + n}": 90_000 + n for n in range(30)}
    with db.begin() as conn:
        for n, (path, hook_id) in enumerate([*invented.items(), (real, real_id)]):
            conn.execute(
                sa.insert(webhook_hooks).values(
                    hook_id=hook_id,
                    target_type="repository",
                    target_id=REPO["id"],
                    api_path=path,
                    updated_at=sa.func.now() - timedelta(minutes=60 - n),
                )
            )
    clock.offset = -3600  # failed an hour ago
    missed = github.hook_logs.deliver(real, "pull_request", opened(1))
    clock.offset = 0.0
    webhook.start()
    config = Settings(github_api_url=github.url, github_token=github.token, recover_every_s=600)
    client = GitHubClient(api_url=github.url, token=github.token)
    recovery = RecoveryPass(config, database_of(db), client, instruments(), pace_s=0.01, settle_s=30)

    def paths_asked() -> set[str]:
        asked = {c.path.split("/deliveries")[0].removeprefix("/") for c in github.calls("GET", contains="/hooks/")}
        github.requests.clear()
        return asked

    first = recovery.run_once()
    # The twenty least recently tried, each one request (404): not thirty-one requests, and not the real one yet.
    assert first is not None and paths_asked() == set(list(invented)[:20])
    expire_lease(db)
    second = recovery.run_once()
    github.hook_logs.wait_redeliveries()
    # The refused ones went to the back: the other ten and the real hook first, whose delivery is
    # recovered; the rest of the twenty are the longest refused.
    asked = paths_asked()
    assert second is not None and len(asked) == 20 and {*list(invented)[20:], real} <= asked
    assert [m.guid for m in second.recovered] == [missed]


def test_a_log_page_that_is_no_list_keeps_the_checkpoint_and_the_next_pass_recovers(db, github, webhook, hook, clock):
    path, hook_id = hook
    clock.offset = -3600
    missed = [github.hook_logs.deliver(path, "pull_request", opened(n)) for n in (1, 2, 3)]
    clock.offset = 0.0
    webhook.start()
    github.hook_logs.hooks[path].not_a_list = 1  # a 200 that is not the log's page

    report = make_pass(db, github, path).run_once()

    # Not the log's end: the hook is unreadable this time, and nothing is taken as compared.
    assert report is not None and not report.complete
    assert [p for p, _ in report.unreadable] == [path]
    assert [r["checked_through"] for r in rows(db, webhook_hooks, "checked_through")] == [None]
    expire_lease(db)
    again = make_pass(db, github, path).run_once()
    github.hook_logs.wait_redeliveries()
    assert again is not None and again.complete
    assert {e["delivery_id"] for e in journal(db, hook_id)} == set(missed)
