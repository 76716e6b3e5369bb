"""`flowlens-ingest send` and `deliveries`, run as an operator would, against a real service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from flowlens_ingest.schema import pull_requests

from .helpers import PAYLOADS, SECRET, free_port, rows

OPENED_FILE = PAYLOADS / "pull_request" / "opened.payload.json"


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Run `flowlens-ingest ARGS` with only the given FlowLens variables set."""
    drop = ("DATABASE_URL", "GITHUB_WEBHOOK_SECRET", "GITHUB_WEBHOOK_SECRET_PREVIOUS", "FLOWLENS_DATA_DIR")
    environment = {k: v for k, v in os.environ.items() if k not in drop}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "flowlens_ingest.cli", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_send_signs_and_posts_a_file_to_a_running_service(service, db, database_url, tmp_path):
    url = service.url + "/webhook"
    sent = cli(
        "send",
        str(OPENED_FILE),
        "--event",
        "pull_request",
        "--url",
        url,
        "--delivery",
        "cli-1",
        GITHUB_WEBHOOK_SECRET=SECRET,
    )
    assert sent.returncode == 0, sent.stderr
    status, body = sent.stdout.split(" ", 1)
    assert status == "200"
    assert json.loads(body) == {"delivery": "cli-1", "event": "pull_request", "action": "opened", "outcome": "applied"}
    assert [r["pr_number"] for r in rows(db, pull_requests, "pr_number")] == [2]

    # Sent again with the same id: GitHub's redelivery, not applied twice.
    again = cli(
        "send",
        str(OPENED_FILE),
        "--event",
        "pull_request",
        "--url",
        url,
        "--delivery",
        "cli-1",
        GITHUB_WEBHOOK_SECRET=SECRET,
    )
    assert again.returncode == 0 and json.loads(again.stdout.split(" ", 1)[1])["outcome"] == "duplicate"

    # No secret in the environment: the one `serve` keeps in the data directory signs it.
    (tmp_path / "webhook-secret").write_text(SECRET + "\n")
    from_file = cli(
        "send",
        str(PAYLOADS / "ping" / "payload.json"),
        "--event",
        "ping",
        "--url",
        url,
        FLOWLENS_DATA_DIR=str(tmp_path),
    )
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout.split(" ", 1)[1])["outcome"] == "ignored"

    refused = cli(
        "send",
        str(OPENED_FILE),
        "--event",
        "pull_request",
        "--url",
        url,
        GITHUB_WEBHOOK_SECRET="not the service's secret",
    )
    assert refused.returncode == 1
    assert refused.stdout.startswith("401 ")

    # Every delivery above is in the journal, newest first.
    listed = cli("deliveries", DATABASE_URL=database_url, GITHUB_WEBHOOK_SECRET=SECRET)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2 and "(2 deliveries)" in listed.stderr
    assert " ping " in lines[0] and "ignored" in lines[0]
    assert "cli-1 pull_request/opened applied" in lines[1]


@pytest.mark.slow
def test_send_posts_a_signed_sample_to_a_running_service(service, db):
    sent = cli(
        "send",
        str(OPENED_FILE),
        "--event",
        "pull_request",
        "--url",
        service.url + "/webhook",
        "--delivery",
        f"send-{uuid.uuid4()}",
        GITHUB_WEBHOOK_SECRET=SECRET,
    )
    assert sent.returncode == 0, sent.stderr
    # The service's answer as it came: its status, then its body as the service wrote it (compact JSON).
    assert sent.stdout.startswith("200 ") and '"outcome":"applied"' in sent.stdout
    assert len(rows(db, pull_requests)) == 1


def test_send_without_a_secret_says_so(tmp_path):
    result = cli("send", str(OPENED_FILE), "--event", "pull_request", FLOWLENS_DATA_DIR=str(tmp_path))
    assert result.returncode == 2
    assert "GITHUB_WEBHOOK_SECRET is not set" in result.stderr and "Traceback" not in result.stderr


def test_send_names_a_file_it_cannot_read(tmp_path):
    result = cli("send", str(tmp_path / "missing.json"), "--event", "ping", GITHUB_WEBHOOK_SECRET=SECRET)
    assert result.returncode == 2
    assert "cannot read" in result.stderr and "missing.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_send_names_a_service_it_cannot_reach():
    url = f"http://127.0.0.1:{free_port()}/webhook"
    result = cli("send", str(OPENED_FILE), "--event", "pull_request", "--url", url, GITHUB_WEBHOOK_SECRET=SECRET)
    assert result.returncode == 2
    assert f"cannot reach {url}" in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_a_database_url_without_a_secret(database_url, tmp_path):
    result = cli("serve", "--port", str(free_port()), DATABASE_URL=database_url, FLOWLENS_DATA_DIR=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "flowlens-ingest: GITHUB_WEBHOOK_SECRET is not set; refusing to start with DATABASE_URL set"
    )
    assert not Path(tmp_path / "pgdata").exists()


@pytest.mark.parametrize("command", [["deliveries"], ["replay", "--failed"], ["prune", "--older-than", "30d"]])
def test_operator_commands_never_create_an_embedded_database(command, tmp_path):
    # Run from the wrong folder, a new empty database would pass for an empty journal.
    result = cli(*command, FLOWLENS_DATA_DIR=str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("flowlens-ingest: no database: DATABASE_URL is not set and ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "pgdata").exists()
