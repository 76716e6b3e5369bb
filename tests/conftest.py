"""Fixtures: a real PostgreSQL (the machine's, or the embedded one), apps on it, a real service.

FLOWLENS_TEST_DATABASE_URL names a server to test against (any database on it
works: the suite creates and drops a scratch database of its own). Without it,
the suite starts the embedded PostgreSQL, so `pytest` needs no database installed.

Only fixtures live here, and the hypothesis profiles: the helpers the tests call
are in helpers.py, databases.py, serving.py and stories.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import settings
from sqlalchemy.engine import Engine

from flowlens_ingest.config import Settings
from flowlens_ingest.database_urls import normalize_database_url
from flowlens_ingest.store import migrate
from flowlens_ingest.store.database import make_engine
from flowlens_ingest.store.schema import metadata
from flowlens_ingest.web.app import create_app
from flowlens_ingest.web.services import services

from .databases import ThrowawayPostgres, create_scratch_database, drop_database
from .helpers import DEV_MIN_EXAMPLES, HYPOTHESIS_PROFILE, github_headers, make_settings
from .serving import Service, Webhook

# Hypothesis: `dev` (the default) is small, for a fast loop; CI sets HYPOTHESIS_PROFILE=ci.
# A test that sets its own max_examples takes it from helpers.examples(), which
# follows the same variable.
settings.register_profile("dev", max_examples=DEV_MIN_EXAMPLES)
settings.register_profile("ci", print_blob=True)
settings.load_profile(HYPOTHESIS_PROFILE)


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An admin URL of a running PostgreSQL server."""
    configured = os.environ.get("FLOWLENS_TEST_DATABASE_URL")
    if configured:
        yield normalize_database_url(configured)
        return
    from flowlens_ingest.postgres import embedded

    server, url = embedded.start(tmp_path_factory.mktemp("embedded"))
    yield url
    server.close(wait=True)


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


@pytest.fixture
def throwaway() -> Iterator[ThrowawayPostgres]:
    """A migrated PostgreSQL server of the test's own (TCP, its log in a file), to stop and start at will."""
    server = ThrowawayPostgres()
    try:
        server.start()
        migrate.upgrade(server.url)
        yield server
    finally:
        server.remove()


@pytest.fixture
def db(engine: Engine) -> Engine:
    """The session engine, on a database emptied before the test."""
    with engine.begin() as conn:
        tables = ", ".join(t.name for t in metadata.sorted_tables)
        conn.execute(sa.text(f"TRUNCATE {tables} CASCADE"))
    return engine


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


@pytest.fixture
def deliver(client) -> Callable[..., Any]:
    """POST a payload (dict or bytes) to /webhook signed like GitHub; returns the response."""

    def post(payload: dict[str, Any] | bytes, event: str, **kwargs: Any):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return client.post("/webhook", data=body, headers=github_headers(body, event, **kwargs))

    return post


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


@pytest.fixture
def service(db: Engine, database_url: str, tmp_path: Path) -> Iterator[Service]:
    """A real gunicorn (2 workers) serving the scratch database."""
    svc = Service(database_url, tmp_path)
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def webhook(db: Engine, database_url: str, tmp_path: Path) -> Iterator[Webhook]:
    """A real /webhook on the scratch database, for the fake GitHub's hooks to deliver to (tests/serving.py)."""
    hook = Webhook(database_url, tmp_path)
    yield hook
    hook.close()
