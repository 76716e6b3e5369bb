"""Helpers every kind of test uses: sample payloads, GitHub's headers, rows, waits, settings.

Plain functions and constants, no fixtures (those are in conftest.py): test modules
import them from here, never from conftest.py or from one another.
"""

from __future__ import annotations

import contextlib
import copy
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from flowlens_ingest.config import Settings
from flowlens_ingest.events.signature import sign
from flowlens_ingest.store.database import Database

PAYLOADS = Path(__file__).parent / "payloads"
# At least 16 bytes each (config.MIN_SECRET_BYTES); one is not ASCII, as GitHub allows.
SECRET = "test-webhook-secret-\u00e9"
PREVIOUS_SECRET = "previous-webhook-secret"

# The hypothesis profile of this run (conftest.py loads it): `dev` unless CI sets
# HYPOTHESIS_PROFILE=ci. `examples` reads it too, so set the variable rather than
# pytest's --hypothesis-profile option.
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "dev")
DEV_MIN_EXAMPLES = 20


def examples(full: int) -> int:
    """A test's max_examples: `full` under the `ci` profile, about a tenth (at least 20) under `dev`."""
    if HYPOTHESIS_PROFILE == "ci":
        return full
    return max(DEV_MIN_EXAMPLES, full // 10)


def load_payload(name: str) -> dict[str, Any]:
    """A GitHub payload from tests/payloads, e.g. `pull_request/opened.payload.json`."""
    return json.loads((PAYLOADS / name).read_text())


def payload_files(event: str) -> list[Path]:
    """Every sample payload of one event."""
    return sorted((PAYLOADS / event).glob("*.json"))


Headers = dict[str, str]


def github_headers(
    body: bytes,
    event: str,
    *,
    delivery: str | None = None,
    secret: str = SECRET,
    hook_id: str | None = "123456",
    content_type: str = "application/json",
    target: tuple[str, str] | None = None,
) -> Headers:
    """The headers GitHub sends with a delivery of `body` (`target`: the hook's installation target type and id)."""
    headers = {
        "Content-Type": content_type,
        "User-Agent": "GitHub-Hookshot/test",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": sign(body, secret.encode()),
    }
    if hook_id is not None:
        headers["X-GitHub-Hook-ID"] = hook_id
    if target is not None:
        headers["X-GitHub-Hook-Installation-Target-Type"], headers["X-GitHub-Hook-Installation-Target-ID"] = target
    return headers


def make_settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for an app under test."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "secrets": (SECRET.encode(), PREVIOUS_SECRET.encode()),
        "data_dir": tmp_path,
        "spool_dir": tmp_path / "spool",
        "log_format": "json",
    }
    values.update(overrides)
    return Settings(**values)


_DATABASES: dict[Engine, Database] = {}


def database_of(engine: Engine) -> Database:
    """The service's Database over a test's engine (one per engine)."""
    if engine not in _DATABASES:
        _DATABASES[engine] = Database(Settings(), engine=engine)
    return _DATABASES[engine]


def rows(engine: Engine, table: sa.Table, *columns: str) -> list[dict[str, Any]]:
    """All rows of a table as dicts (optionally only some columns), in a stable order."""
    cols = [table.c[c] for c in columns] if columns else list(table.c)
    with engine.connect() as conn:
        result = conn.execute(sa.select(*cols).order_by(*cols[:3]))
        return [dict(r._mapping) for r in result]


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll `condition` until it returns something truthy, and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def loopback_http(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded HTTP server on a free loopback port, answering with `handler`; yields its /webhook URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/webhook"
    finally:
        server.shutdown()
        server.server_close()
        serving.join(10)


def cli_environment(**env: str) -> dict[str, str]:
    """The environment of a command run as an operator runs it: none of the service's variables but those in `env`."""
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("FLOWLENS_", "GITHUB_")) and k != "DATABASE_URL"
    }
    environment.update(env)
    return environment


def run_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """`flowlens-ingest ARGS` as an operator runs it: none of the service's variables but those given in `env`."""
    return subprocess.run(
        [sys.executable, "-m", "flowlens_ingest.cli", *args],
        env=cli_environment(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def opened_pr(number: int, title: str | None = None) -> dict[str, Any]:
    """The real `pull_request opened` payload, renumbered (and retitled): a PR of its own for each number."""
    payload = copy.deepcopy(load_payload("pull_request/opened.payload.json"))
    payload["number"] = payload["pull_request"]["number"] = number
    if title is not None:
        payload["pull_request"]["title"] = title
    return payload
