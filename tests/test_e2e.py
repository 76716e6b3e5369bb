"""End to end: a real `flowlens-ingest serve` (gunicorn, 2 workers), real HTTP, signed bodies."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from flowlens_ingest.schema import pipeline_runs, pull_requests, webhook_deliveries
from flowlens_ingest.signature import sign

from .conftest import PREVIOUS_SECRET, SECRET, Service, github_headers, load_payload, rows

pytestmark = pytest.mark.slow

OPENED = load_payload("pull_request/opened.payload.json")
CLOSED = load_payload("pull_request/closed.payload.json")


def post_raw(service: Service, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(service.url + "/webhook", data=body, headers=headers, timeout=15)


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
    for bad in (b"[1]", b"{not json", b'{"a": "\\u0000"}'):
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
    port = _free_port()
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


def test_serve_refuses_a_database_url_without_a_secret(database_url, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flowlens_ingest.cli", "serve", "--port", str(_free_port())],
        env=_clean_env(DATABASE_URL=database_url, FLOWLENS_DATA_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "GITHUB_WEBHOOK_SECRET is not set" in result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_send_posts_a_signed_sample_to_a_running_service(service, db):
    result = subprocess.run(
        [
            sys.executable, "-m", "flowlens_ingest.cli", "send",
            str(Path(__file__).parent / "payloads" / "pull_request" / "opened.payload.json"),
            "--event", "pull_request", "--url", service.url + "/webhook", "--delivery", f"send-{uuid.uuid4()}",
        ],
        env=_clean_env(GITHUB_WEBHOOK_SECRET=SECRET),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("200 ") and '"outcome":"applied"' in result.stdout
    assert len(rows(db, pull_requests)) == 1
