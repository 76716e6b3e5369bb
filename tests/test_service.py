"""The service as deployed: the Procfile's release and web commands, graceful shutdown, the first run.

The HTTP contract end to end is in test_e2e.py; here is what an operator does to
a running service: deploy it, stop it in the middle of deliveries, start it with
no configuration at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import requests
import sqlalchemy as sa

from flowlens_ingest import migrate
from flowlens_ingest.schema import pull_requests, webhook_deliveries

from .conftest import Service, create_scratch_database, drop_database, github_headers, load_payload, rows
from .serving import ProcfileService, gunicorn_master, log_entries, run_release, running, wait_for, workers

pytestmark = pytest.mark.slow

OPENED = load_payload("pull_request/opened.payload.json")
CLOSED = load_payload("pull_request/closed.payload.json")
# How long the deliveries stay blocked after SIGTERM: longer than a worker would
# live if shutdown were not graceful (FLOWLENS_GRACEFUL_TIMEOUT=1 fails this test).
HELD_AFTER_TERM_S = 2.5
OTHER_PR = dict(OPENED, number=3, pull_request=dict(OPENED["pull_request"], number=3))


@pytest.fixture
def fresh_database(server_url: str) -> Iterator[str]:
    """An empty database, not migrated: what a first deploy finds."""
    url = create_scratch_database(server_url, prefix="flowlens_deploy")
    yield url
    drop_database(url)


def waiting_on_locks(engine: sa.engine.Engine) -> int:
    """How many of the service's statements wait for a lock right now."""
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND application_name = 'flowlens-ingest' AND datname = current_database()"
        )).scalar()


def test_procfile_release_then_web_and_a_graceful_stop_mid_delivery(fresh_database, tmp_path):
    released = run_release(fresh_database, tmp_path)
    assert released.returncode == 0, released.stdout + released.stderr
    engine = sa.create_engine(fresh_database, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            assert migrate.revisions(engine)[0] == migrate.head()
        # Running the release step again (every deploy does) changes nothing.
        assert run_release(fresh_database, tmp_path).returncode == 0

        # Plenty of lock wait: the deliveries must outwait the test, however slow the machine.
        service = ProcfileService(fresh_database, tmp_path, env={"FLOWLENS_STATEMENT_TIMEOUT_MS": "60000"})
        with running(service):
            assert requests.get(service.url + "/readyz", timeout=10).status_code == 200
            assert service.post(OPENED, "pull_request").json()["outcome"] == "applied"

            answers: dict[str, requests.Response] = {}
            with engine.connect() as locker, locker.begin():
                # Hold the repository row: the next deliveries for it wait inside their transaction.
                locker.execute(sa.text("SELECT 1 FROM repositories WHERE github_id = :g FOR UPDATE"),
                               {"g": CLOSED["repository"]["id"]})
                senders = [
                    threading.Thread(target=lambda d=d, p=p: answers.__setitem__(d, service.post(p, "pull_request",
                                                                                                  delivery=d)))
                    for d, p in (("in-flight-1", CLOSED), ("in-flight-2", OTHER_PR))
                ]
                for sender in senders:
                    sender.start()
                wait_for(lambda: waiting_on_locks(engine) == 2, "both deliveries to wait on the row lock")

                os.kill(gunicorn_master(service).pid, signal.SIGTERM)
                wait_for(lambda: any(e["msg"] == "Handling signal: term" for e in log_entries(service)),
                         "gunicorn to begin its shutdown")
                # Shutting down, with the deliveries held a while longer (gunicorn would kill
                # workers that overstayed graceful_timeout; 20 s is far off): nothing answered yet.
                time.sleep(HELD_AFTER_TERM_S)
                assert answers == {} and service.process.poll() is None
            for sender in senders:
                sender.join(60)

            assert {d: (a.status_code, a.json()["outcome"]) for d, a in answers.items()} == {
                "in-flight-1": (200, "applied"),
                "in-flight-2": (200, "applied"),
            }
            assert service.process.wait(60) == 0
        assert rows(engine, pull_requests, "pr_number", "state") == [
            {"pr_number": 2, "state": "closed"}, {"pr_number": 3, "state": "open"}
        ]
        journal = {r["delivery_id"]: r["outcome"] for r in rows(engine, webhook_deliveries, "delivery_id", "outcome")}
        assert journal["in-flight-1"] == journal["in-flight-2"] == "applied"
    finally:
        engine.dispose()


@pytest.fixture
def home() -> Iterator[Path]:
    """A data directory the embedded server's own user can reach (pytest's tmp_path is private to us)."""
    path = Path(tempfile.mkdtemp(prefix="flowlens-first-run-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def first_run(home: Path) -> Service:
    """`serve` with nothing configured: no DATABASE_URL, no secret."""
    # An empty GITHUB_WEBHOOK_SECRET is no secret (Service sets the test one otherwise).
    return Service(None, home, env={"GITHUB_WEBHOOK_SECRET": "", "GITHUB_WEBHOOK_SECRET_PREVIOUS": ""})


def postmaster(home: Path) -> psutil.Process | None:
    """The embedded server's postmaster, while it runs."""
    pid_file = home / "pgdata" / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    if not psutil.pid_exists(pid):  # also a negative pid: a single-user backend, not the server
        return None
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:  # it exited between the two looks
        return None


def test_first_run_with_no_configuration_serves_the_embedded_database_and_stops_it(home):
    with running(first_run(home)) as service:
        printed = re.search(r"webhook secret \(generated in (\S+)\): ([0-9a-f]{64})$", service.logs(), re.M)
        assert printed, service.logs()
        secret = printed[2]
        assert Path(printed[1]) == home / "webhook-secret"
        assert (home / "webhook-secret").read_text().strip() == secret
        assert oct((home / "webhook-secret").stat().st_mode & 0o777) == "0o600"

        body = json.dumps(OPENED).encode()
        answer = requests.post(service.url + "/webhook", data=body, timeout=15,
                               headers=github_headers(body, "pull_request", secret=secret, delivery="first"))
        assert (answer.status_code, answer.json()["outcome"]) == (200, "applied")
        assert requests.get(service.url + "/readyz", timeout=10).status_code == 200
        server = postmaster(home)
        assert server is not None and len(workers(service)) == 2
        assert service.stop() == 0
    # `serve` stopped the server it started.
    server.wait(30)
    assert postmaster(home) is None

    # The second run keeps the secret and the data, and does not print the secret again.
    with running(first_run(home)) as service:
        assert "webhook secret from" in service.logs() and secret not in service.logs()
        answer = requests.post(service.url + "/webhook", data=body, timeout=15,
                               headers=github_headers(body, "pull_request", secret=secret, delivery="first"))
        assert (answer.status_code, answer.json()["outcome"]) == (200, "duplicate")
        assert service.stop() == 0
    wait_for(lambda: postmaster(home) is None, "the embedded server to stop")


def test_stopped_while_starting_it_still_stops_its_embedded_server(home):
    service = first_run(home)
    try:
        # The embedded server is up; migrations or gunicorn's start are under way.
        wait_for(lambda: postmaster(home) or service.process.poll() is not None, "the embedded server to start")
        server = postmaster(home)
        assert server is not None, service.logs()
        service.process.send_signal(signal.SIGTERM)
        # 0 once gunicorn got the signal forwarded; 128 + 15 when it came before gunicorn existed.
        assert service.process.wait(60) in (0, 128 + signal.SIGTERM), service.logs()
        server.wait(30)
        assert postmaster(home) is None
        assert "Traceback" not in service.logs()
    finally:
        service.stop()
