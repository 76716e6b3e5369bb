"""GitHub's limits as a wall, one recoverer at a time, bounded runs: against the fake GitHub and a real PostgreSQL.

The fake counts requests per credential (`token`, `installation:<id>`, `app`) and answers a
credential it told to wait with the limit again, counting those: "continuing to make requests while
you are rate limited may result in the banning of your integration". Each test asserts that count
is 0, for `recover` (redeliver and `--fetch`), the scheduled pass, `backfill` and the files worker,
across processes (a second client learning the wait from the database).
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bench.proxy import FreezingProxy
from flowlens_ingest.cli.main import main
from flowlens_ingest.config import Settings
from flowlens_ingest.github.backfill import Backfiller, BackfillStopped, Target
from flowlens_ingest.github.budget import Budgets, installation_key
from flowlens_ingest.github.client import GitHubClient
from flowlens_ingest.github.enrich import Enricher, client_for
from flowlens_ingest.github.errors import RateLimited, Transient, WaitReason
from flowlens_ingest.github.lease import Lease
from flowlens_ingest.github.recover import Bounds, Hook, Recoverer, hooks_to_read
from flowlens_ingest.github.recover_pass import DUE, RecoveryPass
from flowlens_ingest.github.waits import DatabaseWaits
from flowlens_ingest.metrics import instruments
from flowlens_ingest.store.database import Database
from flowlens_ingest.store.schema import files_jobs, github_waits, leases, webhook_deliveries, webhook_hooks

from .databases import create_scratch_database, drop_database
from .fake_github import FakeGitHub, app_private_key_pem, make_files, serve_fake_github
from .helpers import SECRET, cli_environment, database_of, rows, wait_for
from .serving import Webhook
from .stories import START, apply, pull_request, repository, sha_for

REPO = repository(9_200_003, "octo/walls")
HOOK_IDS = itertools.count(6161)


def opened(number: int) -> dict[str, Any]:
    return pull_request("opened", REPO, number, sha_for("walls", number), START + timedelta(seconds=number))


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    with serve_fake_github() as fake:
        yield fake


@pytest.fixture
def hook(github: FakeGitHub, webhook: Webhook) -> tuple[str, int]:
    hook_id = next(HOOK_IDS)
    path = f"repos/octo/walls/hooks/{hook_id}"
    github.hook_logs.add_hook(path, hook_id, webhook.url, SECRET, target_type="repository", target_id=REPO["id"])
    return path, hook_id


@pytest.fixture
def env(db: Engine, github: FakeGitHub, hook: tuple[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment of `flowlens-ingest recover`: the database, the fake, its token, the hook."""
    monkeypatch.setenv("DATABASE_URL", str(db.url.render_as_string(hide_password=False)))
    monkeypatch.setenv("GITHUB_API_URL", github.url)
    monkeypatch.setenv("GITHUB_TOKEN", github.token or "")
    monkeypatch.setenv("GITHUB_WEBHOOKS", hook[0])
    for name in ("GITHUB_APP_ID", "GITHUB_APP_PRIVATE_KEY", "GITHUB_APP_PRIVATE_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)


def journaled(db: Engine, hook_id: int) -> set[str]:
    return {r["delivery_id"] for r in rows(db, webhook_deliveries, "delivery_id", "hook_id") if r["hook_id"] == hook_id}


def missed(github: FakeGitHub, path: str, numbers: range) -> list[str]:
    """Deliveries GitHub logged as failed while nobody listened, oldest first."""
    return [github.hook_logs.deliver(path, "pull_request", opened(n)) for n in numbers]


def settings_for(github: FakeGitHub, path: str | None = None, **extra: Any) -> Settings:
    webhooks = (path,) if path else ()
    return Settings(github_api_url=github.url, github_token=github.token, github_webhooks=webhooks, **extra)


def recoverer(db: Engine, github: FakeGitHub, settings: Settings, **options: Any) -> Recoverer:
    client = client_for(settings, database_of(db))
    options.setdefault("pace_s", 0.01)
    options.setdefault("settle_s", 30)
    return Recoverer(settings, database_of(db), client, **options)


def recovery_pass(db: Engine, settings: Settings, **options: Any) -> RecoveryPass:
    """The scheduled pass as a worker runs it, on this database and the fake's credential."""
    return RecoveryPass(settings, database_of(db), client_for(settings, database_of(db)), instruments(), **options)


def recover(db: Engine, github: FakeGitHub, settings: Settings, mode: Any = "redeliver", **options: Any) -> Any:
    hooks, _ = hooks_to_read(settings, database_of(db))
    since = datetime.now(UTC) - timedelta(hours=72)
    report = recoverer(db, github, settings, **options).run(lambda _hook: since, mode, hooks)
    github.hook_logs.wait_redeliveries()
    return report


# -- the wall -------------------------------------------------------------------------------------


def test_a_long_rate_limit_on_a_redelivery_stops_that_credential_and_names_the_rest(
    db, github, webhook, hook, env, capsys
):
    path, hook_id = hook
    guids = missed(github, path, range(1, 5))
    webhook.start()
    # The log's page goes through; the first redelivery is answered 403 + retry-after: 600.
    github.budgets.limit_next("token", retry_after=600, after=1)

    assert main(["recover", "--since", "1h"]) == 1

    out, err = capsys.readouterr()
    assert github.budgets.requests("token") == 2  # the page, the one POST: nothing after GitHub said wait
    assert github.budgets.requests_while_limited("token") == 0
    held = sorted(line for line in err.splitlines() if "held back:" in line)
    assert len(held) == 4
    for guid in guids:
        (line,) = [h for h in held if guid in h]
        assert f"(hook {hook_id}, pull_request): GitHub secondary rate limit for token:" in line
    assert github.token not in err  # the credential is named by a hash prefix, never itself
    assert "run recover again after" in err
    assert out.splitlines()[-1].endswith("4 missing (0 redelivered, 0 not, 4 held back for the next run)")
    assert journaled(db, hook_id) == set()


def test_the_wall_is_per_credential_the_app_hook_goes_on_while_the_token_waits(db, github, webhook, hook):
    path, hook_id = hook
    github.hook_logs.add_hook("app/hook", 778, webhook.url, SECRET, target_type="integration", target_id=github.app_id)
    from_app = [github.hook_logs.deliver("app/hook", "pull_request", opened(n)) for n in (10, 11)]
    from_token = missed(github, path, range(1, 4))
    webhook.start()
    github.budgets.limit_next("token", retry_after=600, after=1)
    settings = settings_for(
        github, path, github_app_id=str(github.app_id), github_app_private_key=app_private_key_pem()
    )

    report = recover(db, github, settings)

    assert sorted(m.guid for m in report.recovered) == sorted(from_app)
    assert sorted(m.guid for m, _ in report.held) == sorted(from_token)
    assert github.budgets.requests_while_limited("token") == 0 and github.budgets.requests("token") == 2
    assert report.retry_at is not None and report.retry_at > time.time() + 500
    assert not report.complete
    assert journaled(db, 778) == set(from_app) and journaled(db, hook_id) == set()


def test_fetch_stops_at_the_wall_too(db, github, hook):
    path, hook_id = hook
    guids = missed(github, path, range(1, 5))
    # The log's page and one delivery's detail go through; the second detail is refused for 600 s.
    github.budgets.limit_next("token", retry_after=600, after=2)

    report = recover(db, github, settings_for(github, path), "fetch")

    (fetched,) = [m.guid for m in report.recovered]
    assert sorted(m.guid for m, _ in report.held) == sorted(set(guids) - {fetched})
    assert github.budgets.requests("token") == 3 and github.budgets.requests_while_limited("token") == 0
    assert journaled(db, hook_id) == {fetched}


def test_another_process_learns_the_wait_from_the_database_backfill_and_the_files_worker_send_nothing(db, github):
    settings = settings_for(github, enrich_rate_reserve=0, enrich_poll_s=0.05)
    # One process (an operator's recover) is told to wait 600 s.
    first = client_for(settings, database_of(db))
    github.budgets.limit_next("token", retry_after=600)
    with pytest.raises(Exception, match="rate limit"):
        first.request_json("GET", "repos/octo/walls")
    sent = github.budgets.requests("token")

    # Backfill in another process: it waits for the wall (here: told to stop), and names where.
    said: list[str] = []
    stop = threading.Event()
    filler = Backfiller(
        settings,
        database_of(db),
        client_for(settings, database_of(db)),
        say=lambda line: (said.append(line), stop.set()),
        stop=stop,
    )
    with pytest.raises(BackfillStopped):
        filler.repository(Target("octo/walls"), "open", None)
    assert "secondary rate limit (token:" in said[0]
    assert re.search(r"waiting (59\d|600) s", said[0])

    # The files worker in serve's process: its job is rescheduled to the wall's end, without a request.
    github.set_files("octo/walls", 1, make_files(2))
    apply(db, "pull_request", opened(1))
    worker = Enricher(settings, database_of(db), client_for(settings, database_of(db)), instruments())
    assert worker.run_once()
    (job,) = rows(db, files_jobs, "state", "attempts", "run_after")
    assert (job["state"], job["attempts"]) == ("pending", 0)
    assert job["run_after"] > datetime.now(UTC) + timedelta(seconds=500)

    assert github.budgets.requests("token") == sent
    assert github.budgets.requests_while_limited("token") == 0


def test_a_host_whose_clock_runs_ahead_still_honours_a_wait_another_host_was_told(db, github):
    # One VM is told to wait 60 s.
    github.budgets.limit_next("token", retry_after=60)
    with pytest.raises(RateLimited):
        client_for(settings_for(github), database_of(db)).request_json("GET", "repos/octo/walls")
    sent = github.budgets.requests("token")

    # Another VM, its clock 75 s ahead: by that clock alone the wait ended 15 s ago. The shared
    # wait is timed on the database's clock, so this one still has its minute to wait.
    def ahead() -> float:
        return time.time() + 75

    with GitHubClient(
        api_url=github.url, token=github.token, clock=ahead, waits=DatabaseWaits(database_of(db))
    ) as other:
        wait = other.wait_of()
        assert wait is not None and 50 < wait.until - ahead() <= 60
        with pytest.raises(RateLimited) as caught:
            other.request_json("GET", "repos/octo/walls")
        assert caught.value.sent is False
    assert github.budgets.requests("token") == sent
    assert github.budgets.requests_while_limited("token") == 0


@contextlib.contextmanager
def client_with_unreadable_waits(github: FakeGitHub) -> Iterator[GitHubClient]:
    """A client whose shared waits live in a database that refuses connections (a port bound, never listened on)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        unreachable = Database(Settings(), f"postgresql://postgres@127.0.0.1:{closed.getsockname()[1]}/postgres")
        try:
            with GitHubClient(api_url=github.url, token=github.token, waits=DatabaseWaits(unreachable)) as client:
                yield client
        finally:
            unreachable.dispose()


def test_a_process_that_cannot_read_the_shared_waits_sends_nothing(github):
    # The database holding the waits refuses connections: another
    # process may have been told to wait, so this one does not ask GitHub blind.
    with (
        client_with_unreadable_waits(github) as client,
        pytest.raises(Transient) as caught,
    ):
        client.request_json("GET", "repos/octo/walls")
    assert caught.value.reason == "waits_unreadable"
    assert github.budgets.requests("token") == 0


@pytest.fixture
def refusing_waits(server_url: str) -> Iterator[DatabaseWaits]:
    """Shared waits in a database that answers but refuses them: here it has no `github_waits` (42P01),
    as a read-only standby after a failover (25006) or a revoked grant (42501) refuse in production."""
    url = create_scratch_database(server_url)
    database = Database(Settings(), url)
    try:
        yield DatabaseWaits(database)
    finally:
        database.dispose()
        drop_database(url)


def test_waits_a_database_refuses_are_not_sent_past_and_not_lost(github, refusing_waits):
    # Reading them: nothing sent blind, and no database error in the caller's face.
    with GitHubClient(api_url=github.url, token=github.token, waits=refusing_waits) as client:
        with pytest.raises(Transient) as caught:
            client.request_json("GET", "repos/octo/walls")
        assert caught.value.reason == "waits_unreadable"
    assert github.budgets.requests("token") == 0
    # Writing one GitHub asked for: kept here, and written again before the next request.
    key = "token:abcdef012345"
    attempts: list[bool] = []

    class Counting:
        def wait_of(self, key: str) -> tuple[float, WaitReason] | None:
            return None

        def record(self, key: str, seconds: float, reason: WaitReason) -> bool:
            attempts.append(refusing_waits.record(key, seconds, reason))
            return attempts[-1]

    budgets = Budgets(time.time, Counting())
    budgets.hold(key, time.time() + 600, "secondary")
    wait = budgets.wait_of(key)
    assert wait is not None and wait.until > time.time() + 500
    assert attempts == [False, False]


def test_a_wait_the_database_could_not_take_is_shared_before_the_next_request(db, database_url, github):
    # GitHub limits a request while the database is frozen: the wait cannot be shared then. Once the
    # database answers again, it is shared before anything else is sent with that credential, so
    # another process (or this one, restarted) learns it.
    proxy, through = FreezingProxy.to(database_url)
    waits_db = Database(Settings(statement_timeout_ms=300), through)
    answer = threading.Event()
    asked: list[int] = []

    def held_then_limited() -> Iterator[bytes]:
        asked.append(1)
        answer.wait(30)
        yield b'{"message": "You have exceeded a secondary rate limit."}'

    github.stream_files("octo/walls", 7, held_then_limited, status=429, headers={"retry-after": "600"})
    try:
        with GitHubClient(api_url=github.url, token=github.token, waits=DatabaseWaits(waits_db)) as client:
            told: list[BaseException] = []

            def fetch() -> None:
                try:
                    client.list_files("octo/walls", 7, installation_id=None)
                except RateLimited as exc:
                    told.append(exc)

            fetching = threading.Thread(target=fetch)
            fetching.start()
            wait_for(lambda: asked, "the request to reach GitHub")
            proxy.freeze()
            answer.set()
            fetching.join(30)
            assert len(told) == 1 and rows(db, github_waits) == []  # told; not shared: the database did not answer
            proxy.heal()
            wait_for(lambda: not waits_db.hung, "the waits' database to answer again")
            with pytest.raises(RateLimited) as caught:
                client.request_json("GET", "repos/octo/walls")
            assert caught.value.sent is False
        (shared,) = rows(db, github_waits, "credential", "reason")
        assert shared == {"credential": client.credential_key(), "reason": "secondary"}
        assert github.budgets.requests("token") == 1
    finally:
        waits_db.dispose()
        proxy.close()


def test_a_longer_wait_told_meanwhile_is_not_shortened_by_a_shared_one(db):
    # A thread reads the shared wait another process recorded (30 s) while another thread of this
    # process is told to wait an hour: the hour stands.
    key = "token:abcdef012345"
    shared = DatabaseWaits(database_of(db))
    shared.record(key, 30, "secondary")

    class Meanwhile:
        def wait_of(self, key: str) -> tuple[float, WaitReason] | None:
            found = shared.wait_of(key)
            budgets.hold(key, time.time() + 3600, "secondary")  # the other thread, between read and write
            return found

        def record(self, key: str, seconds: float, reason: WaitReason) -> bool:
            return shared.record(key, seconds, reason)

    budgets = Budgets(time.time, Meanwhile())
    wait = budgets.wait_of(key)
    assert wait is not None and wait.until > time.time() + 3000
    assert budgets.own_wait(key) == wait


def test_a_files_job_not_sent_for_unreadable_waits_keeps_its_attempts(db, github):
    # The queue answers, the shared waits do not (their store refuses connections): the job is put
    # back for later without a request and without spending one of its attempts.
    settings = settings_for(github)
    github.set_files("octo/walls", 1, make_files(2))
    apply(db, "pull_request", opened(1))
    with client_with_unreadable_waits(github) as client:
        assert Enricher(settings, database_of(db), client, instruments()).run_once()
    (job,) = rows(db, files_jobs, "state", "attempts", "run_after", "last_error")
    assert (job["state"], job["attempts"]) == ("pending", 0)
    assert job["run_after"] > datetime.now(UTC) + timedelta(seconds=30)
    assert "not sent" in job["last_error"]
    assert github.budgets.requests("token") == 0


def test_a_files_job_taken_by_another_worker_mid_list_asks_for_no_further_page(db, github):
    # A list of three pages. While its first page is in flight, the job's lease passes to another
    # worker (this one was too slow): the rest of the list is not asked for with the same credential.
    settings = settings_for(github)
    github.set_files("octo/walls", 1, make_files(250))
    apply(db, "pull_request", opened(1))
    arrived, answer = github.hold_next("files")
    worker = Enricher(settings, database_of(db), client_for(settings, database_of(db)), instruments())
    working = threading.Thread(target=worker.run_once)
    working.start()
    assert arrived.wait(30), "the first page was never asked for"
    with db.begin() as conn:
        conn.execute(sa.update(files_jobs).values(lease_token=sa.func.gen_random_uuid()))
    answer.set()
    working.join(30)
    assert len(github.calls("GET", contains="/files")) == 1
    (job,) = rows(db, files_jobs, "state", "attempts")
    assert job == {"state": "pending", "attempts": 1}  # the other worker's now, untouched by this one


def test_a_wait_another_process_is_told_while_a_token_is_minted_stops_the_request(db, github):
    # The files worker has checked the walls and is minting an installation token (GitHub holds
    # the mint) when another process is told to wait on that installation: the request the token
    # was minted for is not sent.
    github.set_files("octo/walls", 7, make_files(2))
    arrived, answer = github.hold_next("access_tokens")
    outcome: list[BaseException] = []
    with GitHubClient(
        api_url=github.url,
        app_id=github.app_id,
        private_key=github.app_private_key_pem,
        waits=DatabaseWaits(database_of(db)),
    ) as client:

        def fetch() -> None:
            try:
                client.list_files("octo/walls", 7, installation_id=42)
            except RateLimited as exc:
                outcome.append(exc)

        fetching = threading.Thread(target=fetch)
        fetching.start()
        assert arrived.wait(30), "the token mint never reached GitHub"
        DatabaseWaits(database_of(db)).record(installation_key(42), 600, "secondary")
        answer.set()
        fetching.join(30)
    (limited,) = outcome
    assert isinstance(limited, RateLimited) and limited.sent is False
    assert github.calls("GET", contains="/files") == []
    assert github.budgets.requests_while_limited("installation:42") == 0


def test_the_backfill_command_waits_out_a_wall_another_process_was_told_without_a_request(db, github):
    # The files worker (another process) is told to wait 600 s.
    settings = settings_for(github)
    github.budgets.limit_next("token", retry_after=600)
    with pytest.raises(Exception, match="rate limit"):
        client_for(settings, database_of(db)).request_json("GET", "repos/octo/walls")
    sent = github.budgets.requests("token")

    # An operator's `flowlens-ingest backfill`, as run from a shell: it reads the wall from the
    # database, says it waits, and Ctrl-C stops it there.
    environment = cli_environment(
        DATABASE_URL=db.url.render_as_string(hide_password=False),
        GITHUB_API_URL=github.url,
        GITHUB_TOKEN=github.token or "",
    )
    with subprocess.Popen(
        [sys.executable, "-m", "flowlens_ingest.cli", "backfill", "octo/walls"],
        env=environment,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    ) as command:
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in command.stderr or ()], daemon=True)
        reader.start()
        try:
            said = ""
            ends = time.monotonic() + 60
            while "waiting" not in said:
                try:
                    said = lines.get(timeout=max(0.1, ends - time.monotonic()))
                except queue.Empty:
                    pytest.fail("backfill never said it waits for the wall")
            command.send_signal(signal.SIGINT)
            assert command.wait(timeout=30) == 1
        finally:
            if command.poll() is None:
                command.kill()
        reader.join(10)
    # What is left of the 600 s (a slow start of the command leaves less).
    assert re.search(r"secondary rate limit \(token:.*waiting (5\d\d|600) s", said)
    assert github.budgets.requests("token") == sent
    assert github.budgets.requests_while_limited("token") == 0


def test_the_scheduled_pass_is_not_due_again_before_githubs_wait_ends(db, github, webhook, hook):
    path, _ = hook
    missed(github, path, range(1, 3))
    webhook.start()
    github.budgets.limit_next("token", retry_after=900, after=1)
    settings = settings_for(github, path, recover_every_s=60)
    passes = recovery_pass(db, settings, pace_s=0.01, settle_s=30)

    report = passes.run_once()

    assert report is not None and len(report.held) == 2 and not report.complete
    due = [r["leased_until"] for r in rows(db, leases, "name", "leased_until") if r["name"] == DUE]
    assert due and due[0] > datetime.now(UTC) + timedelta(seconds=800)  # not the 60 s interval
    assert passes.run_once() is None  # not due: no request
    assert github.budgets.requests("token") == 2 and github.budgets.requests_while_limited("token") == 0


# -- one recoverer at a time ------------------------------------------------------------------------


def test_recover_while_the_pass_holds_the_lease_says_who_and_sends_nothing(db, github, hook, env, capsys):
    path, _ = hook
    missed(github, path, range(1, 3))
    scheduled = Lease(database_of(db), "recovery pass", 600)
    assert scheduled.take()

    assert main(["recover", "--wait", "0s"]) == 1

    err = capsys.readouterr().err
    assert "recovery is running elsewhere" in err and "(recovery pass) since " in err
    assert github.calls("POST") == [] and github.budgets.requests("token") == 0
    scheduled.release()


def test_two_recovers_at_once_redeliver_each_guid_once(db, github, webhook, hook, env):
    path, hook_id = hook
    guids = missed(github, path, range(1, 7))
    webhook.start()
    codes: list[int] = []

    def command() -> None:
        codes.append(main(["recover", "--since", "1h", "--wait", "120s"]))

    threads = [threading.Thread(target=command) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    github.hook_logs.wait_redeliveries()

    posted = [call.path.split("/deliveries/")[1] for call in github.calls("POST", "/attempts")]
    assert len(posted) == len(set(posted)) == 6  # the second waited for the lease, then found nothing missing
    assert sorted(codes) == [0, 0]
    assert journaled(db, hook_id) == set(guids)


def test_a_pass_that_is_not_due_leaves_the_lease_alone_and_a_running_pass_holds_off_the_command(db, github, hook):
    path, _ = hook
    settings = settings_for(github, path, recover_every_s=600)
    passes = recovery_pass(db, settings)
    assert passes.run_once() is not None
    # The pass released its lease: a command may run now, though the next pass is not due.
    command = Lease(database_of(db), "recover command", 600)
    assert command.take()
    assert passes.run_once() is None
    command.release()


# -- bounded, nothing skipped in silence -----------------------------------------------------------


def test_a_log_longer_than_a_pass_handles_is_finished_by_the_next_pass(db, github, webhook, hook):
    path, hook_id = hook
    guids = missed(github, path, range(1, 6))
    webhook.start()
    settings = settings_for(github, path, recover_every_s=600)

    def one_pass() -> Any:
        with database_of(db).engine.begin() as conn:
            conn.execute(sa.delete(leases))  # the next pass is due
        passes = recovery_pass(
            db,
            settings,
            pace_s=0.01,
            settle_s=30,
            bounds=Bounds(recoveries=2),
        )
        report = passes.run_once()
        github.hook_logs.wait_redeliveries()
        return report

    first = one_pass()
    assert (len(first.recovered), len(first.held), first.complete) == (2, 3, False)
    (checked,) = [r["checked_through"] for r in rows(db, webhook_hooks, "hook_id", "checked_through")]
    assert checked <= min(m.delivered_at for m, _ in first.held)  # not past the deliveries left

    second = one_pass()
    third = one_pass()
    passes = [first, second, third]
    brought = [m.guid for report in passes for m in report.recovered]
    assert sorted(brought) == sorted(guids) and third.complete
    posted = [call.path for call in github.calls("POST", "/attempts")]
    assert len(posted) == len(set(posted)) == 5
    assert journaled(db, hook_id) == set(guids)


def test_malformed_log_entries_are_skipped_and_counted_never_fatal(db, github, webhook, hook):
    path, hook_id = hook
    guids = missed(github, path, range(1, 3))
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    github.hook_logs.hooks[path].odd = [
        {"id": 1, "guid": "naive-time", "delivered_at": now, "event": "push"},  # no UTC offset
        {"id": True, "guid": "bool-id", "delivered_at": now + "Z", "event": "push"},
        {"id": 1e40, "guid": "float-id", "delivered_at": now + "Z", "event": "push"},
        {"id": 5, "guid": 42, "delivered_at": now + "Z", "event": "push"},
        "not an object",
    ]
    webhook.start()

    report = recover(db, github, settings_for(github, path))

    assert report.malformed == 5
    assert sorted(m.guid for m in report.recovered) == sorted(guids)
    assert "5 malformed log entries skipped" in report.summary()
    assert journaled(db, hook_id) == set(guids)


def test_an_endless_log_ends_at_the_page_bound_said_and_the_checkpoint_stays(db, github, hook):
    path, hook_id = hook
    github.hook_logs.hooks[path].endless = True
    settings = settings_for(github, path, recover_every_s=600)
    passes = recovery_pass(
        db,
        settings,
        pace_s=0.01,
        settle_s=0.5,
        bounds=Bounds(pages=5, held=10_000, recoveries=0),
    )

    report = passes.run_once()

    assert report is not None and not report.complete
    assert report.cut == [(path, "stopped after 5 pages; older deliveries are read next time")]
    assert len(github.calls("GET", "/deliveries")) == 5
    assert len(report.held) == 500 and github.calls("POST") == []
    assert rows(db, webhook_hooks, "hook_id", "checked_through") == [{"hook_id": hook_id, "checked_through": None}]
    assert "1 not read to the end" in report.summary()


def test_missing_deliveries_held_in_memory_are_bounded(db, github, hook):
    path, _ = hook
    github.hook_logs.hooks[path].endless = True

    report = recover(db, github, settings_for(github, path), "dry_run", bounds=Bounds(pages=1000, held=250))

    assert len(report.missing) == 300  # read a page at a time: stopped at the first page past 250
    assert report.cut == [(path, "300 missing deliveries held: the rest are read next time")]
    assert len(github.calls("GET", "/deliveries")) == 3


class Clock:
    """Wall-clock time shifted when told: GitHub's log and the passes, minutes apart without waiting."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def test_a_log_longer_than_a_pass_reads_is_read_on_by_the_next_passes_nothing_skipped(db, database_url, tmp_path):
    clock = Clock()
    with serve_fake_github(clock=clock) as github:
        service = Webhook(database_url, tmp_path)
        try:
            hook_id = next(HOOK_IDS)
            path = f"repos/octo/walls/hooks/{hook_id}"
            github.hook_logs.add_hook(
                path, hook_id, service.url, SECRET, target_type="repository", target_id=REPO["id"]
            )
            guids = []
            for n in range(1, 12):  # logged an hour ago, ten seconds apart, while the service was down
                clock.offset = -3600 + 10 * n
                guids.append(github.hook_logs.deliver(path, "pull_request", opened(n)))
            service.start()
            settings = settings_for(github, path, recover_every_s=600)
            # Pages of 2: a pass reads at most 6 of the log's 11 entries (and the redeliveries it adds).
            bounds = Bounds(per_page=2, pages=3)
            reports = []
            for number in range(8):
                clock.offset = 600.0 * number
                with database_of(db).engine.begin() as conn:
                    conn.execute(sa.delete(leases).where(leases.c.name == DUE))  # the next pass is due
                gets = len(github.calls("GET", "/deliveries"))
                passes = recovery_pass(
                    db,
                    settings,
                    clock=clock,
                    pace_s=0.01,
                    settle_s=30,
                    bounds=bounds,
                )
                report = passes.run_once()
                github.hook_logs.wait_redeliveries()
                assert report is not None and len(github.calls("GET", "/deliveries")) - gets <= 3
                reports.append(report)
                if number == 0:  # where it stopped is kept: the next pass goes on there
                    (first,) = rows(db, webhook_hooks, "resume_url", "checked_through")
                    assert first["resume_url"] and "cursor=" in first["resume_url"] and first["checked_through"] is None
                if report.complete:
                    break
        finally:
            service.close()

    assert reports[0].cut and not reports[0].complete  # the first pass said it did not read it all
    assert reports[-1].complete and len(reports) > 1
    posted = [call.path for call in github.calls("POST", "/attempts")]
    assert len(posted) == len(set(posted)) == 11  # each once, none skipped
    assert journaled(db, hook_id) == set(guids)
    (row,) = rows(db, webhook_hooks, "hook_id", "checked_through", "resume_url")
    assert row["resume_url"] is None and row["checked_through"] is not None


def test_the_files_worker_holds_the_installation_told_to_wait_and_fetches_for_the_others(db, github):
    settings = Settings(
        github_api_url=github.url,
        github_app_id=str(github.app_id),
        github_app_private_key=app_private_key_pem(),
        enrich_rate_reserve=0,
    )
    for number, installation in ((1, 5), (2, 6), (3, 5)):
        github.set_files("octo/walls", number, make_files(2))
        payload = opened(number)
        payload["installation"] = {"id": installation, "node_id": f"inst-{installation}"}
        apply(db, "pull_request", payload)
    github.budgets.limit_next("installation:5", retry_after=600)
    worker = Enricher(settings, database_of(db), client_for(settings, database_of(db)), instruments())

    while worker.run_once():
        pass

    states = {r["pr_number"]: r["state"] for r in rows(db, files_jobs, "pr_number", "state")}
    assert states == {1: "pending", 2: "done", 3: "pending"}
    assert github.budgets.requests("installation:5") == 1  # the one GitHub answered with the wait
    assert github.budgets.requests_while_limited("installation:5") == 0
    assert github.budgets.requests("installation:6") >= 1


def test_an_operators_recover_during_the_workers_pass_redelivers_each_guid_once(db, github, webhook, hook, env):
    path, hook_id = hook
    guids = missed(github, path, range(1, 7))
    webhook.start()
    settings = settings_for(github, path, recover_every_s=600)
    passes = recovery_pass(db, settings, pace_s=0.2, settle_s=30)
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(passes.run_once()))
    worker.start()
    # The operator runs recover while the pass works (or just before it: either waits for the other).
    code = main(["recover", "--since", "1h", "--wait", "120s"])
    worker.join(timeout=300)
    github.hook_logs.wait_redeliveries()

    posted = [call.path for call in github.calls("POST", "/attempts")]
    assert len(posted) == len(set(posted)) == 6
    assert code == 0 and not worker.is_alive()
    assert journaled(db, hook_id) == set(guids)


def test_attempts_older_than_githubs_retention_are_gone_from_the_fakes_log(db, database_url, tmp_path):
    clock = Clock()
    with serve_fake_github(clock=clock) as github:
        hook_id = next(HOOK_IDS)
        path = f"repos/octo/walls/hooks/{hook_id}"
        github.hook_logs.add_hook(path, hook_id, "http://127.0.0.1:9/", SECRET, target_type="repository", target_id=1)
        clock.offset = -4 * 86400
        github.hook_logs.deliver(path, "pull_request", opened(1))
        clock.offset = -3600
        recent = github.hook_logs.deliver(path, "pull_request", opened(2))
        clock.offset = 0
        since = datetime.now(UTC) - timedelta(days=7)
        settings = settings_for(github, path)
        hooks, _ = hooks_to_read(settings, database_of(db))
        report = recoverer(db, github, settings).run(lambda _hook: since, "dry_run", hooks)
    assert [m.guid for m in report.missing] == [recent] and report.listed == 1


# -- odd logs -------------------------------------------------------------------------------------


def test_the_missing_deliveries_held_are_bounded_per_run_not_per_hook(db, github, webhook):
    hooks = []
    for _ in range(4):
        hook_id = next(HOOK_IDS)
        path = f"repos/octo/walls/hooks/{hook_id}"
        github.hook_logs.add_hook(path, hook_id, webhook.url, SECRET, target_type="repository", target_id=REPO["id"])
        missed(github, path, range(1, 11))
        hooks.append(Hook(path, hook_id))
    since = datetime.now(UTC) - timedelta(hours=1)

    report = recoverer(db, github, settings_for(github), bounds=Bounds(held=15, per_page=5)).run(
        lambda _hook: since, "dry_run", hooks
    )

    # 40 missing in all: the run stops reading at its bound (a page past it at most), and says so.
    assert 15 <= len(report.missing) < 15 + 5
    assert report.cut and all("missing deliveries held" in why for _, why in report.cut)


def test_a_next_link_back_to_a_page_read_before_ends_the_reading(db, github, hook):
    path, _ = hook
    missed(github, path, range(1, 4))
    github.hook_logs.hooks[path].next_is_first = True
    since = datetime.now(UTC) - timedelta(hours=1)
    before = len(github.calls("GET"))

    report = recoverer(db, github, settings_for(github)).run(lambda _hook: since, "dry_run", [Hook(path, hook[1])])

    # One page, then its `next` leads back to it: read once, the log named as not read to the end.
    assert len(github.calls("GET")[before:]) == 1
    assert len(report.missing) == 3
    assert report.cut == [(path, "GitHub's next page is one read before: read anew next time")]
