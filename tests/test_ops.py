"""The unsigned operational routes of web/probes.py: /healthz, /readyz, /metrics.

In one process (the Flask test client) on databases in every state, and under a
real `serve` whose database goes away, comes back, and loses its migrations.
"""

from __future__ import annotations

import pytest
import requests

from flowlens_ingest.store import migrate
from flowlens_ingest.web.app import create_app

from .databases import ThrowawayPostgres, app_on_scratch_database, create_scratch_database, drop_database
from .helpers import make_settings, wait_for
from .serving import Service, running


def test_healthz_answers_without_a_signature(client):
    answer = client.get("/healthz")
    assert (answer.status_code, answer.get_json()) == (200, {"status": "ok"})


def test_readyz_names_the_revision_when_ready(client):
    answer = client.get("/readyz")
    assert answer.status_code == 200
    assert answer.get_json() == {"status": "ready", "revision": migrate.head()}


def test_operational_routes_take_no_post(client):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.post(path).status_code == 405


def test_readyz_is_503_until_migrations_reach_head(server_url, tmp_path):
    with app_on_scratch_database(server_url, tmp_path) as app:
        answer = app.test_client().get("/readyz")
        assert answer.status_code == 503
        assert answer.get_json()["database"] == "migrations pending"


def test_readyz_stays_ready_when_a_newer_release_has_migrated_the_database(server_url, tmp_path):
    # A rolling deploy: the release step migrated for the next release, this VM still
    # runs the previous code; it must not drop out of the load balancer.
    with app_on_scratch_database(server_url, tmp_path, revision="ffff_from_a_newer_release") as app:
        answer = app.test_client().get("/readyz")
        assert answer.status_code == 200
        assert answer.get_json() == {
            "status": "ready",
            "revision": "ffff_from_a_newer_release",
            "schema": "newer than this release",
        }


def test_readyz_is_503_when_the_database_is_unreachable(tmp_path):
    dead = make_settings("postgresql+psycopg2://postgres@127.0.0.1:1/none", tmp_path)
    answer = create_app(dead).test_client().get("/readyz")
    assert answer.status_code == 503
    assert answer.get_json() == {"status": "unavailable", "database": "unreachable"}


# --- under a real service ----------------------------------------------------------------


def readiness(service: Service) -> tuple[int, dict]:
    """/readyz's status and body."""
    answer = requests.get(service.url + "/readyz", timeout=15)
    return answer.status_code, answer.json()


@pytest.mark.slow
def test_readiness_follows_the_database_and_its_migrations(server_url, tmp_path):
    server = ThrowawayPostgres()
    try:
        # The service may start before its database: alive, not ready.
        with running(Service(server.url, tmp_path)) as service:
            assert readiness(service) == (503, {"status": "unavailable", "database": "unreachable"})
            assert requests.get(service.url + "/healthz", timeout=5).status_code == 200

            server.start()
            wait_for(
                lambda: readiness(service)[1].get("database") == "migrations pending",
                "the database reachable but unmigrated",
            )
            assert readiness(service)[0] == 503
            migrate.upgrade(server.url)
            wait_for(lambda: readiness(service)[0] == 200, "ready once migrated")

            server.stop()
            wait_for(
                lambda: readiness(service) == (503, {"status": "unavailable", "database": "unreachable"}),
                "unready while the database is down",
            )
            # Alive all along: a restart would not help, the load balancer only stops routing.
            assert requests.get(service.url + "/healthz", timeout=5).status_code == 200

            server.start()
            wait_for(
                lambda: readiness(service) == (200, {"status": "ready", "revision": migrate.head()}),
                "ready again once the database is back",
            )
            assert service.stop() == 0
    finally:
        server.remove()


@pytest.mark.slow
def test_readiness_drops_while_the_schema_is_behind(server_url, tmp_path):
    url = create_scratch_database(server_url, prefix="flowlens_ready")
    try:
        migrate.upgrade(url)
        with running(Service(url, tmp_path)) as service:
            assert readiness(service)[0] == 200
            migrate.downgrade(url, "base")
            assert readiness(service) == (
                503,
                {"status": "unavailable", "database": "migrations pending", "fix": "run `flowlens-ingest db upgrade`"},
            )
            migrate.upgrade(url)
            assert readiness(service)[0] == 200
            assert service.stop() == 0
    finally:
        drop_database(url)
