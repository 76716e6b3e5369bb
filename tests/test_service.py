"""End to end: a real `flowlens-ingest serve` (gunicorn, 2 workers) or the Procfile's commands, real HTTP.

The HTTP contract, answer by answer, over real HTTP; then what an operator does to a
running service: deploy it, stop it in the middle of deliveries, start it with no
configuration at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import psutil
import pytest
import requests
import sqlalchemy as sa

from flowlens_ingest.events.signature import sign
from flowlens_ingest.postgres import embedded
from flowlens_ingest.store import migrate
from flowlens_ingest.store.schema import pipeline_runs, pull_requests, webhook_deliveries

from .databases import create_scratch_database, drop_database
from .helpers import PREVIOUS_SECRET, SECRET, free_port, github_headers, load_payload, rows, wait_for
from .serving import (
    ProcfileService,
    Service,
    gunicorn_master,
    log_entries,
    metric,
    run_release,
    running,
    workers,
)

pytestmark = pytest.mark.slow

OPENED = load_payload("pull_request/opened.payload.json")
CLOSED = load_payload("pull_request/closed.payload.json")
# How long the deliveries stay blocked after SIGTERM: longer than a worker would
# live if shutdown were not graceful (FLOWLENS_GRACEFUL_TIMEOUT=1 fails this test).
HELD_AFTER_TERM_S = 1.5
OTHER_PR = dict(OPENED, number=3, pull_request=dict(OPENED["pull_request"], number=3))


def post_raw(service: Service, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(service.url + "/webhook", data=body, headers=headers, timeout=15)


# --- the HTTP contract ---------------------------------------------------------------------


def test_every_answer_of_the_http_contract(service, db):
    body = json.dumps(OPENED).encode()

    applied = service.post(OPENED, "pull_request", delivery="e2e-1")
    assert applied.status_code == 200
    assert applied.json() == {"delivery": "e2e-1", "event": "pull_request", "action": "opened", "outcome": "applied"}
    assert rows(db, pull_requests, "pr_number", "state", "processed") == [
        {"pr_number": 2, "state": "open", "processed": False}
    ]
    assert rows(db, pipeline_runs, "status_pr", "status_merge", "processed") == [
        {"status_pr": "opened", "status_merge": "pending", "processed": False}
    ]

    duplicate = service.post(OPENED, "pull_request", delivery="e2e-1")
    assert (duplicate.status_code, duplicate.json()["outcome"]) == (200, "duplicate")

    assert service.post(CLOSED, "pull_request").json()["outcome"] == "applied"
    stale = service.post(OPENED, "pull_request")
    assert (stale.status_code, stale.json()["outcome"]) == (200, "stale")
    assert rows(db, pull_requests, "state") == [{"state": "closed"}]

    ping = service.post(load_payload("ping/payload.json"), "ping")
    assert (ping.status_code, ping.json()["outcome"]) == (200, "ignored")

    rotated = service.post(CLOSED, "pull_request", secret=PREVIOUS_SECRET)
    assert rotated.status_code == 200

    failed = service.post(dict(OPENED, pull_request=[]), "pull_request", delivery="e2e-broken")
    assert (failed.status_code, failed.json()["outcome"]) == (202, "failed")

    form = urlencode({"payload": json.dumps(CLOSED)}).encode()
    form_answer = post_raw(
        service, form, github_headers(form, "pull_request", content_type="application/x-www-form-urlencoded")
    )
    assert (form_answer.status_code, form_answer.json()["outcome"]) == (200, "applied")

    unsigned = github_headers(body, "pull_request")
    del unsigned["X-Hub-Signature-256"]
    assert post_raw(service, body, unsigned).status_code == 401
    sha1_only = dict(unsigned, **{"X-Hub-Signature": "sha1=" + "0" * 40})
    assert post_raw(service, body, sha1_only).status_code == 401
    wrong = github_headers(body, "pull_request", secret="not the secret")
    assert post_raw(service, body, wrong).status_code == 401

    no_event = github_headers(body, "pull_request")
    del no_event["X-GitHub-Event"]
    assert post_raw(service, body, no_event).status_code == 400
    no_delivery = github_headers(body, "pull_request")
    del no_delivery["X-GitHub-Delivery"]
    assert post_raw(service, body, no_delivery).status_code == 400

    assert post_raw(service, body, github_headers(body, "pull_request", content_type="text/plain")).status_code == 415
    for bad in (b"[1]", b"{not json", b'{"a": NaN}'):
        answer = post_raw(service, bad, github_headers(bad, "pull_request"))
        assert answer.status_code == 400
        assert "Traceback" not in answer.text

    journal = {r["delivery_id"]: r["outcome"] for r in rows(db, webhook_deliveries, "delivery_id", "outcome")}
    assert journal["e2e-1"] == "applied" and journal["e2e-broken"] == "failed"
    # Refused requests (401/400/415) stored nothing: 8 deliveries were signed and well formed.
    assert len(journal) == 7

    assert requests.get(service.url + "/healthz", timeout=5).status_code == 200
    assert requests.get(service.url + "/readyz", timeout=5).json()["status"] == "ready"


def test_a_body_over_the_limit_is_refused_before_it_is_read(db, database_url, tmp_path):
    service = Service(database_url, tmp_path, env={"FLOWLENS_MAX_BODY_BYTES": "4096"})
    try:
        service.wait_ready()
        small = json.dumps(OPENED).encode()
        assert len(small) > 4096
        assert post_raw(service, small, github_headers(small, "pull_request")).status_code == 413

        # Announce 100 MB, send 1 KB, and read the answer: it must come without the rest.
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
            head = (
                "POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                "X-GitHub-Event: ping\r\nX-GitHub-Delivery: big\r\n"
                f"X-Hub-Signature-256: {sign(b'x', SECRET.encode())}\r\n"
                f"Content-Length: {100 * 1024 * 1024}\r\n\r\n"
            ).encode()
            sock.sendall(head + b"{" + b" " * 1023)
            answer = sock.recv(4096).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 413")
        assert rows(db, webhook_deliveries) == []
    finally:
        service.stop()


# --- deploy and shutdown -------------------------------------------------------------------


@pytest.fixture
def fresh_database(server_url: str) -> Iterator[str]:
    """An empty database, not migrated: what a first deploy finds."""
    url = create_scratch_database(server_url, prefix="flowlens_deploy")
    yield url
    drop_database(url)


def waiting_on_locks(engine: sa.engine.Engine) -> int:
    """How many of the service's statements wait for a lock right now."""
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND application_name = 'flowlens-ingest' AND datname = current_database()"
            )
        ).scalar()


def test_procfile_release_then_web_and_a_graceful_stop_mid_delivery(fresh_database, tmp_path):
    released = run_release(fresh_database, tmp_path)
    assert released.returncode == 0, released.stdout + released.stderr
    engine = sa.create_engine(fresh_database, poolclass=sa.pool.NullPool)
    try:
        with engine.connect():
            assert migrate.revisions(engine)[0] == migrate.head()
        # Running the release step again (every deploy does) changes nothing.
        assert run_release(fresh_database, tmp_path).returncode == 0

        # The longest lock wait allowed (7 s): the deliveries must outwait the shutdown below.
        service = ProcfileService(fresh_database, tmp_path, env={"FLOWLENS_STATEMENT_TIMEOUT_MS": "7000"})
        with running(service):
            assert requests.get(service.url + "/readyz", timeout=10).status_code == 200
            assert service.post(OPENED, "pull_request").json()["outcome"] == "applied"

            answers: dict[str, requests.Response] = {}
            with engine.connect() as locker, locker.begin():
                # Hold the repository row: the next deliveries for it wait inside their transaction.
                locker.execute(
                    sa.text("SELECT 1 FROM repositories WHERE github_id = :g FOR UPDATE"),
                    {"g": CLOSED["repository"]["id"]},
                )
                senders = [
                    threading.Thread(
                        target=lambda d=d, p=p: answers.__setitem__(d, service.post(p, "pull_request", delivery=d))
                    )
                    for d, p in (("in-flight-1", CLOSED), ("in-flight-2", OTHER_PR))
                ]
                for sender in senders:
                    sender.start()
                wait_for(lambda: waiting_on_locks(engine) == 2, "both deliveries to wait on the row lock")

                os.kill(gunicorn_master(service).pid, signal.SIGTERM)
                wait_for(
                    lambda: any(e["msg"] == "Handling signal: term" for e in log_entries(service)),
                    "gunicorn to begin its shutdown",
                )
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
            {"pr_number": 2, "state": "closed"},
            {"pr_number": 3, "state": "open"},
        ]
        journal = {r["delivery_id"]: r["outcome"] for r in rows(engine, webhook_deliveries, "delivery_id", "outcome")}
        assert journal["in-flight-1"] == journal["in-flight-2"] == "applied"
    finally:
        engine.dispose()


def test_graceful_shutdown_finishes_the_delivery_in_flight(db, database_url, tmp_path):
    # The longest lock timeout allowed (7 s): the delivery must wait for the shutdown below.
    service = Service(database_url, tmp_path, env={"FLOWLENS_STATEMENT_TIMEOUT_MS": "7000"})
    answers: list[requests.Response] = []
    try:
        service.wait_ready()
        assert service.post(OPENED, "pull_request").json()["outcome"] == "applied"
        closed = load_payload("pull_request/closed.payload.json")
        locker = db.connect()
        lock = locker.begin()
        locker.execute(
            sa.text("SELECT 1 FROM repositories WHERE github_id = :g FOR UPDATE"), {"g": closed["repository"]["id"]}
        )
        sender = threading.Thread(
            target=lambda: answers.append(service.post(closed, "pull_request", delivery="in-flight"))
        )
        sender.start()
        try:
            # The delivery is now inside its transaction, waiting for the repository row.
            waiting = sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )

            def delivery_waits() -> bool:
                with db.connect() as conn:
                    return conn.execute(waiting).scalar() > 0

            wait_for(delivery_waits, what="the delivery to wait on the lock")
            service.process.terminate()  # SIGTERM to `serve`, forwarded to gunicorn
            time.sleep(0.5)
            assert service.process.poll() is None, "gunicorn must wait for the request in flight"
        finally:
            lock.commit()
            locker.close()
        sender.join(timeout=60)
        assert answers and answers[0].status_code == 200
        assert answers[0].json()["outcome"] == "applied"
        assert service.stop() == 0
    finally:
        service.stop()
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT state FROM pull_requests")).scalar() == "closed"
        outcome = conn.execute(sa.text("SELECT outcome FROM webhook_deliveries WHERE delivery_id = 'in-flight'"))
        assert outcome.scalar() == "applied"


# --- the first run, with no configuration ---------------------------------------------------


def _serve(env: dict[str, str], data_dir: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flowlens_ingest.cli", "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=data_dir,
    )


def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("DATABASE_URL", "GITHUB_WEBHOOK_SECRET", "GITHUB_WEBHOOK_SECRET_PREVIOUS", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def test_serve_with_no_configuration_runs_on_the_embedded_database():
    # Its own folder: the embedded server runs as a dedicated user when we are root,
    # and pytest's own temporary tree is private to us.
    home = Path(tempfile.mkdtemp(prefix="flowlens-e2e-"))
    home.chmod(0o755)
    port = free_port()
    process = _serve(_clean_env(FLOWLENS_DATA_DIR=str(home / ".flowlens")), home, port)
    output = b""
    try:
        secret = None
        deadline = time.monotonic() + 90
        while secret is None and time.monotonic() < deadline and process.poll() is None:
            line = process.stdout.readline()
            output += line
            match = re.search(rb"webhook secret \(generated [^)]*\): ([0-9a-f]{64})", line)
            if match:
                secret = match[1].decode()
        assert secret, output.decode(errors="replace")
        assert (home / ".flowlens" / "webhook-secret").read_text().strip() == secret

        body = json.dumps(OPENED).encode()
        headers = github_headers(body, "pull_request", secret=secret, delivery="first-run")
        answer = None
        while time.monotonic() < deadline:
            try:
                answer = requests.post(f"http://127.0.0.1:{port}/webhook", data=body, headers=headers, timeout=10)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        assert answer is not None and answer.status_code == 200, output.decode(errors="replace")
        assert answer.json()["outcome"] == "applied"

        listed = subprocess.run(
            [sys.executable, "-m", "flowlens_ingest.cli", "deliveries"],
            env=_clean_env(FLOWLENS_DATA_DIR=str(home / ".flowlens")),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "first-run pull_request/opened applied" in listed.stdout, listed.stderr
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)
        process.stdout.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty data directory."""
    return tmp_path


def first_run(home: Path) -> Service:
    """`serve` with nothing configured: no DATABASE_URL, no secret."""
    # An empty GITHUB_WEBHOOK_SECRET is no secret (Service sets the test one otherwise).
    return Service(None, home, env={"GITHUB_WEBHOOK_SECRET": "", "GITHUB_WEBHOOK_SECRET_PREVIOUS": ""})


def postmaster(home: Path) -> psutil.Process | None:
    """The embedded server's postmaster, while it runs."""
    server = embedded.postmaster(home / "pgdata")
    if server is None:
        return None
    try:
        return psutil.Process(server.pid)
    except psutil.NoSuchProcess:  # it exited between the two looks
        return None


def test_first_run_with_no_configuration_serves_the_embedded_database_and_stops_it(home):
    # Nothing outside the data folder is opened up, not even as root (pytest's folders are 0700).
    parents = {path: path.stat().st_mode for path in home.parents}
    with running(first_run(home)) as service:
        assert {path: path.stat().st_mode for path in home.parents} == parents
        printed = re.search(r"webhook secret \(generated in (\S+)\): ([0-9a-f]{64})$", service.logs(), re.M)
        assert printed, service.logs()
        secret = printed[2]
        assert Path(printed[1]) == home / "webhook-secret"
        assert (home / "webhook-secret").read_text().strip() == secret
        assert oct((home / "webhook-secret").stat().st_mode & 0o777) == "0o600"

        body = json.dumps(OPENED).encode()
        answer = requests.post(
            service.url + "/webhook",
            data=body,
            timeout=15,
            headers=github_headers(body, "pull_request", secret=secret, delivery="first"),
        )
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
        answer = requests.post(
            service.url + "/webhook",
            data=body,
            timeout=15,
            headers=github_headers(body, "pull_request", secret=secret, delivery="first"),
        )
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


# --- a second instance, a taken port, a dead parent, a closed terminal ------------------------


def serve_once(data_dir: Path, port: int, **env: str) -> subprocess.CompletedProcess:
    """`flowlens-ingest serve` run to its end (a start that must fail)."""
    environment = _clean_env(FLOWLENS_DATA_DIR=str(data_dir), GITHUB_WEBHOOK_SECRET=SECRET, **env)
    return subprocess.run(
        [sys.executable, "-m", "flowlens_ingest.cli", "serve", "--port", str(port)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_serve_in_the_same_folder_leaves_the_first_ones_metrics(db, database_url, tmp_path):
    counted = {"event": "pull_request", "outcome": "applied"}
    with running(Service(database_url, tmp_path)) as first:
        assert first.post(OPENED, "pull_request").json()["outcome"] == "applied"
        assert metric(first, "flowlens_deliveries_total", **counted) == 1

        # The same port: refused before anything starts, in one line, and nothing emptied.
        again = serve_once(tmp_path, first.port, DATABASE_URL=database_url)
        assert again.returncode == 2
        assert again.stderr.strip() == (
            f"flowlens-ingest: port {first.port} on 127.0.0.1 is already in use (another `flowlens-ingest serve`?):"
            " stop it, or choose another --port"
        )
        assert "listening" not in again.stdout
        assert metric(first, "flowlens_deliveries_total", **counted) == 1

        # Another port: its own metrics folder, its own numbers; the first keeps its own.
        with running(Service(database_url, tmp_path)) as second:
            assert metric(second, "flowlens_deliveries_total", **counted) is None
            assert second.post(CLOSED, "pull_request").json()["outcome"] == "applied"
            assert second.post(OTHER_PR, "pull_request").json()["outcome"] == "applied"
            assert metric(second, "flowlens_deliveries_total", **counted) == 2
            assert metric(first, "flowlens_deliveries_total", **counted) == 1
            assert second.stop() == 0
        assert first.stop() == 0


def instance_record(service: Service) -> Path:
    """Where `serve` records its address while it runs."""
    return service.data_dir / "instances" / f"{service.port}.json"


def send_ping(data_dir: Path) -> subprocess.CompletedProcess:
    """`flowlens-ingest send` with no --url: to the `serve` it finds in `data_dir`."""
    environment = _clean_env(FLOWLENS_DATA_DIR=str(data_dir), GITHUB_WEBHOOK_SECRET=SECRET)
    environment.pop("FLOWLENS_URL", None)
    ping = Path(__file__).parent / "payloads" / "ping" / "payload.json"
    return subprocess.run(
        [sys.executable, "-m", "flowlens_ingest.cli", "send", str(ping), "--event", "ping"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def pings(service: Service) -> float | None:
    """The pings this instance answered (its own metrics)."""
    return metric(service, "flowlens_deliveries_total", event="ping", outcome="ignored")


def test_send_finds_a_live_serve_among_several_and_never_a_dead_ones_record(db, database_url, tmp_path):
    first = Service(database_url, tmp_path)
    with running(first):
        wait_for(instance_record(first).exists, "the first serve's record")
        with running(Service(database_url, tmp_path)) as second:
            wait_for(instance_record(second).exists, "the second serve's record")
            # Two live: the longest running one, and said which.
            sent = send_ping(tmp_path)
            assert sent.returncode == 0, sent.stderr
            assert sent.stderr.strip() == (
                f"flowlens-ingest: 2 instances serve FLOWLENS_DATA_DIR ({tmp_path}): sending to {first.url}/webhook,"
                f" the longest running (--url for another: {second.url}/webhook)"
            )
            assert (pings(first), pings(second)) == (1, None)

            # kill -9: the first leaves its record behind, which is never used, and removed.
            master = gunicorn_master(first)
            os.kill(first.process.pid, signal.SIGKILL)
            first.process.wait(30)
            assert instance_record(first).exists()
            # A record whose pid runs but whose address does not answer (a pid reused): passed over, kept.
            elsewhere = tmp_path / "instances" / f"{free_port()}.json"
            forged = {"url": f"http://127.0.0.1:{free_port()}/webhook", "pid": os.getpid(), "started": 0}
            elsewhere.write_text(json.dumps(forged))
            unreadable = tmp_path / "instances" / "1.json"
            unreadable.write_text("{")
            sent = send_ping(tmp_path)
            assert sent.returncode == 0, sent.stderr
            assert sent.stderr == ""  # one live instance: nothing to say
            assert pings(second) == 1
            assert not instance_record(first).exists() and not unreadable.exists()
            assert elsewhere.exists()
            elsewhere.unlink()
            wait_for(lambda: gone(master), "the killed serve's gunicorn to stop")

            # A third starts, the second stops (TERM): its record goes with it; send reaches the third.
            with running(Service(database_url, tmp_path)) as third:
                wait_for(instance_record(third).exists, "the third serve's record")
                assert second.stop() == 0
                assert not instance_record(second).exists()
                sent = send_ping(tmp_path)
                assert sent.returncode == 0 and sent.stderr == "", sent.stderr
                assert pings(third) == 1
                assert third.stop() == 0
            assert not instance_record(third).exists()


def test_a_port_taken_by_another_program_is_one_line_and_no_listening(tmp_path, database_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_once(tmp_path, port, DATABASE_URL=database_url)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"flowlens-ingest: port {port} on 127.0.0.1 is already in use (another `flowlens-ingest serve`?):"
        " stop it, or choose another --port"
    )
    assert result.stdout == ""


def test_listening_is_said_once_gunicorn_has_bound(db, database_url, tmp_path):
    with running(Service(database_url, tmp_path)) as service:
        line = f"flowlens-ingest: listening on {service.url}/webhook"
        wait_for(lambda: line in service.logs(), "the listening line")
        logs = service.logs()
        assert logs.index('"Listening at: ') < logs.index(line)
        assert service.stop() == 0


def test_sighup_stops_serve_like_a_closed_terminal(db, database_url, tmp_path):
    with running(Service(database_url, tmp_path)) as service:
        master = gunicorn_master(service)
        service.process.send_signal(signal.SIGHUP)
        assert service.process.wait(60) == 0
        assert not master.is_running() or master.status() == psutil.STATUS_ZOMBIE
        assert any(e["msg"] == "Handling signal: term" for e in log_entries(service))
        assert not any(e["msg"] == "Handling signal: hup" for e in log_entries(service))


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_9_of_serve_leaves_nothing_running_and_the_next_serve_starts_cleanly(home):
    service = first_run(home)
    with running(service):
        master = gunicorn_master(service)
        server = postmaster(home)
        assert server is not None
        os.kill(service.process.pid, signal.SIGKILL)
        service.process.wait(30)
        # gunicorn's master had `serve` as parent: it is told, and stops with its workers.
        wait_for(lambda: gone(master), "gunicorn to stop after its parent died", timeout=60)
        # Its last user gone, the embedded server is stopped by its keeper, not left behind.
        server.wait(60)
        wait_for(lambda: postmaster(home) is None, "the embedded server to stop after serve died")

    with running(first_run(home)) as again:
        body = json.dumps(OPENED).encode()
        secret = (home / "webhook-secret").read_text().strip()
        answer = requests.post(
            again.url + "/webhook", data=body, timeout=15, headers=github_headers(body, "pull_request", secret=secret)
        )
        assert answer.json()["outcome"] == "applied"
        server = postmaster(home)
        assert server is not None

        # Operator commands join the running server and leave it running.
        env = _clean_env(FLOWLENS_DATA_DIR=str(home))
        listed = subprocess.run(
            [sys.executable, "-m", "flowlens_ingest.cli", "deliveries"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0 and "pull_request/opened applied" in listed.stdout, listed.stderr
        shell = subprocess.run(
            [
                sys.executable,
                "-m",
                "flowlens_ingest.cli",
                "db",
                "shell",
                "-At",
                "-c",
                "SELECT count(*) FROM pull_requests",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (shell.returncode, shell.stdout.strip()) == (0, "1"), shell.stderr
        assert postmaster(home) is not None and postmaster(home).pid == server.pid
        assert again.stop() == 0
    # The last live user has gone: the server stops.
    server.wait(30)
    wait_for(lambda: postmaster(home) is None, "the embedded server to stop")


def test_an_unmigrated_database_is_named_once_with_the_command_that_migrates(fresh_database, tmp_path):
    fix = "run `flowlens-ingest db upgrade`"
    with running(Service(fresh_database, tmp_path, workers=1)) as service:
        said = [e for e in log_entries(service) if fix in e["msg"]]
        assert len(said) == 1 and said[0]["level"] == "warning", service.logs()
        ready = requests.get(service.url + "/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["fix"] == fix

        # Spooled (nothing can be stored); the master has said why, and nobody repeats it.
        assert service.post(OPENED, "pull_request", delivery="early").json()["outcome"] == "spooled"
        upgraded = subprocess.run(
            [sys.executable, "-m", "flowlens_ingest.cli", "db", "upgrade"],
            env=_clean_env(DATABASE_URL=fresh_database),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert upgraded.returncode == 0, upgraded.stderr
        wait_for(lambda: log_entries(service, "spooled delivery applied"), "the spool to drain once migrated")
        assert [e for e in log_entries(service) if fix in e["msg"]] == said
        # Neither the view nor the drainer repeats the table error.
        assert "does not exist" not in service.logs()
        assert requests.get(service.url + "/readyz", timeout=10).status_code == 200
        assert service.stop() == 0


def test_an_unmigrated_database_is_said_once_by_the_master_not_per_worker_or_delivery(fresh_database, tmp_path):
    deliveries = 4
    with running(Service(fresh_database, tmp_path, workers=2)) as service:
        for number in range(deliveries):
            answer = service.post(OPENED, "pull_request", delivery=f"early-{number}")
            assert (answer.status_code, answer.json()["outcome"]) == (202, "spooled")  # answered as today
        upgraded = subprocess.run(
            [sys.executable, "-m", "flowlens_ingest.cli", "db", "upgrade"],
            env=_clean_env(DATABASE_URL=fresh_database),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert upgraded.returncode == 0, upgraded.stderr
        wait_for(
            lambda: len(log_entries(service, "spooled delivery applied")) == deliveries,
            "the spool to drain once migrated",
        )
        assert service.stop() == 0
    entries = log_entries(service)
    # One line for the whole service, the master's at start: not one per worker, not one per delivery.
    said = [e for e in entries if "not migrated" in e["msg"] or "does not exist" in e["msg"]]
    assert [(e["logger"], e["level"]) for e in said] == [("gunicorn.error", "warning")], said
    assert not [e for e in entries if e["level"] in ("warning", "error") and e["logger"].startswith("flowlens_ingest")]
    # Each delivery still has its own line, with its outcome.
    assert [e["outcome"] for e in entries if e["msg"] == "delivery"] == ["spooled"] * deliveries


def test_an_unreachable_database_is_named_in_one_line_at_start_and_deliveries_are_spooled(tmp_path):
    port = free_port()  # nobody listens there
    url = f"postgresql://flowlens:not-this-password@127.0.0.1:{port}/flowlens"
    with running(Service(url, tmp_path)) as service:
        said = [e for e in log_entries(service) if "(DATABASE_URL)" in e["msg"]]
        assert len(said) == 1, service.logs()
        assert said[0]["level"] == "warning" and said[0]["logger"] == "gunicorn.error"  # the master's
        assert re.fullmatch(
            rf"flowlens-ingest: the database at 127\.0\.0\.1:{port}/flowlens \(DATABASE_URL\) is unavailable"
            r" \(refused: Connection refused\): check that the server runs and listens there;"
            r" deliveries are spooled until it answers, and /readyz answers 503",
            said[0]["msg"],
            re.IGNORECASE,
        ), said[0]["msg"]
        assert "not-this-password" not in service.logs() and "flowlens:" not in said[0]["msg"]

        # It still serves: deliveries are kept in the spool, readiness says it is not ready.
        answer = service.post(OPENED, "pull_request")
        assert (answer.status_code, answer.json()["outcome"]) == (202, "spooled")
        assert requests.get(service.url + "/readyz", timeout=10).status_code == 503
        assert service.stop() == 0
    assert len([e for e in log_entries(service) if "(DATABASE_URL)" in e["msg"]]) == 1


def test_an_unreachable_database_without_a_spool_says_deliveries_are_answered_503(tmp_path):
    url = f"postgresql://flowlens@127.0.0.1:{free_port()}/flowlens"
    with running(Service(url, tmp_path, workers=1, env={"FLOWLENS_SPOOL_MAX_BYTES": "0"})) as service:
        (said,) = [e["msg"] for e in log_entries(service) if "(DATABASE_URL)" in e["msg"]]
        assert said.endswith(
            "; deliveries are answered 503 (the spool is off) until it answers, and /readyz answers 503"
        )
        assert service.post(OPENED, "pull_request").status_code == 503
        assert service.stop() == 0
