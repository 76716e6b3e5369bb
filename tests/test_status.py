"""`flowlens-ingest status`, run as on-call would: on a server database and on the embedded default,
healthy (exit 0) and in each kind of trouble (exit 1), within its deadline when the database is down or hangs.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from bench.proxy import FreezingProxy
from flowlens_ingest.cli import status as status_module
from flowlens_ingest.config import Settings
from flowlens_ingest.spool.folder import SUFFIX, UNUSABLE_SUFFIX
from flowlens_ingest.store.hooks import MAX_SHOWN, checked_through
from flowlens_ingest.store.schema import webhook_deliveries, webhook_hooks

from .databases import create_scratch_database, drop_database
from .helpers import database_of, free_port, load_payload, loopback_http
from .serving import Service, running

PING = load_payload("ping/payload.json")


def status(data_dir: Path, *args: str, database_url: str | None = None) -> subprocess.CompletedProcess:
    """Run `flowlens-ingest status ARGS` with only DATABASE_URL and FLOWLENS_DATA_DIR of FlowLens's variables."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWLENS_", "DATABASE_URL", "GITHUB_"))}
    environment["FLOWLENS_DATA_DIR"] = str(data_dir)
    if database_url:
        environment["DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "flowlens_ingest.cli", "status", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def report(data_dir: Path, database_url: str | None = None) -> tuple[int, dict]:
    """`status --json`: its exit code and its object."""
    done = status(data_dir, "--json", database_url=database_url)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def spool_file(spool: Path, age_s: float, suffix: str = SUFFIX) -> Path:
    """A spooled delivery that arrived `age_s` ago, as the service writes one."""
    spool.mkdir(parents=True, exist_ok=True)
    header = json.dumps(
        {"delivery_id": str(uuid.uuid4()), "hook_id": 1, "event": "ping", "content_type": "application/json"}
    )
    data = header.encode() + b"\n{}"
    arrived = time.time_ns() - int(age_s * 1e9)
    path = spool / f"{arrived:020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{len(data)}{suffix}"
    path.write_bytes(data)
    return path


def journal_failed(db: sa.Engine) -> None:
    """A delivery journaled as failed, waiting for a replay."""
    with db.begin() as conn:
        conn.execute(
            sa.insert(webhook_deliveries).values(
                delivery_id=str(uuid.uuid4()), hook_id=1, event="pull_request", payload_sha256="x", outcome="failed"
            )
        )


def test_a_healthy_service_exits_0_and_says_nothing_needs_action(db, database_url, tmp_path):
    with db.begin() as conn:
        conn.execute(
            sa.insert(webhook_deliveries).values(
                delivery_id="ok-1", hook_id=1, event="ping", payload_sha256="x", outcome="ignored"
            )
        )
    code, found = report(tmp_path, database_url)
    assert (code, found["ok"], found["needs_action"]) == (0, True, [])
    assert found["database"]["reachable"] and not found["database"]["pending_migrations"]
    assert found["deliveries_last_hour"] == {"ignored": 1}
    assert found["failed"] == {"count": 0, "oldest": None}
    assert found["spool"]["depth"] == 0 and found["files"]["pending"] == 0
    assert found["recovery"]["hooks"] == {}
    text = status(tmp_path, database_url=database_url)
    assert text.returncode == 0 and text.stdout.splitlines()[-1] == "OK: nothing needs action"


def test_failed_deliveries_an_old_spool_and_a_set_aside_file_each_need_action(db, database_url, tmp_path):
    journal_failed(db)
    spool_file(tmp_path / "spool", age_s=600)
    spool_file(tmp_path / "spool", age_s=5, suffix=SUFFIX + UNUSABLE_SUFFIX)
    code, found = report(tmp_path, database_url)
    assert code == 1 and not found["ok"]
    actions = "\n".join(found["needs_action"])
    assert len(found["needs_action"]) == 3, actions
    assert "1 failed delivery not replayed" in actions and "replay --failed" in actions
    assert "1 delivery waiting, the oldest for 10 min" in actions
    assert "1 set aside" in actions
    assert (found["spool"]["depth"], found["spool"]["set_aside"]) == (1, 1)
    text = status(tmp_path, database_url=database_url)
    assert text.returncode == 1 and "NEEDS ACTION (3):" in text.stdout


def test_a_hook_log_unchecked_for_over_a_day_needs_action_before_github_forgets_it(db, database_url, tmp_path):
    with db.begin() as conn:
        for hook_id, path, checked in (
            (11, "repos/acme/app/hooks/11", sa.func.now() - sa.text("interval '2 days'")),
            (12, "repos/acme/api/hooks/12", sa.func.now() - sa.text("interval '5 minutes'")),
        ):
            conn.execute(
                sa.insert(webhook_hooks).values(
                    hook_id=hook_id, target_type="repository", target_id=hook_id, api_path=path, checked_through=checked
                )
            )
    code, found = report(tmp_path, database_url)
    assert code == 1 and set(found["recovery"]["hooks"]) == {"repos/acme/app/hooks/11", "repos/acme/api/hooks/12"}
    (action,) = found["needs_action"]
    assert (
        action.startswith("recovery: 1 hook log(s) not checked for over a day") and "repos/acme/app/hooks/11" in action
    )


def test_a_spool_that_just_started_filling_is_shown_but_is_no_action_yet(db, database_url, tmp_path):
    spool_file(tmp_path / "spool", age_s=10)
    code, found = report(tmp_path, database_url)
    assert (code, found["spool"]["depth"], found["needs_action"]) == (0, 1, [])


def test_an_unmigrated_database_needs_action_and_names_the_command(server_url, tmp_path):
    url = create_scratch_database(server_url, prefix="flowlens_status")
    try:
        code, found = report(tmp_path, url)
    finally:
        drop_database(url)
    assert code == 1 and found["database"]["pending_migrations"] is True
    assert found["needs_action"] == [
        "database: the database is not migrated, this release needs 0006: run `flowlens-ingest db upgrade`"
    ]


def test_a_database_that_is_down_is_said_at_once_with_exit_1(tmp_path):
    started = time.monotonic()
    port = free_port()
    code, found = report(tmp_path, f"postgresql://postgres@127.0.0.1:{port}/none")
    assert time.monotonic() - started < 10
    assert code == 1 and found["database"]["reachable"] is False
    # The cause and the next step, and no claim about deliveries when no `serve` runs here.
    assert found["needs_action"][0] == (
        f"database: the database at 127.0.0.1:{port}/none (DATABASE_URL) is unavailable (refused: Connection refused):"
        f" check that the server runs and listens there (no `serve` runs from {tmp_path})"
    )
    # What the host knows still shows.
    assert found["spool"]["enabled"] is True and "failed" not in found


@pytest.mark.slow
def test_a_hung_database_is_said_within_the_deadline_with_exit_1(db, database_url, tmp_path):
    proxy, url = FreezingProxy.to(database_url)
    try:
        proxy.freeze()
        started = time.monotonic()
        done = status(tmp_path, "--deadline", "3", database_url=url)
        took = time.monotonic() - started
    finally:
        proxy.close()
    assert done.returncode == 1, done.stderr
    # The deadline, plus the interpreter's start.
    assert took < 3 + 3, took
    assert done.stdout.startswith("database    UNREACHABLE")
    assert "NEEDS ACTION" in done.stdout


@pytest.mark.slow
def test_status_on_the_embedded_default_database(tmp_path):
    with running(Service(None, tmp_path, workers=1)) as service:
        assert service.post(PING, "ping").json()["outcome"] == "ignored"
        code, found = report(tmp_path)
        assert code == 0, found["needs_action"]
        assert found["database"]["where"] == f"embedded in {tmp_path / 'pgdata'}"
        assert found["deliveries_last_hour"] == {"ignored": 1}

        spool_file(tmp_path / "spool", age_s=5, suffix=SUFFIX + UNUSABLE_SUFFIX)
        code, found = report(tmp_path)
        assert code == 1 and found["needs_action"][0].startswith("spool: 1 set aside")
        assert service.stop() == 0


def test_no_database_at_all_needs_action(tmp_path):
    code, found = report(tmp_path / "nothing-here")
    assert code == 1 and found["needs_action"][0].startswith("database: no database: DATABASE_URL is not set and ")
    assert "run `flowlens-ingest serve` first (it makes one there)" in found["needs_action"][0]


def test_status_shows_the_hooks_recovery_read_first_and_a_bounded_number(db):
    # Thousands of hooks a replayed delivery's invented headers recorded: status reads at most
    # MAX_SHOWN, those recovery has read first.
    with db.begin() as conn:
        conn.execute(
            sa.insert(webhook_hooks),
            [
                {
                    "hook_id": n,
                    "target_type": "repository",
                    "target_id": 1,
                    "api_path": f"repos/octo/many/hooks/{n}",
                    "checked_through": datetime.now(UTC) if n > MAX_SHOWN else None,
                }
                for n in range(1, MAX_SHOWN + 6)
            ],
        )
    shown = checked_through(database_of(db))
    assert len(shown) == MAX_SHOWN
    assert all(checked is not None for _, checked in shown[:5]) and shown[5][1] is None


def test_a_metrics_url_that_answers_something_else_is_passed_over(tmp_path):
    # FLOWLENS_URL points at something that answers 200, but not with Prometheus text.
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html><body>not metrics</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with loopback_http(Handler) as url:
        report = status_module.Report()
        status_module._rate_limit_part(Settings(data_dir=tmp_path, send_url=url), report)
    assert report.parts["github_rate_limit"]["remaining"] is None and report.actions == []


def test_status_says_a_spool_it_cannot_read_and_gives_up_on_a_metrics_page_at_its_deadline(tmp_path):
    # The spool folder cannot be listed (here a symlink loop; in production another user's folder),
    # and FLOWLENS_URL answers its headers a byte at a time: both said, within the deadline.
    loop = tmp_path / "spool"
    os.symlink(tmp_path / "spool-b", loop)
    os.symlink(loop, tmp_path / "spool-b")
    stop = threading.Event()

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with contextlib.suppress(OSError):
                for byte in b"HTTP/1.1 200 OK\r\n":
                    if stop.wait(0.5):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()

        def log_message(self, format: str, *args: object) -> None:
            pass

    with loopback_http(Trickle) as url:
        try:
            settings = Settings(
                data_dir=tmp_path,
                spool_dir=loop,
                database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere",
                send_url=url,
            )
            started = time.monotonic()
            report = status_module.gather(settings, deadline_s=3.0)
            took = time.monotonic() - started
        finally:
            stop.set()  # the handler's wait ends: the server stops at once
    assert took < 10
    assert "error" in report.parts["spool"] and any(a.startswith("spool:") for a in report.actions)
    assert report.parts["github_rate_limit"]["error"] == "no answer within 3 s"
    assert "github rate limit: no answer within 3 s" in report.actions  # not "OK: nothing needs action"
