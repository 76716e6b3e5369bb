"""Shared fixtures: a real PostgreSQL (the machine's, or the embedded one), real signed bodies.

FLOWLENS_TEST_DATABASE_URL names a server to test against (any database on it
works: the suite creates and drops a scratch database of its own). Without it,
the suite starts the embedded PostgreSQL, so `pytest` needs no database installed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from flowlens_ingest import migrate
from flowlens_ingest.app import create_app, services
from flowlens_ingest.config import Settings, normalize_database_url
from flowlens_ingest.database import Database, make_engine
from flowlens_ingest.schema import metadata
from flowlens_ingest.signature import sign

PAYLOADS = Path(__file__).parent / "payloads"
SECRET = "test-secret-\u00e9"
PREVIOUS_SECRET = "previous-secret"


def load_payload(name: str) -> dict[str, Any]:
    """A GitHub payload from tests/payloads, e.g. `pull_request/opened.payload.json`."""
    return json.loads((PAYLOADS / name).read_text())


def payload_files(event: str) -> list[Path]:
    """Every sample payload of one event."""
    return sorted((PAYLOADS / event).glob("*.json"))


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """An admin URL of a running PostgreSQL server."""
    configured = os.environ.get("FLOWLENS_TEST_DATABASE_URL")
    if configured:
        yield normalize_database_url(configured)
        return
    from flowlens_ingest import embedded

    # Not under pytest's basetemp: a pytest run starting meanwhile resets that tree
    # to mode 0700, locking out the server's own system user when running as root.
    home = Path(tempfile.mkdtemp(prefix="flowlens-embedded-"))
    server, url = embedded.start(home, cleanup_mode="delete")
    yield url
    server.cleanup()
    shutil.rmtree(home, ignore_errors=True)


def create_scratch_database(admin_url: str, prefix: str = "flowlens_test") -> str:
    """Create an empty database on the server of `admin_url`; return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    """Drop a scratch database, closing whatever still holds it."""
    target = make_url(url)
    admin = sa.create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(
            sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"),
            {"d": target.database},
        )
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{target.database}"'))
    admin.dispose()


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A scratch database, migrated to head once per session."""
    url = create_scratch_database(server_url)
    migrate.upgrade(url)
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on the session's scratch database, configured as the service's own."""
    eng = make_engine(Settings(database_url=normalize_database_url(database_url)), application_name="flowlens-tests")
    yield eng
    eng.dispose()


_DATABASES: dict[Engine, Database] = {}


def database_of(engine: Engine) -> Database:
    """The service's Database over a test's engine (one per engine)."""
    if engine not in _DATABASES:
        _DATABASES[engine] = Database(Settings(), engine=engine)
    return _DATABASES[engine]


@pytest.fixture
def db(engine: Engine) -> Engine:
    """The session engine, on a database emptied before the test."""
    with engine.begin() as conn:
        tables = ", ".join(t.name for t in metadata.sorted_tables)
        conn.execute(sa.text(f"TRUNCATE {tables} CASCADE"))
    return engine


def make_settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for an app under test."""
    values: dict[str, Any] = dict(
        database_url=database_url,
        secrets=(SECRET.encode(), PREVIOUS_SECRET.encode()),
        data_dir=tmp_path,
        spool_dir=tmp_path / "spool",
        log_format="json",
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def app(db: Engine, database_url: str, tmp_path: Path):
    """A Flask app on the scratch database."""
    application = create_app(make_settings(database_url, tmp_path))
    application.config["TESTING"] = True
    yield application
    services(application).database.dispose()


@pytest.fixture
def client(app):
    """Flask's test client: real WSGI requests, no mocks."""
    return app.test_client()


Headers = dict[str, str]


def github_headers(body: bytes, event: str, *, delivery: str | None = None, secret: str = SECRET,
                   hook_id: str | None = "123456", content_type: str = "application/json") -> Headers:
    """The headers GitHub sends with a delivery of `body`."""
    headers = {
        "Content-Type": content_type,
        "User-Agent": "GitHub-Hookshot/test",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": sign(body, secret.encode()),
    }
    if hook_id is not None:
        headers["X-GitHub-Hook-ID"] = hook_id
    return headers


@pytest.fixture
def deliver(client) -> Callable[..., Any]:
    """POST a payload (dict or bytes) to /webhook signed like GitHub; returns the response."""

    def post(payload: dict[str, Any] | bytes, event: str, **kwargs: Any):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return client.post("/webhook", data=body, headers=github_headers(body, event, **kwargs))

    return post


def rows(engine: Engine, table: sa.Table, *columns: str) -> list[dict[str, Any]]:
    """All rows of a table as dicts (optionally only some columns), in a stable order."""
    cols = [table.c[c] for c in columns] if columns else list(table.c)
    with engine.connect() as conn:
        result = conn.execute(sa.select(*cols).order_by(*cols[:3]))
        return [dict(r._mapping) for r in result]


def wait_until(condition: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def refuse_title(db: Engine) -> Iterator[Callable[[], None]]:
    """The database refuses the PR title 'refused' (a failure mappers cannot see) until `fix()` runs."""
    with db.begin() as conn:
        conn.execute(sa.text("ALTER TABLE pull_requests ADD CONSTRAINT test_refuse CHECK (title <> 'refused')"))

    def fix() -> None:
        with db.begin() as conn:
            conn.execute(sa.text("ALTER TABLE pull_requests DROP CONSTRAINT IF EXISTS test_refuse"))

    yield fix
    fix()


# --- a real service ------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """`flowlens-ingest serve` running in a child process."""

    def __init__(self, database_url: str | None, data_dir: Path, *, workers: int = 2,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = data_dir / "service.log"
        environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")}
        environment.update(
            FLOWLENS_DATA_DIR=str(data_dir),
            GITHUB_WEBHOOK_SECRET=SECRET,
            GITHUB_WEBHOOK_SECRET_PREVIOUS=PREVIOUS_SECRET,
        )
        if database_url:
            environment["DATABASE_URL"] = database_url
        environment.update(env or {})
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flowlens_ingest.cli", "serve", "--port", str(self.port), "--workers", str(workers)],
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until /healthz answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited early:\n{self.log_path.read_text(errors='replace')}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"service not ready:\n{self.log_path.read_text(errors='replace')}")

    def post(self, payload: dict[str, Any] | bytes, event: str, **kwargs: Any) -> requests.Response:
        """Sign and POST a delivery over real HTTP."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = github_headers(body, event, **kwargs)
        return requests.post(self.url + "/webhook", data=body, headers=headers, timeout=15)

    def stop(self) -> int:
        """SIGTERM the service (graceful) and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def logs(self) -> str:
        """Everything the service printed so far."""
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def service(db: Engine, database_url: str, tmp_path: Path) -> Iterator[Service]:
    """A real gunicorn (2 workers) serving the scratch database."""
    svc = Service(database_url, tmp_path)
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()

