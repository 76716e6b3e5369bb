"""Operability: metrics summed across workers, one log line per delivery, readiness, graceful shutdown."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time

import pytest
import requests
import sqlalchemy as sa

from flowlens_ingest import logs, migrate
from flowlens_ingest.app import create_app, services

from .conftest import (
    SECRET,
    Service,
    create_scratch_database,
    drop_database,
    github_headers,
    load_payload,
    make_settings,
    wait_until,
)

OPENED = load_payload("pull_request/opened.payload.json")


def sample(metrics_text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match[1] != name:
            continue
        found = ",".join(sorted((match[2] or "").split(","))) if match[2] else ""
        if found == wanted:
            return float(match[3])
    return 0.0



@pytest.mark.slow
def test_metrics_are_summed_across_workers(db, database_url, tmp_path):
    service = Service(database_url, tmp_path, workers=3)
    try:
        service.wait_ready()
        connected = sa.text(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'flowlens-ingest' AND datname = current_database()"
        )

        def workers_connected() -> int:
            # A new connection each time: pg_stat_activity is a snapshot per transaction.
            with db.connect() as conn:
                return conn.execute(connected).scalar()

        sent = 0
        # Until every worker has served a delivery, i.e. holds a connection of its own.
        while workers_connected() < 3 and sent < 300:
            payload = json.loads(json.dumps(OPENED))
            payload["pull_request"]["number"] = payload["number"] = 1000 + sent
            assert service.post(payload, "pull_request").status_code == 200
            sent += 1
        assert workers_connected() == 3
        # Each worker writes its own sample file.
        assert len(list((tmp_path / "metrics").glob("counter_*.db"))) == 3
        for _ in range(2):
            assert requests.post(service.url + "/webhook", data=b"{}", timeout=10).status_code == 401

        wait_until(lambda: "flowlens_spool_depth" in requests.get(service.url + "/metrics", timeout=10).text,
                   what="the spool depth gauge")
        # Whichever worker answers /metrics, the totals are the sum over all workers.
        for _ in range(6):
            text = requests.get(service.url + "/metrics", timeout=10).text
            assert sample(text, "flowlens_deliveries_total", event="pull_request", outcome="applied") == sent
            assert sample(text, "flowlens_delivery_duration_seconds_count", event="pull_request") == sent
            assert sample(text, "flowlens_signature_failures_total", reason="missing") == 2
            # The drainers report the spool depth (empty) once a second.
            assert "flowlens_spool_depth 0.0" in text

        # Two round trips per delivery, now that every worker has its connection (a
        # worker's first connection adds SQLAlchemy's few first-connect queries).
        before = sample(requests.get(service.url + "/metrics", timeout=10).text, "flowlens_db_round_trips_total")
        for number in range(10):
            payload = json.loads(json.dumps(OPENED))
            payload["pull_request"]["number"] = payload["number"] = 2000 + number
            assert service.post(payload, "pull_request").status_code == 200
        after = sample(requests.get(service.url + "/metrics", timeout=10).text, "flowlens_db_round_trips_total")
        assert after - before == 20
    finally:
        service.stop()


@pytest.mark.slow
def test_one_json_log_line_per_delivery_with_its_id_and_no_secret(service, db):
    payload = json.loads(json.dumps(OPENED))
    payload["pull_request"]["title"] = "a title that must never reach the log"
    assert service.post(payload, "pull_request", delivery="log-me-1").status_code == 200
    assert requests.post(service.url + "/webhook", data=b"{}", timeout=10).status_code == 401

    def delivery_lines() -> list[dict]:
        found = []
        for line in service.logs().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("msg") == "delivery":
                    found.append(entry)
        return found

    wait_until(lambda: delivery_lines(), what="the delivery log line")
    (entry,) = delivery_lines()
    assert entry["delivery"] == "log-me-1"
    assert (entry["event"], entry["action"], entry["outcome"]) == ("pull_request", "opened", "applied")
    assert entry["duration_ms"] > 0 and entry["level"] == "info"
    text = service.logs()
    assert SECRET not in text
    assert "a title that must never reach the log" not in text


def test_text_log_format_is_readable():
    record = logging.LogRecord("flowlens_ingest.webhook", logging.INFO, __file__, 1, "delivery", None, None)
    record.delivery, record.outcome = "abc-123", "applied"
    line = logs.TextFormatter().format(record)
    assert "INFO" in line and "flowlens_ingest.webhook: delivery" in line
    assert "delivery=abc-123" in line and "outcome=applied" in line


@contextlib.contextmanager
def app_on_scratch_database(server_url, tmp_path, *, revision=None):
    """An app on a database of its own, migrated to `revision` (None: no schema at all)."""
    url = create_scratch_database(server_url, prefix="flowlens_ops")
    try:
        if revision is not None:
            migrate.upgrade(url)
            engine = sa.create_engine(url)
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": revision})
            engine.dispose()
        app = create_app(make_settings(url, tmp_path))
        yield app
        services(app).database.dispose()
    finally:
        drop_database(url)


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
            "status": "ready", "revision": "ffff_from_a_newer_release", "schema": "newer than this release",
        }


def test_a_database_without_the_schema_spools_deliveries_instead_of_failing(server_url, tmp_path):
    with app_on_scratch_database(server_url, tmp_path) as app:
        body = json.dumps(OPENED).encode()
        answer = app.test_client().post("/webhook", data=body, headers=github_headers(body, "pull_request"))
        assert (answer.status_code, answer.get_json()["outcome"]) == (202, "spooled")
        assert len(list((tmp_path / "spool").glob("*.delivery"))) == 1


def test_readyz_is_503_when_the_database_is_unreachable(tmp_path):
    dead = make_settings("postgresql+psycopg2://postgres@127.0.0.1:1/none", tmp_path)
    answer = create_app(dead).test_client().get("/readyz")
    assert answer.status_code == 503
    assert answer.get_json() == {"status": "unavailable", "database": "unreachable"}


@pytest.mark.slow
def test_graceful_shutdown_finishes_the_delivery_in_flight(db, database_url, tmp_path):
    # A long lock timeout: the delivery must wait for the test, however slow the machine.
    service = Service(database_url, tmp_path, env={"FLOWLENS_STATEMENT_TIMEOUT_MS": "60000"})
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
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )

            def delivery_waits() -> bool:
                with db.connect() as conn:
                    return conn.execute(waiting).scalar() > 0

            wait_until(delivery_waits, what="the delivery to wait on the lock")
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
